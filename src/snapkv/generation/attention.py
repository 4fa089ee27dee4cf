"""Attention for the engine: prefill by query chunks, and decode over the static cache.

Prefill: the queries of one chunk are the last ``c`` of ``S`` positions, so the causal mask is
aligned bottom-right (query ``i`` sees keys ``0 .. S - c + i``). Backends:

* ``flash``: torch's FlashAttention-2 op; with ``is_causal`` and ``c < S`` it masks bottom-right
  (the same call ``torch.nn.attention.bias.causal_lower_right`` makes) and takes grouped KV heads.
* ``cudnn``: torch's cuDNN attention in two calls (the prefix without a mask, the chunk's own
  square block with the causal mask) merged through their log-sum-exps; one call per KV head's
  group of query heads (``cudnn_gqa``: one call with the grouped heads, where cuDNN takes them).
* ``ref``: ``scaled_dot_product_attention`` with an explicit mask (CPU, and the tests' twin).

Decode: one query per row against the whole static cache, masked by the cache's additive
bias. Grouped query heads are folded into the rows of one batched product, so KV is never
repeated: ``[B, Hkv, G, D] @ [B, Hkv, D, cap]``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

PREFILL_BACKENDS: tuple[str, ...] = ("flash", "cudnn", "cudnn_gqa", "ref")


def default_prefill_backend(device: torch.device) -> str:
    """``$SNAPKV_PREFILL_ATTN`` if set, else ``cudnn_gqa`` on CUDA, ``ref`` elsewhere."""
    env = os.environ.get("SNAPKV_PREFILL_ATTN")
    if env:
        if env not in PREFILL_BACKENDS:
            raise ValueError(f"SNAPKV_PREFILL_ATTN must be one of {PREFILL_BACKENDS}, got {env!r}")
        return env
    return "cudnn_gqa" if device.type == "cuda" else "ref"


def causal_chunk_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """Bottom-right causal attention, explicit mask: ``q [B, Hq, c, D]``, ``k, v [B, Hkv, S, D]``."""
    c, s = q.shape[-2], k.shape[-2]
    if c == s:  # the square causal mask: torch's causal kernels (2x faster on CPU than a mask)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
    mask = torch.ones(c, s, dtype=torch.bool, device=q.device).tril(diagonal=s - c)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, causal: bool) -> tuple:
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scaling)
    return out[0], out[1]  # [B, Hq, c, D], lse [B, Hq, c]


def _cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, causal: bool) -> tuple:
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scaling)
    return out[0], out[1].reshape(q.shape[:-1])


def merge_partials(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> torch.Tensor:
    """Exact softmax attention over the union of two key sets from each part's output and LSE."""
    lse = torch.logaddexp(lse1, lse2)  # [B, H, c]
    w1 = torch.exp(lse1 - lse).unsqueeze(-1)
    w2 = torch.exp(lse2 - lse).unsqueeze(-1)
    return (o1.float() * w1 + o2.float() * w2).to(o1.dtype)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def causal_chunk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, backend: str = "ref"
) -> torch.Tensor:
    """Attention of the last ``c`` of ``S`` positions to keys ``0 .. S-1``, bottom-right causal.

    Args:
        q: ``[B, Hq, c, D]`` post-RoPE queries of positions ``S - c .. S - 1``.
        k, v: ``[B, Hkv, S, D]`` keys (post-RoPE) and values; ``Hq`` a multiple of ``Hkv``.
        scaling: logit scale.
        backend: one of :data:`PREFILL_BACKENDS`.

    Returns:
        ``[B, Hq, c, D]`` in ``q``'s dtype.
    """
    c, s = q.shape[-2], k.shape[-2]
    if backend == "ref" or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return causal_chunk_attention_ref(q, k, v, scaling)
    if backend == "flash":
        return _flash(q, k, v, scaling, True)[0]
    if backend in ("cudnn", "cudnn_gqa"):
        q = q.contiguous()
        if backend == "cudnn" and q.shape[1] != k.shape[1]:
            return _cudnn_grouped(q, k, v, scaling)
        start = s - c
        o2, lse2 = _cudnn(q, k[:, :, start:], v[:, :, start:], scaling, True)
        if start == 0:
            return o2
        o1, lse1 = _cudnn(q, k[:, :, :start], v[:, :, :start], scaling, False)
        return merge_partials(o1, lse1, o2, lse2)
    raise ValueError(f"prefill attention backend must be one of {PREFILL_BACKENDS}, got {backend!r}")


def _cudnn_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """cuDNN attention with grouped KV heads, one KV head's group at a time (no KV copies)."""
    b, hq, c, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    s = k.shape[-2]
    start = s - c
    out = torch.empty_like(q)
    for h in range(hkv):
        qh = q[:, h * g : (h + 1) * g]  # [B, G, c, D]
        kh, vh = k[:, h : h + 1].expand(b, g, s, d), v[:, h : h + 1].expand(b, g, s, d)
        o2, lse2 = _cudnn(qh, kh[:, :, start:], vh[:, :, start:], scaling, True)
        if start == 0:
            out[:, h * g : (h + 1) * g] = o2
            continue
        o1, lse1 = _cudnn(qh, kh[:, :, :start], vh[:, :, :start], scaling, False)
        out[:, h * g : (h + 1) * g] = merge_partials(o1, lse1, o2, lse2)
    return out


def whole_layer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal attention of all ``L`` queries to the ``L`` keys in one call (torch picks the kernel).

    ``q [B, Hq, L, D]``, ``k, v [B, Hkv, L, D]`` -> ``[B, Hq, L, D]``. Grouped KV heads are not repeated.
    """
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scaling: float
) -> torch.Tensor:
    """One new query per row against a static cache.

    Args:
        q: ``[B, Hq, 1, D]`` post-RoPE queries.
        keys, values: ``[B, Hkv, cap, D]`` the layer's cache buffers.
        bias: ``[B, Hkv, cap]`` (per KV head) or ``[B, cap]`` fp32 additive mask (0 attend,
            -inf skip).
        scaling: logit scale.

    Returns:
        ``[B, 1, Hq * D]`` attention output, ready for ``o_proj``.
    """
    b, hq, _, d = q.shape
    hkv = keys.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d)  # query head h = kv * G + g, as repeat_kv orders them
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * scaling  # [B, Hkv, G, cap]
    scores = scores + (bias[:, :, None, :] if bias.dim() == 3 else bias[:, None, None, :])
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    out = torch.matmul(probs, values)  # [B, Hkv, G, D]
    return out.reshape(b, 1, hq * d)


def decode_attention_ref(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Float64 twin of :func:`decode_attention` (KV repeated per query head, explicit mask)."""
    b, hq, _, d = q.shape
    groups = hq // keys.shape[1]
    k = _repeat_kv(keys.double(), groups)
    v = _repeat_kv(values.double(), groups)
    head_bias = bias.double().repeat_interleave(groups, dim=1) if bias.dim() == 3 else bias.double()[:, None]
    scores = torch.matmul(q.double(), k.transpose(-1, -2)) * scaling + head_bias[:, :, None, :]
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [B, Hq, 1, D]
    return out.transpose(1, 2).reshape(b, 1, hq * d).to(q.dtype)
