"""Decode attention over a ragged KV cache (flash-decoding, split along the sequence).

One new query token per row attends to its KV heads' segments of flat ``[S, D]`` key and
value buffers; head ``(b, h)`` owns ``starts[b, h] : starts[b, h] + lengths[b, h]``.

* Pass 1, grid ``(B * Hkv, num_splits)``: a program loads the ``G = Hq / Hkv`` query heads
  of one KV head (so K/V are read once per group, GQA) and runs an online softmax in fp32
  over one split of the segment; it writes the split's normalized output and log-sum-exp.
  Splits past a segment's end exit at once, so long heads use more programs than short ones.
* Pass 2, grid ``(B * Hq,)``: combines the splits of each query head.

The grid depends only on host ints (``B``, ``Hkv``, ``max_len``), never on the device
lengths, so one launch shape serves every step of a captured decode loop.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from snapkv.kernels.device import on_device, same_device

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: At most this many splits per head: bounds the fp32 partials at ``B * Hq * 256 * D`` floats.
MAX_SPLITS = 256
_SM_COUNT: dict[int, int] = {}


@triton.jit
def _ragged_decode_split(
    Q, K, V, Starts, Lens, MidO, MidLse,
    sm_scale, softcap,
    stride_qb, stride_qh, stride_kn, stride_vn,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    SPLIT, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    start = tl.load(Starts + pid_bh).to(tl.int64)
    length = tl.load(Lens + pid_bh)
    lo = pid_s * SPLIT
    hi = tl.minimum(lo + SPLIT, length)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < G
    d_mask = offs_d < D
    q_ptrs = Q + b * stride_qb + (h * G + offs_g)[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        rows = start + offs_n.to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K + rows[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(V + rows[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale  # [BLOCK_G, BLOCK_N] fp32
        if HAS_SOFTCAP:
            s = softcap * (2.0 * tl.sigmoid(2.0 * s / softcap) - 1.0)  # softcap * tanh(s / softcap)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    heads = h * G + offs_g
    o_ptrs = MidO + b * stride_ob + heads[:, None] * stride_oh + pid_s * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(MidLse + b * stride_lb + heads * stride_lh + pid_s, lse, mask=g_mask)


@triton.jit
def _ragged_decode_combine(
    MidO, MidLse, Out, Sinks,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh, NUM_SPLITS,
    HQ: tl.constexpr, D: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // HQ
    hq = pid % HQ
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    lse_base = MidLse + b * stride_lb + hq * stride_lh
    o_base = MidO + b * stride_ob + hq * stride_oh
    # Largest log-sum-exp over the splits, then their weighted sum, BLOCK_S splits at a time.
    m_vec = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        lse = tl.load(lse_base + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf"))
        m_vec = tl.maximum(m_vec, lse)
    m = tl.max(m_vec, 0)
    if HAS_SINKS:  # the sink logit joins the softmax's denominator (it has no value)
        sink = tl.load(Sinks + hq).to(tl.float32)
        m = tl.maximum(m, sink)
    m_safe = tl.where(m > float("-inf"), m, 0.0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    total = tl.zeros([BLOCK_S], dtype=tl.float32)
    for s0 in range(0, NUM_SPLITS, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_mask = offs_s < NUM_SPLITS
        lse = tl.load(lse_base + offs_s, mask=s_mask, other=float("-inf"))
        w = tl.where(lse > float("-inf"), tl.exp(lse - m_safe), 0.0)  # [BLOCK_S]
        o_ptrs = o_base + offs_s[:, None] * stride_os + offs_d[None, :]
        o = tl.load(o_ptrs, mask=s_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
        acc += tl.sum(o * w[:, None], 0)
        total += w
    denom = tl.sum(total, 0)
    if HAS_SINKS:
        denom += tl.exp(sink - m_safe)
    out = acc / tl.where(denom > 0.0, denom, 1.0)
    tl.store(Out + b * stride_outb + hq * stride_outh + offs_d, out.to(Out.dtype.element_ty), mask=d_mask)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> None:
    same_device(q=q, k=k, v=v, starts=starts, lengths=lengths)
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    for name, t in (("q", q), ("k", k), ("v", v), ("starts", starts), ("lengths", lengths)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}: all inputs must share a device")
    if q.device.type != "cuda" and not interp:
        raise ValueError(f"the Triton ragged decode kernel needs CUDA tensors, got {q.device} (or TRITON_INTERPRET=1)")
    if q.dim() != 3 or k.dim() != 2 or v.dim() != 2:
        shapes = f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        raise ValueError(f"expected q [B, Hq, D] and k/v [S, D], got {shapes}")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of {_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or k.shape[1] != q.shape[2]:
        raise ValueError(f"head dims differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v must be contiguous along the head dim (stride 1)")
    if starts.dim() != 2 or starts.shape != lengths.shape or starts.shape[0] != q.shape[0]:
        raise ValueError(f"starts and lengths must be [B, Hkv], got {tuple(starts.shape)}, {tuple(lengths.shape)}")
    if starts.dtype != torch.int32 or lengths.dtype != torch.int32:
        raise ValueError(f"starts and lengths must be int32, got {starts.dtype}, {lengths.dtype}")
    if not (starts.is_contiguous() and lengths.is_contiguous()):
        raise ValueError("starts and lengths must be contiguous")
    if q.shape[1] % starts.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({starts.shape[1]})")


def ragged_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    *,
    max_len: int,
    sm_scale: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    work_tokens: int | None = None,
) -> torch.Tensor:
    """One query token per row attends to its heads' ragged K/V segments.

    Args:
        q: ``[B, Hq, D]`` fp16/bf16/fp32, head dim contiguous.
        k: ``[S, D]`` flat key buffer, same dtype; v: ``[S, D]`` flat value buffer.
        starts: ``[B, Hkv]`` int32 first slot of each head's segment.
        lengths: ``[B, Hkv]`` int32 tokens in each segment (0 gives a zero output).
        max_len: host upper bound of ``lengths`` (tokens past it are not read); keep it fixed
            (e.g. the cache's capacity) so the launch grid does not change between steps.
        sm_scale: logit scale; softcap: logit soft-cap (``softcap * tanh(x / softcap)``) or None.
        sinks: ``[Hq]`` attention-sink logits (gpt-oss ``s_aux``), one extra softmax term per
            query head with no value; or None.
        num_splits: splits of the longest head (default: splits of equal length so that the
            ``work_tokens`` make about two programs per SM, at most :data:`MAX_SPLITS`).
        block_n: keys per inner block (default 64, 32 for head dims above 128).
        num_warps, num_stages: Triton launch options of the split pass (None: Triton's).
        work_tokens: host bound of the tokens all segments may hold (default ``S``, the buffer's
            rows); pass it when the buffer has much room no segment uses (a static cache sized
            for its longest head), so splits are sized on the work, not on the allocation.

    Returns:
        ``[B, Hq, D]`` in ``q``'s dtype; accumulation is fp32.
    """
    _check(q, k, v, starts, lengths)
    if sinks is not None:
        if sinks.shape != (q.shape[1],) or sinks.device != q.device:
            raise ValueError(f"sinks must be [Hq={q.shape[1]}] on {q.device}, "
                             f"got {tuple(sinks.shape)} on {sinks.device}")
        sinks = sinks.contiguous()
    if max_len < 0:
        raise ValueError(f"max_len must be >= 0, got {max_len}")
    b, hq, d = q.shape
    hkv = starts.shape[1]
    g = hq // hkv
    block_d = max(16, triton.next_power_of_2(d))
    block_n = block_n or (64 if block_d <= 128 else 32)
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    n_blocks = max(1, triton.cdiv(max_len, block_n))
    if num_splits is None:
        # Equal-length splits sized on the total work, so skewed heads still spread evenly.
        work = k.shape[0] if work_tokens is None else work_tokens
        if work < 1:
            raise ValueError(f"work_tokens must be >= 1, got {work_tokens}")
        per_split = triton.cdiv(triton.cdiv(work, 2 * _sm_count(q.device)), block_n)
        num_splits = min(MAX_SPLITS, triton.cdiv(n_blocks, max(1, per_split)))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    num_splits = min(num_splits, n_blocks)
    split = triton.cdiv(n_blocks, num_splits) * block_n
    num_splits = max(1, triton.cdiv(max_len, split))
    launch = {k_: v_ for k_, v_ in (("num_warps", num_warps), ("num_stages", num_stages)) if v_ is not None}

    mid_o = torch.empty((b, hq, num_splits, d), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((b, hq, num_splits), dtype=torch.float32, device=q.device)
    out = torch.empty((b, hq, d), dtype=q.dtype, device=q.device)
    if b == 0 or hq == 0:
        return out
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    with on_device(q.device):
        _launch(q, k, v, starts, lengths, mid_o, mid_lse, out, sm_scale, softcap, split, hkv, g, d, block_n, block_d,
                interp, num_splits, launch, sinks)
    return out


def _launch(q, k, v, starts, lengths, mid_o, mid_lse, out, sm_scale, softcap, split, hkv, g, d, block_n, block_d,
            interp, num_splits, launch, sinks) -> None:
    b, hq = q.shape[0], q.shape[1]
    _ragged_decode_split[(b * hkv, num_splits)](
        q, k, v, starts, lengths, mid_o, mid_lse,
        float(sm_scale), float(softcap or 1.0),
        q.stride(0), q.stride(1), k.stride(0), v.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        split, HKV=hkv, G=g, D=d,
        BLOCK_G=max(16, triton.next_power_of_2(g)), BLOCK_N=block_n, BLOCK_D=block_d,
        HAS_SOFTCAP=softcap is not None, UPCAST=interp and q.dtype != torch.float32,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **launch,
    )
    _ragged_decode_combine[(b * hq,)](
        mid_o, mid_lse, out, sinks if sinks is not None else mid_lse,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1), num_splits,
        HQ=hq, D=d,
        BLOCK_S=min(32, max(2, triton.next_power_of_2(num_splits))), BLOCK_D=block_d,
        HAS_SINKS=sinks is not None,
    )
