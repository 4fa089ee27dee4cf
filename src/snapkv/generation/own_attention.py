"""Attention for the model's own decoder layers: the kwargs they pass, prefill chunks, decode.

The engine runs a model's own layer modules (:mod:`snapkv.generation.own_layers`) with an
attention function of its own. This module holds that function's arithmetic:

* :func:`attention_settings` reads the keyword arguments a layer passes (``scaling``,
  ``softcap``, ``sliding_window``, ...) and raises on anything it cannot honour (attention
  sinks, dropout, a non-causal layer), so nothing is silently computed differently;
* :func:`chunk_attention`: the last ``c`` of ``S`` prompt positions against keys ``0 .. S-1``,
  bottom-right causal, with an optional sliding window (a query at ``p`` sees keys
  ``p - W < k <= p``, as transformers masks it) and an optional logit soft-cap;
* :func:`decode_attention_capped`: one query per row against the static cache's buffers with
  an additive bias and a soft-cap (the plain case is
  :func:`snapkv.generation.attention.decode_attention`).

Grouped query heads are folded into rows of one product (``[B, Hkv, G * c, D]``), so KV is
never repeated where the arithmetic is ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from snapkv.generation.attention import causal_chunk_attention

#: Keyword arguments a layer may pass that change nothing here (checked or unused).
_IGNORED = frozenset({"position_ids", "output_attentions", "use_cache", "cache_position"})

#: Bytes of fp32 logits one soft-capped chunk product may materialise at once.
LOGIT_BYTES = 256 * 1024**2


@dataclass(frozen=True, slots=True)
class AttentionSettings:
    """What one attention call asks for: logit scale, soft-cap and sliding window (or None)."""

    scaling: float
    softcap: float | None
    sliding_window: int | None


def attention_settings(module: torch.nn.Module, kwargs: dict[str, Any]) -> AttentionSettings:
    """The settings of one call, from the layer's kwargs; raises on what the engine cannot do."""
    unknown = {k: v for k, v in kwargs.items() if k not in _IGNORED and k not in
               ("scaling", "softcap", "sliding_window", "dropout", "is_causal") and v is not None}
    if "s_aux" in unknown or "sinks" in unknown:
        raise ValueError(f"{type(module).__name__} uses attention sinks, which the engine does not support")
    if unknown:
        raise ValueError(
            f"{type(module).__name__} passes attention arguments the engine does not honour: {sorted(unknown)}"
        )
    if float(kwargs.get("dropout") or 0.0) != 0.0:
        raise ValueError("attention dropout must be 0 (put the model in eval mode)")
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        raise ValueError(f"{type(module).__name__} is not causal (bidirectional attention is not supported)")
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = getattr(module, "scaling", None) or module.head_dim**-0.5
    softcap = kwargs.get("softcap")
    window = kwargs.get("sliding_window")
    return AttentionSettings(float(scaling), None if softcap is None else float(softcap),
                             None if window is None else int(window))


def _capped_logits(q: torch.Tensor, k: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
    """fp32 ``q @ k^T * scaling`` (soft-capped as transformers does): ``[B, Hkv, R, S]``."""
    logits = torch.matmul(q, k.transpose(-1, -2)).float() * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _band(q_lo: int, q_hi: int, k_lo: int, window: int | None, device: torch.device) -> torch.Tensor:
    """``[q_hi - q_lo, S']`` bool: query position ``p`` sees key ``j`` (``j >= k_lo``) iff ``p - W < j <= p``."""
    q_pos = torch.arange(q_lo, q_hi, device=device)[:, None]
    k_pos = torch.arange(k_lo, q_hi, device=device)[None, :]
    allowed = k_pos <= q_pos
    return allowed & (k_pos > q_pos - window) if window is not None else allowed


def window_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                         window: int) -> torch.Tensor:
    """The reference twin of :func:`window_attention`: one masked call over every key a query may see."""
    c, s, g = q.shape[-2], k.shape[-2], q.shape[1] // k.shape[1]
    lo = max(0, s - c - window + 1)
    kk, vv = k[:, :, lo:].repeat_interleave(g, dim=1), v[:, :, lo:].repeat_interleave(g, dim=1)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=_band(s - c, s, lo, window, q.device), scale=scaling)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, window: int,
                     block: int | None = None) -> torch.Tensor:
    """Bottom-right causal sliding-window attention of the last ``c`` of ``S`` positions, by query blocks.

    A query at ``p`` sees keys ``p - W < j <= p``. Each block of ``block`` queries (default
    ``max(W, 256)``) attends to its own positions and the ``W - 1`` before them only, so the work
    is ``c * (block + W)`` logits instead of the ``c * (c + W)`` of one masked call over the chunk
    (:func:`window_attention_ref`, its twin); a 8192-query chunk with a 1024 window does 4.5x less.

    ``q [B, Hq, c, D]``, ``k, v [B, Hkv, S, D]`` -> ``[B, Hq, c, D]``.
    """
    b, hq, c, d = q.shape
    s, g = k.shape[-2], hq // k.shape[1]
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"block must be None (max(window, 256)) or an integer >= 1, got {block!r}")
    block = max(window, 256) if block is None else block
    if block >= c:
        return window_attention_ref(q, k, v, scaling, window)
    out = torch.empty_like(q)
    for r0 in range(0, c, block):
        r1 = min(c, r0 + block)
        a, e = s - c + r0, s - c + r1  # the block's query positions
        lo = max(0, a - window + 1)
        kk = k[:, :, lo:e].repeat_interleave(g, dim=1)  # at most block + W - 1 keys
        vv = v[:, :, lo:e].repeat_interleave(g, dim=1)
        mask = _band(a, e, lo, window, q.device)
        out[:, :, r0:r1] = F.scaled_dot_product_attention(q[:, :, r0:r1], kk, vv, attn_mask=mask, scale=scaling)
    return out


def chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    settings: AttentionSettings,
    backend: str = "ref",
) -> torch.Tensor:
    """Attention of the last ``c`` of ``S`` positions, bottom-right causal, window and cap applied.

    Args:
        q: ``[B, Hq, c, D]`` post-RoPE queries of positions ``S - c .. S - 1``.
        k, v: ``[B, Hkv, S, D]`` post-RoPE keys and values of positions ``0 .. S - 1``.
        settings: scale, soft-cap and sliding window.
        backend: prefill backend of :func:`~snapkv.generation.attention.causal_chunk_attention`
            for the plain case (no cap, no window).

    Returns:
        ``[B, Hq, c, D]`` in ``q``'s dtype.
    """
    if settings.softcap is None and settings.sliding_window is None:
        return causal_chunk_attention(q, k, v, settings.scaling, backend)
    if settings.softcap is None:  # a window only
        return window_attention(q, k, v, settings.scaling, settings.sliding_window)
    b, hq, c, d = q.shape
    hkv, s = k.shape[1], k.shape[-2]
    w = settings.sliding_window
    lo = 0 if w is None else max(0, s - c - w + 1)  # keys no query of the chunk can see are skipped
    k, v = k[:, :, lo:], v[:, :, lo:]
    allowed = _band(s - c, s, lo, w, q.device)  # [c, S']
    g = hq // hkv
    out = torch.empty_like(q)
    qg = q.view(b, hkv, g, c, d)
    rows = max(1, LOGIT_BYTES // max(1, 4 * b * hq * k.shape[-2]))  # queries per product
    for r0 in range(0, c, rows):
        r1 = min(c, r0 + rows)
        part = qg[:, :, :, r0:r1].reshape(b, hkv, g * (r1 - r0), d)
        logits = _capped_logits(part, k, settings.scaling, settings.softcap).view(b, hkv, g, r1 - r0, -1)
        logits = logits.masked_fill(~allowed[r0:r1], float("-inf"))
        probs = torch.softmax(logits, dim=-1).to(v.dtype).view(b, hkv, g * (r1 - r0), -1)
        out[:, :, r0:r1] = torch.matmul(probs, v).view(b, hkv, g, r1 - r0, d).reshape(b, hq, r1 - r0, d)
    return out


def decode_attention_capped(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, scaling: float, softcap: float
) -> torch.Tensor:
    """One query per row against a static cache with soft-capped logits.

    ``q [B, Hq, 1, D]``, ``keys, values [B, Hkv, cap, D]``, ``bias [B, Hkv, cap]`` fp32 additive
    mask -> ``[B, 1, Hq * D]`` (the layout of :func:`~snapkv.generation.attention.decode_attention`).
    """
    b, hq, _, d = q.shape
    hkv = keys.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, d)
    scores = _capped_logits(qg, keys, scaling, softcap) + bias[:, :, None, :]  # [B, Hkv, G, cap]
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values).reshape(b, 1, hq * d)
