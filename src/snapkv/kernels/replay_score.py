"""Triton kernel: KVzip replay scores (max over a KV head's queries of the softmax probability).

Computes :func:`snapkv.core.replay.replay_chunk_scores` (the torch twin) for one replay chunk
without materializing the chunk's ``R x K`` logits. The chunk's ``C`` queries sit at positions
``L .. L + C - 1`` after a context of ``L`` keys; query ``i`` sees every context key and the
chunk's own keys ``<= L + i``. The ``G`` query heads of one KV head are stacked along the rows
(``G * C`` rows, row ``r`` is head ``r // C``, chunk position ``r % C``), so a key block is
loaded once for the whole group. A span-limited replay (``visible = (sink_end, lo, hi)``) sees
only the context keys ``[0, sink_end)`` and ``[lo, hi)``: both passes skip every other key
block, so a chunk costs ``O(C * (sink_end + hi - lo + C))``, not ``O(C * L)``. Two launches:

1. ``_replay_lse_kernel``: each row's log-sum-exp over every key it sees (online softmax over
   key blocks, flash style). With ``values`` it also accumulates ``softmax @ V``: the chunk's
   attention output, so the replay needs no second attention call (and no ``C x (L + C)``
   mask). Grid ``(row blocks, B * Hkv)``; writes ``[B * Hkv, G * C]`` fp32.
2. ``_replay_max_kernel``: per block of context keys, recomputes the logits of every row and
   keeps ``max_r exp(s - lse_r)``, optionally maxed into the scores of earlier chunks
   (``accumulate``). Grid ``(key blocks, B * Hkv)``; writes ``[B, Hkv, L]`` fp32.

Memory beyond the inputs: ``G * C`` floats per KV head (and the output). Logits are fp32
(``tl.dot`` accumulates in fp32; fp32 or ``fp32_logits`` inputs use IEEE products, not TF32)
and kept in base-2 units (``exp2``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from snapkv.kernels.device import on_device, same_device
from snapkv.kernels.score import _is_interpreted, _load_keys_t, _load_rows, _logits_log2

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


@triton.jit
def _lse_block(q, m, lsum, acc, k_ptr, v_ptr, b, hkv, keys_n, in_range, q_pos, D, DV, sk_b, sk_h, sk_l,
               sv_b, sv_h, sv_l, offs_d, offs_dv, scale, softcap,
               HAS_SOFTCAP: tl.constexpr, CAST_F32: tl.constexpr, IEEE: tl.constexpr, WITH_OUTPUT: tl.constexpr):
    """One key block of the online softmax: ``(m, lsum, acc)`` updated with keys ``keys_n``."""
    kt = _load_keys_t(k_ptr, b, hkv, keys_n, in_range, D, sk_b, sk_h, sk_l, offs_d, CAST_F32)
    s = _logits_log2(q, kt, scale, softcap, HAS_SOFTCAP, IEEE)  # [BLOCK_M, BLOCK_N]
    s = tl.where(in_range[None, :] & (keys_n[None, :] <= q_pos[:, None]), s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    lsum = lsum * alpha + tl.sum(p, 1)
    if WITH_OUTPUT:
        vb = v_ptr + b.to(tl.int64) * sv_b + hkv.to(tl.int64) * sv_h
        v = tl.load(vb + keys_n[:, None].to(tl.int64) * sv_l + offs_dv[None, :],
                    mask=in_range[:, None] & (offs_dv[None, :] < DV), other=0.0)
        if CAST_F32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
    return m_new, lsum, acc


@triton.jit
def _replay_lse_kernel(
    q_ptr, k_ptr, v_ptr, lse_ptr, o_ptr,
    L, C, G, Hkv, D, DV, n_rows, sink_end, lo, hi,
    sq_b, sq_h, sq_c, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, so_b, so_h, so_c,
    scale, softcap,
    HAS_SOFTCAP: tl.constexpr, CAST_F32: tl.constexpr, IEEE: tl.constexpr, WITH_OUTPUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """Pass 1: base-2 log-sum-exp of each stacked row over its visible keys (and the output).

    Visible: context keys ``[0, sink_end)`` and ``[lo, hi)`` (``0, 0, L`` for the exact replay),
    then the chunk's own keys up to the row's position; other key blocks are never loaded.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = bh // Hkv
    hkv = bh % Hkv
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    q, i = _load_rows(q_ptr, b, hkv, rows, row_ok, C, G, D, sq_b, sq_h, sq_c, offs_d, CAST_F32)
    q_pos = L + i  # [BLOCK_M] absolute position of each replay query
    total = L + C
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    lsum = tl.zeros([BLOCK_M], tl.float32)
    offs_dv = tl.arange(0, BLOCK_DV)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(0, sink_end, BLOCK_N):  # the sink
        keys_n = start + offs_n
        m, lsum, acc = _lse_block(q, m, lsum, acc, k_ptr, v_ptr, b, hkv, keys_n, keys_n < sink_end, q_pos, D, DV,
                                  sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, offs_d, offs_dv, scale, softcap,
                                  HAS_SOFTCAP, CAST_F32, IEEE, WITH_OUTPUT)
    for start in range(lo, hi, BLOCK_N):  # the window (the whole context when exact)
        keys_n = start + offs_n
        m, lsum, acc = _lse_block(q, m, lsum, acc, k_ptr, v_ptr, b, hkv, keys_n, keys_n < hi, q_pos, D, DV,
                                  sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, offs_d, offs_dv, scale, softcap,
                                  HAS_SOFTCAP, CAST_F32, IEEE, WITH_OUTPUT)
    for start in range(L, total, BLOCK_N):  # the chunk's own keys, causal
        keys_n = start + offs_n
        m, lsum, acc = _lse_block(q, m, lsum, acc, k_ptr, v_ptr, b, hkv, keys_n, keys_n < total, q_pos, D, DV,
                                  sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, offs_d, offs_dv, scale, softcap,
                                  HAS_SOFTCAP, CAST_F32, IEEE, WITH_OUTPUT)
    # Every row sees at least its own key, so lsum > 0 for rows in range.
    lsum_safe = tl.where(lsum > 0, lsum, 1.0)
    tl.store(lse_ptr + bh.to(tl.int64) * n_rows + rows, m + tl.log2(lsum_safe), mask=row_ok)
    if WITH_OUTPUT:
        head = (hkv * G + rows // C).to(tl.int64)
        o = acc / lsum_safe[:, None]
        optrs = o_ptr + b.to(tl.int64) * so_b + head[:, None] * so_h + i[:, None].to(tl.int64) * so_c + offs_dv[None, :]
        tl.store(optrs, o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _replay_max_kernel(
    q_ptr, k_ptr, lse_ptr, out_ptr,
    L, C, G, Hkv, D, n_rows, sink_end, lo, hi,
    sq_b, sq_h, sq_c, sk_b, sk_h, sk_l, so_b, so_h,
    scale, softcap,
    HAS_SOFTCAP: tl.constexpr, CAST_F32: tl.constexpr, IEEE: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Pass 2: per visible context key block, the max over stacked rows of ``exp2(s - lse)``.

    Programs ``0 .. cdiv(sink_end, BLOCK_N) - 1`` take the sink, the rest the window ``[lo, hi)``.
    """
    pid = tl.program_id(0)
    n_sink = tl.cdiv(sink_end, BLOCK_N)
    in_sink = pid < n_sink
    first = tl.where(in_sink, pid * BLOCK_N, lo + (pid - n_sink) * BLOCK_N)
    keys_n = first + tl.arange(0, BLOCK_N)
    bh = tl.program_id(1)
    b = bh // Hkv
    hkv = bh % Hkv
    offs_d = tl.arange(0, BLOCK_D)
    in_range = keys_n < tl.where(in_sink, sink_end, hi)  # context keys only: every replay query sees them
    kt = _load_keys_t(k_ptr, b, hkv, keys_n, in_range, D, sk_b, sk_h, sk_l, offs_d, CAST_F32)
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    for r0 in range(0, n_rows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        q, i = _load_rows(q_ptr, b, hkv, rows, row_ok, C, G, D, sq_b, sq_h, sq_c, offs_d, CAST_F32)
        lse = tl.load(lse_ptr + bh.to(tl.int64) * n_rows + rows, mask=row_ok, other=0.0)
        s = _logits_log2(q, kt, scale, softcap, HAS_SOFTCAP, IEEE)  # [BLOCK_M, BLOCK_N]
        x = tl.where(row_ok[:, None], s - lse[:, None], float("-inf"))
        best = tl.maximum(best, tl.max(x, 0))
    res = tl.exp2(best)  # exp is monotonic: taken once, after the max
    optrs = out_ptr + b.to(tl.int64) * so_b + hkv.to(tl.int64) * so_h + keys_n
    if ACCUMULATE:
        res = tl.maximum(res, tl.load(optrs, mask=in_range, other=0.0))
    tl.store(optrs, res, mask=in_range)


def _block(n: int, lo: int, hi: int) -> int:
    return min(hi, max(lo, triton.next_power_of_2(n)))


def _check(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor | None, context_len: int,
           softcap: float | None, out: torch.Tensor | None, accumulate: bool,
           visible: tuple[int, int, int] | None) -> None:
    """Raise ValueError naming the first input the kernel cannot take."""
    named = [("query", query), ("keys", keys)] + ([("values", values)] if values is not None else [])
    for name, t in named:
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got {getattr(t, 'shape', type(t))}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype must be one of {_DTYPES}, got {t.dtype}")
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along head_dim (stride(-1) == 1), got {t.stride()}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query on {query.device}")
    b, hq, c, d = query.shape
    bk, hkv, total, dk = keys.shape
    if b != bk or d != dk:
        raise ValueError(f"query {tuple(query.shape)} and keys {tuple(keys.shape)} differ in batch or head_dim")
    if not 1 <= d <= _MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {_MAX_HEAD_DIM}], got {d}")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a positive multiple of KV heads ({hkv})")
    if c < 1:
        raise ValueError(f"the chunk (query.shape[2]) must hold >= 1 query, got {c}")
    if isinstance(context_len, bool) or not isinstance(context_len, int) or context_len < 0:
        raise ValueError(f"context_len must be an integer >= 0, got {context_len!r}")
    if total != context_len + c:
        raise ValueError(f"keys hold {total} positions, expected context {context_len} + chunk {c}")
    if values is not None:
        if values.shape[:3] != keys.shape[:3] or not 1 <= values.shape[-1] <= _MAX_HEAD_DIM:
            raise ValueError(f"values must be [{b}, {hkv}, {total}, Dv <= {_MAX_HEAD_DIM}], got {tuple(values.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if out is not None:
        if out.dtype != torch.float32 or tuple(out.shape) != (b, hkv, context_len) or out.device != keys.device:
            raise ValueError(f"out must be float32 [{b}, {hkv}, {context_len}] on {keys.device}, got {out.dtype} "
                             f"{tuple(out.shape)} on {out.device}")
        if context_len > 1 and out.stride(-1) != 1:
            raise ValueError(f"out must be contiguous along the sequence, got strides {out.stride()}")
    elif accumulate:
        raise ValueError("accumulate=True needs out (the scores of earlier chunks to max into)")
    if visible is not None:
        if len(visible) != 3 or any(isinstance(v, bool) or not isinstance(v, int) for v in visible):
            raise ValueError(f"visible must be three integers (sink_end, lo, hi), got {visible!r}")
        if not 0 <= visible[0] <= visible[1] <= visible[2] <= context_len:
            raise ValueError(f"visible must satisfy 0 <= sink_end <= lo <= hi <= context_len ({context_len}), "
                             f"got {visible}")
    if query.device.type != "cuda" and not _is_interpreted():
        raise ValueError(f"query is on {query.device}; the replay kernel needs CUDA (or TRITON_INTERPRET=1)")


def replay_attention_scores_triton(
    query: torch.Tensor,
    keys: torch.Tensor,
    context_len: int,
    *,
    scaling: float,
    softcap: float | None = None,
    values: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    fp32_logits: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    visible: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Replay scores of one chunk by the Triton kernel, and optionally the chunk's attention output.

    Scores equal ``replay_chunk_scores(query, keys, context_len, ...)``: per KV head and
    context key, the highest softmax probability any query of the head's group gives it. No
    host sync; nothing of size ``C x (L + C)`` is allocated.

    Args:
        query: ``[B, Hq, C, D]`` post-RoPE queries of the chunk (``stride(-1) == 1``).
        keys: ``[B, Hkv, L + C, D]`` the context's keys then the chunk's own.
        context_len: ``L``.
        scaling: logit scale; softcap: logit soft-cap ``c * tanh(x / c)`` or None.
        values: ``[B, Hkv, L + C, Dv]`` or None. Given, the chunk's causal attention output is
            returned too (the same softmax, fp32 accumulation).
        out: caller-owned ``[B, Hkv, L]`` fp32 scores, or None (allocated).
        accumulate: max the new scores into ``out`` (the running max over chunks).
        fp32_logits: upcast half-precision inputs to fp32 (IEEE products) instead of the
            native half dot with fp32 accumulation.
        block_m, block_n: tile sizes (powers of two >= 16; defaults suit an H100/H200).
        visible: ``(sink_end, lo, hi)``: the queries see only the context keys ``[0, sink_end)``
            and ``[lo, hi)`` (span-limited replay, :func:`snapkv.core.replay.span_visible`);
            key blocks outside are skipped, so the cost follows ``sink_end + hi - lo``, not
            ``L``. Keys outside score 0 (or keep ``out`` when accumulating). None: all (exact).

    Returns:
        ``(scores, attn_output)``: ``[B, Hkv, L]`` fp32, and ``[B, C, Hq, Dv]`` in the query's
        dtype (the layout transformers' attention functions return) or None without ``values``.

    Raises:
        ValueError: naming the input (dtype, device, shape, stride) the kernel cannot take.
    """
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk is not None and (isinstance(blk, bool) or not isinstance(blk, int) or blk < 16 or blk & (blk - 1)):
            raise ValueError(f"{name} must be a power of two >= 16, got {blk!r}")
    _check(query, keys, values, context_len, softcap, out, accumulate, visible)
    with on_device(same_device(query=query, keys=keys, values=values, out=out)):
        return _launch(query, keys, values, context_len, float(scaling), softcap, out, accumulate, fp32_logits,
                       block_m, block_n, visible or (0, 0, context_len))


def _launch(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor | None, context_len: int,
            scaling: float, softcap: float | None, out: torch.Tensor | None, accumulate: bool,
            fp32_logits: bool, block_m: int | None, block_n: int | None, visible: tuple[int, int, int]
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    b, hq, c, d = query.shape
    hkv = keys.shape[1]
    g = hq // hkv
    n_rows = g * c
    sink_end, lo, hi = visible
    partial = sink_end + hi - lo < context_len  # some keys get no vote from this chunk
    if out is None:
        out = torch.empty((b, hkv, context_len), dtype=torch.float32, device=keys.device)
        if partial:
            out.zero_()
    elif partial and not accumulate:
        out.zero_()
    # Same half dtype: native tensor-core dot with fp32 accumulation. Otherwise fp32 with an
    # IEEE dot. The interpreter keeps bf16 as raw uint16 bits, so interpreted runs always cast.
    same_half = query.dtype == keys.dtype and query.dtype != torch.float32
    if values is not None:
        same_half = same_half and values.dtype == query.dtype
    f32 = fp32_logits or not same_half or _is_interpreted()
    block_d = _block(d, 16, _MAX_HEAD_DIM)
    wide = block_d > 128
    flags = dict(HAS_SOFTCAP=softcap is not None, CAST_F32=f32, IEEE=f32, BLOCK_D=block_d)
    cap = float(softcap) if softcap is not None else 1.0
    sq, sk = query.stride()[:3], keys.stride()[:3]
    num_warps = 8 if wide or not f32 else 4

    lse = torch.empty((b * hkv, n_rows), dtype=torch.float32, device=keys.device)
    attn = None
    if values is not None:
        dv = values.shape[-1]
        attn = torch.empty((b, c, hq, dv), dtype=query.dtype, device=keys.device)
        sv, so = values.stride()[:3], (attn.stride(0), attn.stride(2), attn.stride(1))
    else:
        dv, sv, so = 1, (0, 0, 0), (0, 0, 0)
    block_dv = _block(dv, 16, _MAX_HEAD_DIM)
    # Tiles sized so that q, and k and v staged three deep, fit in ~130 KB of shared memory.
    bm1 = block_m or (32 if f32 and wide else 64 if f32 or wide else 128)
    bn1 = block_n or (16 if f32 and wide else 32 if f32 or wide else 64)
    bm1 = min(bm1, _block(n_rows, 16, bm1))
    _replay_lse_kernel[(triton.cdiv(n_rows, bm1), b * hkv)](
        query, keys, values if values is not None else lse, lse, attn if attn is not None else lse,
        context_len, c, g, hkv, d, dv, n_rows, sink_end, lo, hi,
        *sq, *sk, *sv, *so, scaling, cap,
        WITH_OUTPUT=values is not None, BLOCK_M=bm1, BLOCK_N=bn1, BLOCK_DV=block_dv, num_warps=num_warps, **flags,
    )  # fmt: skip
    bn2 = block_n or (64 if f32 or wide else 128)
    n_blocks = triton.cdiv(sink_end, bn2) + triton.cdiv(hi - lo, bn2)  # visible context key blocks
    if n_blocks:
        bm2 = block_m or (32 if f32 or wide else 64)
        bm2 = min(bm2, _block(n_rows, 16, bm2))
        _replay_max_kernel[(n_blocks, b * hkv)](
            query, keys, lse, out,
            context_len, c, g, hkv, d, n_rows, sink_end, lo, hi,
            *sq, *sk, out.stride(0), out.stride(1), scaling, cap,
            ACCUMULATE=accumulate, BLOCK_M=bm2, BLOCK_N=bn2, num_warps=num_warps, **flags,
        )  # fmt: skip
    return out, attn
