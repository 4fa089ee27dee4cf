"""Replay scores (KVzip): the attention each context position receives while the context is replayed.

Based on Kim et al. 2025, "KVzip: Query-Agnostic KV Cache Compression with Context
Reconstruction", arXiv:2505.23416. After the context (``L`` tokens) the model reads
"Repeat the previous context:" followed by the context again, one chunk at a time. A chunk's
queries see every context key and the chunk's own keys (causally); the score of a context
position is the highest softmax probability any replay query of a KV head's query-head group
gives it. Pure torch: the model glue lives in :mod:`snapkv.methods.kvzip`.
"""

from __future__ import annotations

import torch

#: Logit precisions: ``fp32`` upcasts queries and keys; ``mixed`` multiplies half-precision
#: inputs with fp32 accumulation and output (CUDA only); ``auto`` picks ``mixed`` for CUDA
#: half-precision inputs, else ``fp32``. Softmax, max and scores are fp32 in every case.
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "mixed")


def _mixed(query: torch.Tensor, precision: str) -> bool:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    half = query.dtype in (torch.float16, torch.bfloat16)
    if precision == "mixed" and not (query.is_cuda and half):
        raise ValueError(f"precision='mixed' needs CUDA fp16/bf16 inputs, got {query.dtype} on {query.device}")
    return precision == "mixed" or precision == "auto" and query.is_cuda and half


def _logits(q: torch.Tensor, k: torch.Tensor, scaling: float | None, softcap: float | None,
            mixed: bool) -> torch.Tensor:
    """``[B*Hkv, R, D] x [B*Hkv, K, D] -> [B*Hkv, R, K]`` fp32 logits, soft-capped.

    ``scaling`` None: ``q`` is fp32 and already scaled (one pass less over the logits).
    """
    if mixed:
        s = torch.bmm(q, k.transpose(-1, -2), out_dtype=torch.float32)
    else:
        s = torch.bmm(q, k.float().transpose(-1, -2))
    if scaling is not None:
        s.mul_(scaling)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    return s


def replay_chunk_scores(
    query: torch.Tensor,
    keys: torch.Tensor,
    context_len: int,
    *,
    scaling: float,
    softcap: float | None = None,
    key_block: int = 4096,
    precision: str = "auto",
    max_logits: int = 1 << 26,
) -> torch.Tensor:
    """Highest attention probability each context key gets from one replay chunk.

    When the chunk's logits ``[B, Hq, C, L + C]`` hold at most ``max_logits`` elements they
    are computed once (one matmul); otherwise two passes over key blocks keep at most
    ``[B, Hq, C, key_block]`` fp32 logits alive: the first finds each query's log-sum-exp
    over all the keys it sees (context and its own causal prefix), the second turns the
    context keys' logits into probabilities and keeps their maximum over queries and over
    each KV head's query heads.

    Args:
        query: ``[B, Hq, C, D]`` post-RoPE queries of the chunk.
        keys: ``[B, Hkv, L + C, D]`` the context's keys then the chunk's own.
        context_len: ``L``.
        scaling: logit scale; softcap: logit soft-cap or None.
        key_block: keys per block.
        precision: logit precision, see :data:`PRECISIONS`.
        max_logits: the most logits computed at once in the single-matmul path.

    Returns:
        ``[B, Hkv, L]`` fp32.
    """
    b, hq, c, d = query.shape
    _, hkv, total, _ = keys.shape
    if total != context_len + c:
        raise ValueError(f"keys hold {total} positions, expected context {context_len} + chunk {c}")
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if key_block < 1 or max_logits < 0:
        raise ValueError(f"key_block must be >= 1 and max_logits >= 0, got {key_block}, {max_logits}")
    g = hq // hkv
    mixed = _mixed(query, precision)
    q = query.reshape(b * hkv, g * c, d)  # rows: (query head of the group, chunk position)
    # fp32: the scale goes into the queries; mixed: onto the fp32 logits (exact half inputs).
    q, scale = (q, scaling) if mixed else (q.float() * scaling, None)
    k = keys.reshape(b * hkv, total, d)
    causal = torch.arange(c, device=query.device)[None, :] > torch.arange(c, device=query.device).repeat(g)[:, None]
    if b * hq * c * total <= max_logits:  # one matmul: [B*Hkv, g*C, L + C]
        s = _logits(q, k, scale, softcap, mixed)
        s[..., context_len:].masked_fill_(causal, float("-inf"))
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
        return s[..., :context_len].sub_(lse).amax(dim=-2).exp_().view(b, hkv, context_len)
    # Pass 1: log-sum-exp over the context keys (all visible), then the chunk's own (causal).
    lse = torch.full((b * hkv, g * c), float("-inf"), device=query.device)
    for start in range(0, context_len, key_block):
        s = _logits(q, k[:, start : min(start + key_block, context_len)], scale, softcap, mixed)
        lse = torch.logaddexp(lse, torch.logsumexp(s, dim=-1))
    s = _logits(q, k[:, context_len:], scale, softcap, mixed).masked_fill_(causal, float("-inf"))  # [.., g*C, C]
    lse = torch.logaddexp(lse, torch.logsumexp(s, dim=-1))[..., None]
    # Pass 2: max over rows (queries x group) of the context keys' log-probabilities; exp is
    # monotonic, so it is taken after the max, on [B*Hkv, block] only.
    out = torch.empty((b * hkv, context_len), device=query.device)
    for start in range(0, context_len, key_block):
        end = min(start + key_block, context_len)
        s = _logits(q, k[:, start:end], scale, softcap, mixed)
        out[:, start:end] = s.sub_(lse).amax(dim=-2)
    return out.exp_().view(b, hkv, context_len)


def replay_chunk_scores_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    context_len: int,
    *,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Dense float64 twin of :func:`replay_chunk_scores` (one softmax over the whole key row)."""
    b, hq, c, d = query.shape
    hkv = keys.shape[1]
    k = keys.double().repeat_interleave(hq // hkv, dim=1)  # [B, Hq, L + C, D]
    s = torch.matmul(query.double(), k.transpose(-1, -2)) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    pos = torch.arange(context_len + c)
    allowed = pos[None, :] <= (context_len + torch.arange(c))[:, None]  # [C, L + C]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)[..., :context_len]
    return p.amax(dim=-2).view(b, hkv, hq // hkv, context_len).amax(dim=2)


def replay_chunks(context_len: int, chunk: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` chunks of ``chunk`` context tokens (the last may be shorter)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return [(s, min(s + chunk, context_len)) for s in range(0, context_len, chunk)]
