"""Fused element-wise kernels of one decode step (Llama-family layer), with checked launchers.

A decode step of an 8B model reads 16 GB of weights in about 5 ms; in eager torch each layer
also launches ~35 tiny kernels (RMSNorm alone is 8), which cost more than the attention. These
three kernels cut them to three per layer, with transformers' arithmetic and roundings:

* :func:`add_rmsnorm`: ``x += delta`` (optional, in place), then ``w * bf16(x * rsqrt(mean(x^2) + eps))``;
* :func:`rope_append`: RoPE on the new queries and keys (``x * cos + rotate_half(x) * sin``, each
  product rounded as torch rounds it), and the rotated key and the value written into slot
  ``write_pos`` of the static cache;
* :func:`silu_mul`: ``silu(gate) * up``.

Torch twins: :mod:`snapkv.kernels.decode_ops_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from snapkv.kernels.device import on_device, same_device

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _add_rmsnorm_kernel(X, Delta, W, Out, H, eps, sx, sd, so, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x = tl.load(X + row * sx + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(Delta + row * sd + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(X + row * sx + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / H
    y = (xf * tl.rsqrt(var + eps)).to(X.dtype.element_ty)
    w = tl.load(W + offs, mask=mask, other=0.0)
    tl.store(Out + row * so + offs, (y.to(tl.float32) * w.to(tl.float32)).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _rotate(x_ptr, offs, rot, sign, cos, sin, OUT_TY: tl.constexpr):
    x = tl.load(x_ptr + offs).to(tl.float32)
    xr = tl.load(x_ptr + rot).to(tl.float32)
    a = (x * cos).to(OUT_TY).to(tl.float32)
    b = (sign * xr * sin).to(OUT_TY).to(tl.float32)
    return (a + b).to(OUT_TY)


@triton.jit
def _rope_append_kernel(
    Q, K, V, Cos, Sin, QOut, KC, VC, WritePos,
    sqb, skb, svb, scb, sob, soh, skcb, skch, skcs, svcb, svch, svcs,
    HQ: tl.constexpr, D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)  # 0 .. HQ-1: a query head; HQ ..: a KV head
    half: tl.constexpr = D // 2
    offs = tl.arange(0, D)
    rot = tl.where(offs < half, offs + half, offs - half)
    sign = tl.where(offs < half, -1.0, 1.0)
    cos = tl.load(Cos + b * scb + offs).to(tl.float32)
    sin = tl.load(Sin + b * scb + offs).to(tl.float32)
    if h < HQ:
        out = _rotate(Q + b * sqb + h * D, offs, rot, sign, cos, sin, QOut.dtype.element_ty)
        tl.store(QOut + b * sob + h * soh + offs, out)
    else:
        kh = h - HQ
        pos = tl.load(WritePos)
        k = _rotate(K + b * skb + kh * D, offs, rot, sign, cos, sin, KC.dtype.element_ty)
        tl.store(KC + b * skcb + kh * skch + pos * skcs + offs, k)
        v = tl.load(V + b * svb + kh * D + offs)
        tl.store(VC + b * svcb + kh * svch + pos * svcs + offs, v)


@triton.jit
def _silu_mul_kernel(G, U, Out, N, sg, su, so, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(G + row * sg + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * su + offs, mask=mask, other=0.0).to(tl.float32)
    s = (g * tl.sigmoid(g)).to(Out.dtype.element_ty).to(tl.float32)
    tl.store(Out + row * so + offs, (s * u).to(Out.dtype.element_ty), mask=mask)


def _check_rows(name: str, t: torch.Tensor, rows: int, width: int, dtype: torch.dtype) -> None:
    if t.dim() != 2 or tuple(t.shape) != (rows, width):
        raise ValueError(f"{name} must be [{rows}, {width}], got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if width > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous along its last dimension, got strides {t.stride()}")


def add_rmsnorm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x += delta`` in place (when given), then RMSNorm of ``x`` into ``out``: ``[R, H]`` each."""
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype must be one of {_DTYPES}, got {x.dtype}")
    r, h = x.shape
    _check_rows("x", x, r, h, x.dtype)
    if delta is not None:
        _check_rows("delta", delta, r, h, x.dtype)
    if weight.shape != (h,) or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous [{h}] tensor, got {tuple(weight.shape)}")
    out = torch.empty_like(x) if out is None else out
    _check_rows("out", out, r, h, x.dtype)
    block = triton.next_power_of_2(h)
    with on_device(same_device(x=x, delta=delta, weight=weight, out=out)):
        _add_rmsnorm_kernel[(r,)](
            x, delta if delta is not None else x, weight, out, h, float(eps),
            x.stride(0), delta.stride(0) if delta is not None else 0, out.stride(0),
            HAS_DELTA=delta is not None, BLOCK=block, num_warps=8 if block >= 2048 else 4,
        )
    return out


