"""The fused decode step: three element-wise kernels and one attention kernel per layer.

Same arithmetic as :func:`snapkv.generation.decode.decode_one_token` (transformers' Llama layer),
organised so that each layer launches 13 kernels instead of ~48:

    h  = add_rmsnorm(x, mlp_out_prev)         x += previous MLP output; input RMSNorm
    q, k, v = q_proj(h), k_proj(h), v_proj(h)   one GEMM over a shared q/k/v buffer on CUDA (projections.py)
    q  = rope_append(q, k, v, cache)          RoPE; rotated k and v written at write_pos
    o  = ragged decode attention(q, cache)    one pass over the row's kept + new tokens
    h2 = add_rmsnorm(x, o_proj(o))            x += attention output; post-attention RMSNorm
    mlp_out = down_proj(silu_mul(gate_proj(h2), up_proj(h2)))   gate/up likewise one GEMM

:class:`FusedOps` holds either the Triton kernels (CUDA) or their torch twins, so the very same
step runs, and is tested, on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from snapkv.generation.adapter import DecoderParts
from snapkv.generation.attention import decode_attention
from snapkv.generation.projections import FusedProjections
from snapkv.generation.static_cache import StaticKVCache
from snapkv.kernels.decode_ops_ref import add_rmsnorm_ref, rope_append_ref, silu_mul_ref


@dataclass(frozen=True)
class FusedOps:
    """The four operations the fused step needs, as kernels or as torch twins."""

    add_rmsnorm: Callable[..., torch.Tensor]
    rope_append: Callable[..., torch.Tensor]
    silu_mul: Callable[..., torch.Tensor]
    attention: Callable[[torch.Tensor, StaticKVCache, int, float], torch.Tensor]
    name: str


def _attention_twin(q: torch.Tensor, cache: StaticKVCache, layer: int, scaling: float) -> torch.Tensor:
    b, hq, d = q.shape
    out = decode_attention(q[:, :, None], cache.keys[layer], cache.values[layer], cache.bias[layer], scaling)
    return out.view(b, hq, d)


def _attention_kernel(q: torch.Tensor, cache: StaticKVCache, layer: int, scaling: float) -> torch.Tensor:
    from snapkv.kernels.decode_ragged import ragged_decode_attention

    d = q.shape[-1]
    return ragged_decode_attention(
        q, cache.keys[layer].view(-1, d), cache.values[layer].view(-1, d), cache.starts[layer],
        cache.lengths[layer], max_len=cache.capacity, sm_scale=scaling,
        work_tokens=max(1, cache.layer_tokens(layer)),  # splits sized on the kept tokens, not the padded slots
    )


def _attention_ragged_twin(q: torch.Tensor, cache: StaticKVCache, layer: int, scaling: float) -> torch.Tensor:
    from snapkv.kernels.ragged_ref import ragged_decode_reference

    d = q.shape[-1]
    return ragged_decode_reference(q, cache.keys[layer].view(-1, d), cache.values[layer].view(-1, d),
                                   cache.starts[layer], cache.lengths[layer], scaling=scaling)


def ragged_twin_ops() -> FusedOps:
    """Torch twins, the attention reading the kernel's ragged view (``starts``, ``lengths``), not the mask.

    The reference of :func:`kernel_ops`' attention on any device (one host sync per layer).
    """
    return FusedOps(add_rmsnorm_ref, rope_append_ref, silu_mul_ref, _attention_ragged_twin, "torch twins, ragged")


def twin_ops() -> FusedOps:
    """Torch twins (any device)."""
    return FusedOps(add_rmsnorm_ref, rope_append_ref, silu_mul_ref, _attention_twin, "torch twins")


def kernel_ops() -> FusedOps:
    """Triton kernels (raises ImportError without Triton)."""
    from snapkv.kernels import decode_ops

    return FusedOps(decode_ops.add_rmsnorm, decode_ops.rope_append, decode_ops.silu_mul, _attention_kernel,
                    "triton")


def unsupported_reason(parts: DecoderParts) -> str | None:
    """Why the fused step cannot run this model (None when it can)."""
    if not parts.fusable:
        return f"{type(parts).__name__} runs the model's own decoder layers"
    d = parts.head_dim
    if d < 2 or d & (d - 1):
        return f"head_dim {d} is not a power of two"
    norms = [parts.norm]
    for layer in parts.layers:
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
    for norm in norms:
        name = type(norm).__name__
        if "RMSNorm" not in name or "Gemma" in name or not hasattr(norm, "variance_epsilon"):
            return f"norm {name} is not a plain RMSNorm"
    for i, layer in enumerate(parts.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return f"layer {i} normalises queries/keys (q_norm/k_norm)"
        if not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            return f"layer {i} has no gated MLP ({type(mlp).__name__})"
        if type(getattr(mlp, "act_fn", None)).__name__ not in ("SiLU", "SiLUActivation"):
            return f"layer {i} MLP activation is not SiLU"
    return None


def decode_one_token_fused(
    parts: DecoderParts, cache: StaticKVCache, tokens: torch.Tensor, ops: FusedOps,
    proj: FusedProjections | None = None,
) -> torch.Tensor:
    """One token per row through the model with fused operations; returns logits ``[B, V]``.

    ``proj``: q/k/v and gate/up of each layer as one GEMM each
    (:func:`~snapkv.generation.projections.fuse_projections`); None runs the modules one by one.
    """
    b = tokens.shape[0]
    if b != cache.batch:
        raise ValueError(f"decode got {b} tokens for a cache of {cache.batch} rows")
    cache.open_slot()
    x = parts.embed(tokens)  # [B, H]: the residual stream, updated in place by add_rmsnorm
    cos, sin = parts.rope(x[:, None], cache.positions[:, None])  # [B, 1, D]
    cos, sin = cos[:, 0], sin[:, 0]
    delta = None
    for li, layer in enumerate(parts.layers):
        attn, mlp = layer.self_attn, layer.mlp
        norm = layer.input_layernorm
        h = ops.add_rmsnorm(x, delta, norm.weight, norm.variance_epsilon)
        qkv = proj.qkv[li] if proj is not None else None
        q, k, v = qkv(h) if qkv is not None else (attn.q_proj(h), attn.k_proj(h), attn.v_proj(h))
        q = ops.rope_append(q, k, v, cos, sin, cache.keys[li], cache.values[li], cache.write_pos)  # [B, Hq, D]
        o = ops.attention(q, cache, li, parts.scaling)  # [B, Hq, D]
        norm = layer.post_attention_layernorm
        h = ops.add_rmsnorm(x, attn.o_proj(o.reshape(b, -1)), norm.weight, norm.variance_epsilon)
        gate_up = proj.gate_up[li] if proj is not None else None
        gate, up = gate_up(h) if gate_up is not None else (mlp.gate_proj(h), mlp.up_proj(h))
        delta = mlp.down_proj(ops.silu_mul(gate, up))
    h = ops.add_rmsnorm(x, delta, parts.norm.weight, parts.norm.variance_epsilon)
    logits = parts.lm_head(h)  # [B, V]
    cache.advance()
    return logits
