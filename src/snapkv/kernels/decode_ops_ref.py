"""Torch twins of :mod:`snapkv.kernels.decode_ops`, written as transformers' Llama modules compute.

No Triton import: these run anywhere, and are what the fused decode path is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_rmsnorm_ref(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """``x += delta`` in place (when given), then ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``."""
    if delta is not None:
        x.add_(delta)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_append_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    write_pos: torch.Tensor,
) -> torch.Tensor:
    """Same contract as :func:`snapkv.kernels.decode_ops.rope_append` (``index_copy_`` into the caches)."""
    b, d = cos.shape
    q_rot, k_rot = rope_qk(q, k, cos, sin)
    k_cache.index_copy_(2, write_pos, k_rot[:, :, None, :])
    v_cache.index_copy_(2, write_pos, v.view(b, -1, d)[:, :, None, :])
    return q_rot


def rope_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated queries ``[B, Hq, D]`` and keys ``[B, Hkv, D]`` of projections ``[B, H * D]`` (``cos, sin [B, D]``)."""
    b, d = cos.shape
    c, s = cos[:, None, :], sin[:, None, :]  # [B, 1, D]
    qh, kh = q.view(b, -1, d), k.view(b, -1, d)
    return (qh * c) + (_rotate_half(qh) * s), (kh * c) + (_rotate_half(kh) * s)


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``."""
    return F.silu(gate) * up