def rope_append(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    write_pos: torch.Tensor,
) -> torch.Tensor:
    """Rotated queries ``[B, Hq, D]``; rotated keys and values written into the caches at ``write_pos``.

    Args:
        q: ``[B, Hq * D]`` query projections; k, v: ``[B, Hkv * D]`` key and value projections.
        cos, sin: ``[B, D]`` the rotary tables of each row's position (any row stride).
        k_cache, v_cache: ``[B, Hkv, cap, D]`` one layer's cache buffers (head dim contiguous).
        write_pos: ``[1]`` int64 device tensor, the slot to write.
    """
    b, d = cos.shape
    hkv = k_cache.shape[1]
    if d & (d - 1) or d < 2:
        raise ValueError(f"head_dim must be a power of two >= 2, got {d}")
    if q.shape[0] != b or q.shape[1] % d:
        raise ValueError(f"q must be [{b}, Hq * {d}], got {tuple(q.shape)}")
    hq = q.shape[1] // d
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_rows(name, t, b, t.shape[1], k_cache.dtype)
    if k.shape[1] != hkv * d or v.shape[1] != hkv * d:
        raise ValueError(f"k and v must be [{b}, {hkv * d}], got {tuple(k.shape)}, {tuple(v.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        _check_rows(name, t, b, d, q.dtype)
    if cos.stride() != sin.stride():
        raise ValueError("cos and sin must share strides")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4 or t.shape[0] != b or t.shape[1] != hkv or t.shape[3] != d or t.stride(3) != 1:
            raise ValueError(f"{name} must be [{b}, {hkv}, cap, {d}] with a contiguous head dim, got {tuple(t.shape)}")
    if write_pos.dtype != torch.int64 or write_pos.numel() != 1 or write_pos.device != q.device:
        raise ValueError("write_pos must be a one-element int64 tensor on the inputs' device")
    q_out = torch.empty((b, hq, d), dtype=q.dtype, device=q.device)
    same_device(q=q, k=k, v=v, cos=cos, sin=sin, k_cache=k_cache, v_cache=v_cache, write_pos=write_pos)
    with on_device(q.device):
        _rope_append_kernel[(b, hq + hkv)](
            q, k, v, cos, sin, q_out, k_cache, v_cache, write_pos,
            q.stride(0), k.stride(0), v.stride(0), cos.stride(0), q_out.stride(0), q_out.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            HQ=hq, D=d, num_warps=1 if d <= 128 else 2,
        )
    return q_out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``[R, N]`` inputs (SwiGLU's element-wise part)."""
    r, n = gate.shape
    if gate.dtype not in _DTYPES:
        raise ValueError(f"gate dtype must be one of {_DTYPES}, got {gate.dtype}")
    _check_rows("gate", gate, r, n, gate.dtype)
    _check_rows("up", up, r, n, gate.dtype)
    out = torch.empty_like(gate)
    block = 1024
    with on_device(same_device(gate=gate, up=up)):
        _silu_mul_kernel[(r, triton.cdiv(n, block))](gate, up, out, n, gate.stride(0), up.stride(0), out.stride(0),
                                                     BLOCK=block, num_warps=4)
    return out
