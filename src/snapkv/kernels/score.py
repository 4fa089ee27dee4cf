"""Triton kernel: GQA-reduced SnapKV window votes (paper steps 1-3) without the probabilities.

Computes ``reduce_gqa(window_votes(q_win, keys, key_valid, ...), Hkv, mode)`` (the torch twin
in :mod:`snapkv.kernels.ref`) in three launches, never holding ``heads x w x L`` probabilities:

1. ``_row_stats_kernel``: each window query row's max and sum of ``exp`` over its keys
   (online softmax over key blocks), split along the keys so that a long prompt fills the
   GPU. Grid ``(splits, row blocks, B * Hkv)``. The ``G`` query heads of one KV head are
   stacked along the rows (``G * w`` rows), so a key block is loaded once for the group.
2. ``_combine_kernel``: merges the per-split statistics into the row max and ``1 / sum``.
3. ``_votes_kernel``: per key block, ``exp(logit - max) / sum`` summed over the window
   rows and reduced over the group (mean over the heads, or max over the heads of each
   head's window sum). Grid ``(key blocks, B * Hkv)``; writes ``[B, Hkv, L]`` fp32.

Logits are fp32 (``tl.dot`` accumulates in fp32; fp32 inputs use IEEE products, not TF32)
and kept in base-2 units (``exp2``). Window query ``i`` sits at position ``L - w + i`` and
sees keys ``<= L - w + i``; padding keys (``key_valid`` False) get no vote. A row that sees
no key votes 0, as in the torch twin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from snapkv.kernels.device import on_device, same_device

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 512


@triton.jit
def _logits_log2(q, kt, scale, softcap, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr):
    """``q [M, D] @ kt [D, N]`` scaled, soft-capped, in base-2 units: ``[M, N]`` fp32."""
    if IEEE:
        s = tl.dot(q, kt, input_precision="ieee") * scale
    else:
        s = tl.dot(q, kt) * scale
    if HAS_SOFTCAP:
        x = s / softcap
        t = tl.exp(-2.0 * tl.abs(x))  # tanh(|x|) = (1 - t) / (1 + t), no overflow
        th = (1.0 - t) / (1.0 + t)
        s = tl.where(x < 0, -th, th) * softcap
    return s * 1.4426950408889634


@triton.jit
def _load_rows(q_ptr, b, hkv, rows, row_ok, w, G, D, sq_b, sq_h, sq_w, offs_d, CAST_F32: tl.constexpr):
    """Rows of the stacked group (row ``r`` is head ``r // w``, window slot ``r % w``): ``[M, BLOCK_D]``."""
    i = rows % w
    head = (hkv * G + rows // w).to(tl.int64)
    ptrs = q_ptr + b.to(tl.int64) * sq_b + head[:, None] * sq_h + i[:, None].to(tl.int64) * sq_w + offs_d[None, :]
    q = tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if CAST_F32:
        q = q.to(tl.float32)
    return q, i


@triton.jit
def _load_keys_t(k_ptr, b, hkv, keys_n, in_range, D, sk_b, sk_h, sk_l, offs_d, CAST_F32: tl.constexpr):
    """Keys ``keys_n`` of one KV head, transposed: ``[BLOCK_D, N]``."""
    base = k_ptr + b.to(tl.int64) * sk_b + hkv.to(tl.int64) * sk_h
    ptrs = base + keys_n[None, :].to(tl.int64) * sk_l + offs_d[:, None]
    kt = tl.load(ptrs, mask=in_range[None, :] & (offs_d[:, None] < D), other=0.0)
    if CAST_F32:
        kt = kt.to(tl.float32)
    return kt


@triton.jit
def _key_ok(valid_ptr, b, keys_n, in_range, sv_b, sv_l, HAS_VALID: tl.constexpr):
    """In range and not padding: ``[N]`` bool."""
    ok = in_range
    if HAS_VALID:
        v = tl.load(valid_ptr + b.to(tl.int64) * sv_b + keys_n.to(tl.int64) * sv_l, mask=in_range, other=0)
        ok = ok & (v != 0)
    return ok


@triton.jit
def _row_stats_kernel(
    q_ptr, k_ptr, valid_ptr, m_part_ptr, l_part_ptr,
    L, w, G, Hkv, D, n_rows, blocks_per_split, n_splits,
    sq_b, sq_h, sq_w, sk_b, sk_h, sk_l, sv_b, sv_l,
    scale, softcap,
    HAS_VALID: tl.constexpr, HAS_SOFTCAP: tl.constexpr, CAST_F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Pass 1: row max and sum of exp2 (base 2) over one split of the keys -> ``[B*Hkv, S, G*w]``."""
    split = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(2)
    b = bh // Hkv
    hkv = bh % Hkv
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    q, i = _load_rows(q_ptr, b, hkv, rows, row_ok, w, G, D, sq_b, sq_h, sq_w, offs_d, CAST_F32)
    q_pos = L - w + i  # [BLOCK_M] absolute position of each window query
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    lsum = tl.zeros([BLOCK_M], tl.float32)
    start = split * blocks_per_split * BLOCK_N
    for kb in range(blocks_per_split):  # the last split may run past L: masked
        keys_n = start + kb * BLOCK_N + offs_n
        in_range = keys_n < L
        kt = _load_keys_t(k_ptr, b, hkv, keys_n, in_range, D, sk_b, sk_h, sk_l, offs_d, CAST_F32)
        s = _logits_log2(q, kt, scale, softcap, HAS_SOFTCAP, IEEE)  # [BLOCK_M, BLOCK_N]
        ok = _key_ok(valid_ptr, b, keys_n, in_range, sv_b, sv_l, HAS_VALID)
        allowed = ok[None, :] & (keys_n[None, :] <= q_pos[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
        lsum = lsum * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m = m_new
    offs = (bh.to(tl.int64) * n_splits + split) * n_rows + rows
    tl.store(m_part_ptr + offs, m, mask=row_ok)
    tl.store(l_part_ptr + offs, lsum, mask=row_ok)


@triton.jit
def _combine_kernel(m_part_ptr, l_part_ptr, m_ptr, inv_ptr, n_rows, n_splits, BLOCK_R: tl.constexpr):
    """Merge split statistics: row max (0 for a row with no key) and ``1 / sum`` (0 likewise)."""
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    part = bh.to(tl.int64) * n_splits * n_rows + rows
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in range(n_splits):
        m = tl.maximum(m, tl.load(m_part_ptr + part + s * n_rows, mask=row_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    lsum = tl.zeros([BLOCK_R], tl.float32)
    for s in range(n_splits):
        m_s = tl.load(m_part_ptr + part + s * n_rows, mask=row_ok, other=float("-inf"))
        l_s = tl.load(l_part_ptr + part + s * n_rows, mask=row_ok, other=0.0)
        lsum += l_s * tl.exp2(m_s - m_safe)
    inv = tl.where(lsum > 0, 1.0 / tl.where(lsum > 0, lsum, 1.0), 0.0)
    out = bh.to(tl.int64) * n_rows + rows
    tl.store(m_ptr + out, m_safe, mask=row_ok)
    tl.store(inv_ptr + out, inv, mask=row_ok)


@triton.jit
def _votes_kernel(
    q_ptr, k_ptr, valid_ptr, m_ptr, inv_ptr, out_ptr,
    L, w, G, Hkv, D, n_rows, n_segs, seg_len,
    sq_b, sq_h, sq_w, sk_b, sk_h, sk_l, sv_b, sv_l, so_b, so_h,
    scale, softcap,
    MAX_REDUCE: tl.constexpr, HAS_VALID: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    CAST_F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Pass 2: one key block's votes, summed over window rows and reduced over the group.

    The stacked rows are cut into ``n_segs`` segments of ``seg_len`` rows: one segment of all
    ``G * w`` rows for the mean, one per head for the max.
    """
    keys_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(1)
    b = bh // Hkv
    hkv = bh % Hkv
    offs_d = tl.arange(0, BLOCK_D)
    in_range = keys_n < L
    kt = _load_keys_t(k_ptr, b, hkv, keys_n, in_range, D, sk_b, sk_h, sk_l, offs_d, CAST_F32)
    ok = _key_ok(valid_ptr, b, keys_n, in_range, sv_b, sv_l, HAS_VALID)
    out = tl.zeros([BLOCK_N], tl.float32)  # votes are >= 0, so 0 also starts the max
    for seg in range(n_segs):
        acc = tl.zeros([BLOCK_N], tl.float32)
        for r0 in range(0, seg_len, BLOCK_M):
            local = r0 + tl.arange(0, BLOCK_M)
            row_ok = local < seg_len
            rows = seg * seg_len + local
            q, i = _load_rows(q_ptr, b, hkv, rows, row_ok, w, G, D, sq_b, sq_h, sq_w, offs_d, CAST_F32)
            stat = bh.to(tl.int64) * n_rows + rows
            m = tl.load(m_ptr + stat, mask=row_ok, other=0.0)
            inv = tl.load(inv_ptr + stat, mask=row_ok, other=0.0)
            s = _logits_log2(q, kt, scale, softcap, HAS_SOFTCAP, IEEE)  # [BLOCK_M, BLOCK_N]
            allowed = row_ok[:, None] & ok[None, :] & (keys_n[None, :] <= (L - w + i)[:, None])
            p = tl.exp2(tl.where(allowed, s - m[:, None], float("-inf"))) * inv[:, None]
            acc += tl.sum(p, 0)
        if MAX_REDUCE:
            out = tl.maximum(out, acc)
        else:
            out += acc
    if not MAX_REDUCE:
        out = out / G
    tl.store(out_ptr + b.to(tl.int64) * so_b + hkv.to(tl.int64) * so_h + keys_n, out, mask=in_range)


def _is_interpreted() -> bool:
    return not isinstance(_votes_kernel, triton.runtime.JITFunction)


def _block(n: int, lo: int, hi: int) -> int:
    return min(hi, max(lo, triton.next_power_of_2(n)))


def _default_splits(n_key_blocks: int, programs: int, device: torch.device) -> int:
    """Splits along the keys so pass 1 gives ~4 programs per SM, each >= 8 key blocks."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    want = triton.cdiv(4 * sms, programs)
    return max(1, min(want, triton.cdiv(n_key_blocks, 8)))


def _check(
    q_win: torch.Tensor,
    keys: torch.Tensor,
    key_valid: torch.Tensor | None,
    softcap: float | None,
    gqa_reduce: str,
    out: torch.Tensor | None,
) -> None:
    """Raise ValueError naming the first input the kernel cannot take."""
    for name, t in (("q_win", q_win), ("keys", keys)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got {getattr(t, 'shape', type(t))}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype must be one of {_DTYPES}, got {t.dtype}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along head_dim (stride(-1) == 1), got {t.stride()}")
    if q_win.device != keys.device:
        raise ValueError(f"q_win is on {q_win.device} but keys on {keys.device}")
    b, hq, w, d = q_win.shape
    bk, hkv, length, dk = keys.shape
    if b != bk:
        raise ValueError(f"batch of q_win ({b}) and keys ({bk}) differ")
    if d != dk:
        raise ValueError(f"head_dim of q_win ({d}) and keys ({dk}) differ")
    if not 1 <= d <= _MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {_MAX_HEAD_DIM}], got {d}")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a positive multiple of KV heads ({hkv})")
    if w < 1:
        raise ValueError(f"window (q_win.shape[2]) must be >= 1, got {w}")
    if key_valid is not None:
        if key_valid.dtype != torch.bool or tuple(key_valid.shape) != (b, length):
            raise ValueError(f"key_valid must be bool [{b}, {length}], got {key_valid.dtype} {tuple(key_valid.shape)}")
        if key_valid.device != keys.device:
            raise ValueError(f"key_valid is on {key_valid.device} but keys on {keys.device}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if gqa_reduce not in ("mean", "max"):
        raise ValueError(f"gqa_reduce must be 'mean' or 'max', got {gqa_reduce!r}")
    if out is not None:
        if out.dtype != torch.float32 or tuple(out.shape) != (b, hkv, length) or out.device != keys.device:
            raise ValueError(
                f"out must be float32 [{b}, {hkv}, {length}] on {keys.device}, got {out.dtype} "
                f"{tuple(out.shape)} on {out.device}"
            )
        if length > 1 and out.stride(-1) != 1:
            raise ValueError(f"out must be contiguous along the sequence, got strides {out.stride()}")
    if keys.device.type != "cuda" and not _is_interpreted():
        raise ValueError(f"keys are on {keys.device}; the kernel needs CUDA (or TRITON_INTERPRET=1)")


def reduced_window_votes_triton(
    q_win: torch.Tensor,
    keys: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    *,
    scaling: float,
    softcap: float | None = None,
    gqa_reduce: str = "mean",
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """GQA-reduced window votes by the Triton kernel: ``[B, Hkv, L]`` fp32.

    Same result as ``reduce_gqa(window_votes(q_win, keys, key_valid, scaling=..., softcap=...),
    Hkv, gqa_reduce)`` without materializing the probabilities. No host sync.

    Args:
        q_win: ``[B, Hq, w, D]`` fp16/bf16/fp32 window queries, post-RoPE; any strides with
            ``stride(-1) == 1`` (a slice ``queries[:, :, -w:]`` is fine).
        keys: ``[B, Hkv, L, D]`` fp16/bf16/fp32 keys, post-RoPE, ``stride(-1) == 1``.
        key_valid: ``[B, L]`` bool, False at padding, or None.
        scaling: logit scale (usually ``D ** -0.5``).
        softcap: logit soft-cap ``c * tanh(x / c)``, or None.
        gqa_reduce: ``"mean"`` over the group's query heads, or ``"max"`` of their window sums.
        out: optional caller-owned ``[B, Hkv, L]`` fp32 output (for graph capture).
        num_splits: key splits of pass 1 (default: enough to fill the GPU).
        block_n: keys per block (default 64, 32 for head_dim > 128).

    Raises:
        ValueError: naming the input (dtype, device, shape, stride) the kernel cannot take.
    """
    if block_n is not None and (block_n < 16 or block_n & (block_n - 1)):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    _check(q_win, keys, key_valid, softcap, gqa_reduce, out)
    with on_device(same_device(q_win=q_win, keys=keys, key_valid=key_valid, out=out)):
        return _launch_votes(q_win, keys, key_valid, scaling, softcap, gqa_reduce, out, num_splits, block_n)


def _launch_votes(
    q_win: torch.Tensor,
    keys: torch.Tensor,
    key_valid: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
    gqa_reduce: str,
    out: torch.Tensor | None,
    num_splits: int | None,
    block_n: int | None,
) -> torch.Tensor:
    b, hq, w, d = q_win.shape
    _, hkv, length, _ = keys.shape
    g = hq // hkv
    if out is None:
        out = torch.empty((b, hkv, length), dtype=torch.float32, device=keys.device)
    if out.numel() == 0:
        return out
    n_rows = g * w
    block_d = _block(d, 16, _MAX_HEAD_DIM)
    # Same half dtype: native tensor-core dot with fp32 accumulation. Otherwise both sides go to
    # fp32 with an IEEE dot. The interpreter keeps bf16 as raw uint16 bits that its dot would
    # multiply as integers, so interpreted runs always cast.
    same_half = q_win.dtype == keys.dtype and q_win.dtype != torch.float32
    f32_dot = not same_half or _is_interpreted()
    # Tiles shrink as head_dim grows so that the staged q / k tiles fit in shared memory.
    block_n = block_n or max(16, 8192 // max(block_d, 128))  # 64, 32 (D=256), 16 (D=512)
    block_m_cap = max(16, (8192 if f32_dot else 16384) // max(block_d, 128))  # rows per tile, <= 64
    block_m_cap = min(64, block_m_cap)
    num_warps = 8 if block_d >= 256 else 4
    flags = dict(
        HAS_VALID=key_valid is not None,
        HAS_SOFTCAP=softcap is not None,
        CAST_F32=f32_dot,
        IEEE=f32_dot,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )
    valid = key_valid.view(torch.uint8) if key_valid is not None else out  # dummy pointer when None
    sv = (key_valid.stride(0), key_valid.stride(1)) if key_valid is not None else (0, 0)
    cap = float(softcap) if softcap is not None else 1.0
    sq, sk = q_win.stride()[:3], keys.stride()[:3]

    # Pass 1: split row statistics.
    block_m1 = _block(n_rows, 16, block_m_cap)
    row_blocks = triton.cdiv(n_rows, block_m1)
    n_kb = triton.cdiv(length, block_n)
    splits = num_splits or _default_splits(n_kb, b * hkv * row_blocks, keys.device)
    per_split = triton.cdiv(n_kb, max(1, min(splits, n_kb)))
    splits = triton.cdiv(n_kb, per_split)
    m_part = torch.empty((b * hkv, splits, n_rows), dtype=torch.float32, device=keys.device)
    l_part = torch.empty_like(m_part)
    _row_stats_kernel[(splits, row_blocks, b * hkv)](
        q_win, keys, valid, m_part, l_part,
        length, w, g, hkv, d, n_rows, per_split, splits,
        *sq, *sk, *sv, float(scaling), cap,
        BLOCK_M=block_m1, num_warps=num_warps, **flags,
    )  # fmt: skip

    # Combine the splits.
    row_max = torch.empty((b * hkv, n_rows), dtype=torch.float32, device=keys.device)
    inv_sum = torch.empty_like(row_max)
    block_r = _block(n_rows, 16, 256)
    _combine_kernel[(b * hkv, triton.cdiv(n_rows, block_r))](
        m_part, l_part, row_max, inv_sum, n_rows, splits, BLOCK_R=block_r
    )

    # Pass 2: votes per key block.
    max_reduce = gqa_reduce == "max"
    n_segs, seg_len = (g, w) if max_reduce else (1, n_rows)
    _votes_kernel[(n_kb, b * hkv)](
        q_win, keys, valid, row_max, inv_sum, out,
        length, w, g, hkv, d, n_rows, n_segs, seg_len,
        *sq, *sk, *sv, out.stride(0), out.stride(1), float(scaling), cap,
        MAX_REDUCE=max_reduce, BLOCK_M=_block(seg_len, 16, block_m_cap), num_warps=num_warps, **flags,
    )  # fmt: skip
    return out
