"""Replay scores (KVzip): the attention each context position receives while the context is replayed.

Based on Kim et al. 2025, "KVzip: Query-Agnostic KV Cache Compression with Context
Reconstruction", arXiv:2505.23416. After the context (``L`` tokens) the model reads
"Repeat the previous context:" followed by the context again, one chunk at a time. A chunk's
queries see every context key and the chunk's own keys (causally); the score of a context
position is the highest softmax probability any replay query of a KV head's query-head group
gives it. The model glue lives in :mod:`snapkv.methods.kvzip`.

Span-limited replay (an approximation, linear in ``L``): with ``visible = (sink_end, lo, hi)``
(:func:`span_visible`) a chunk's queries see only the context keys ``[0, sink_end)`` and
``[lo, hi)`` (plus their own, causally); softmax is over those keys, and the keys outside get
no vote from this chunk (the running max over chunks keeps what other chunks gave them).
``visible=None`` is the exact replay.

Two implementations of one chunk's scores: the torch one here (block-wise, at most
``[B, Hq, C, key_block]`` fp32 logits alive) and the Triton kernel of
:mod:`snapkv.kernels.replay_score` (no ``C x K`` tensor at all; it can also return the
chunk's attention output). :func:`replay_chunk_scores` picks one (:data:`SCORE_BACKENDS`).
"""

from __future__ import annotations

import functools
import warnings
from types import ModuleType

import torch

#: Logit precisions: ``fp32`` upcasts queries and keys; ``mixed`` multiplies half-precision
#: inputs with fp32 accumulation and output (CUDA only); ``auto`` picks ``mixed`` for CUDA
#: half-precision inputs, else ``fp32``. Softmax, max and scores are fp32 in every case.
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "mixed")

#: Score implementations: ``triton`` (the kernel; CUDA, or the interpreter), ``torch`` (the
#: twin below), ``auto`` (the kernel for CUDA inputs it takes, else the twin; CUDA inputs
#: with a Triton that cannot be imported take the twin with a warning, once).
SCORE_BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KERNEL_MAX_HEAD_DIM = 256
_IMPORT_ERROR: list[BaseException] = []


@functools.cache
def _kernel_module() -> ModuleType | None:
    """:mod:`snapkv.kernels.replay_score`, or None when Triton cannot be imported (error kept)."""
    try:
        from snapkv.kernels import replay_score
    except Exception as exc:  # no triton, or a broken install
        _IMPORT_ERROR.append(exc)
        return None
    return replay_score


@functools.cache
def _warn_no_kernel() -> None:
    err = _IMPORT_ERROR[0] if _IMPORT_ERROR else None
    warnings.warn(
        f"the Triton replay kernel cannot be imported ({type(err).__name__}: {err}); CUDA replay scoring "
        "takes the torch twin, which is slower and holds [B, Hq, chunk, key_block] logits. Install or repair "
        "triton, or pass score_backend='torch' to choose the twin without this warning.",
        RuntimeWarning, stacklevel=4)


def kernel_module() -> ModuleType:
    """The replay kernel module; ImportError (naming the cause) when Triton cannot be imported."""
    mod = _kernel_module()
    if mod is None:
        err = _IMPORT_ERROR[0] if _IMPORT_ERROR else None
        raise ImportError(f"score_backend='triton' but the replay kernel cannot be imported "
                          f"({type(err).__name__}: {err})")
    return mod


def resolve_score_backend(query: torch.Tensor, head_dim: int, backend: str) -> str:
    """``triton`` or ``torch`` for these inputs (``auto`` resolved as in :data:`SCORE_BACKENDS`).

    An explicit ``triton`` is returned as is: the kernel raises on inputs it cannot take.
    """
    if backend not in SCORE_BACKENDS:
        raise ValueError(f"score_backend must be one of {SCORE_BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if not (query.is_cuda and query.dtype in _KERNEL_DTYPES and head_dim <= _KERNEL_MAX_HEAD_DIM):
        return "torch"
    if _kernel_module() is None:
        _warn_no_kernel()
        return "torch"
    return "triton"


#: Context tokens at the front that every span-limited replay chunk sees (the attention sink:
#: softmax mass that would otherwise be spread over the chunk's few visible keys).
DEFAULT_SINK = 32

Visible = tuple[int, int, int]


def span_visible(context_len: int, start: int, end: int, span: int, sink: int = DEFAULT_SINK) -> Visible:
    """``(sink_end, lo, hi)``: the context keys the replay of context chunk ``[start, end)`` sees.

    ``[0, sink_end)`` (the first ``sink`` tokens; ``(0, 0, hi)`` when they reach the window) and
    ``[lo, hi) = [max(0, start - span), min(L, end + span))``, the chunk's own original
    positions and ``span`` tokens either side (KVzip's copy attention sits on them).
    """
    for name, v in (("span", span), ("sink", sink)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
    if not 0 <= start < end <= context_len:
        raise ValueError(f"chunk [{start}, {end}) must lie inside the context [0, {context_len})")
    lo, hi = max(0, start - span), min(context_len, end + span)
    return (sink, lo, hi) if sink < lo else (0, 0, hi)  # a sink reaching the window: one range


def check_visible(visible: Visible | None, context_len: int) -> Visible | None:
    """``visible`` validated (``0 <= sink_end <= lo <= hi <= L``); None when it is the whole context."""
    if visible is None:
        return None
    if len(visible) != 3 or any(isinstance(v, bool) or not isinstance(v, int) for v in visible):
        raise ValueError(f"visible must be three integers (sink_end, lo, hi), got {visible!r}")
    sink_end, lo, hi = visible
    if not 0 <= sink_end <= lo <= hi <= context_len:
        raise ValueError(f"visible must satisfy 0 <= sink_end <= lo <= hi <= context_len ({context_len}), "
                         f"got {visible}")
    return None if lo == 0 and hi == context_len else visible


def visible_keys(keys: torch.Tensor, context_len: int, visible: Visible) -> torch.Tensor:
    """``[B, H, L + C, D] -> [B, H, n + C, D]``: the visible context keys (sink, window), then the chunk's."""
    sink_end, lo, hi = visible
    return torch.cat([keys[:, :, :sink_end], keys[:, :, lo:hi], keys[:, :, context_len:]], dim=2)


def visible_positions(context_len: int, visible: Visible, device: torch.device | None = None) -> torch.Tensor:
    """Indices into ``[0, L + C)`` of :func:`visible_keys` without the chunk: ``[n]`` long."""
    sink_end, lo, hi = visible
    return torch.cat([torch.arange(sink_end, device=device), torch.arange(lo, hi, device=device)])


def scatter_max(out: torch.Tensor, scores: torch.Tensor, visible: Visible) -> torch.Tensor:
    """Max ``[B, H, n]`` scores of the visible keys into ``out`` ``[B, H, L]`` at their positions (in place)."""
    sink_end, lo, hi = visible
    for dst, src in ((out[..., :sink_end], scores[..., :sink_end]), (out[..., lo:hi], scores[..., sink_end:])):
        dst.copy_(torch.maximum(dst, src))
    return out


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
    backend: str = "auto",
    out: torch.Tensor | None = None,
    visible: Visible | None = None,
) -> torch.Tensor:
    """Highest attention probability each context key gets from one replay chunk.

    ``backend`` (:data:`SCORE_BACKENDS`) picks the Triton kernel or the torch code below; the
    two agree to fp32 rounding (``tests/test_replay_kernel.py``).

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
        max_logits: the most logits computed at once in the single-matmul path (torch).
        backend: ``auto``, ``triton`` or ``torch``.
        out: ``[B, Hkv, L]`` fp32 scores of earlier chunks: the result is their elementwise
            max with this chunk's, written into ``out`` (the running max over chunks).
        visible: ``(sink_end, lo, hi)`` (:func:`span_visible`): the queries see only these
            context keys; the others get 0 (or keep ``out``). None: all of them (exact).

    Returns:
        ``[B, Hkv, L]`` fp32 (``out`` when given).
    """
    if resolve_score_backend(query, query.shape[-1], backend) == "triton":
        scores, _ = kernel_module().replay_attention_scores_triton(
            query, keys, context_len, scaling=scaling, softcap=softcap, out=out, accumulate=out is not None,
            fp32_logits=not _mixed(query, precision), visible=visible)
        return scores
    b, hkv = keys.shape[:2]
    if out is not None and (tuple(out.shape) != (b, hkv, context_len) or out.dtype != torch.float32):
        raise ValueError(f"out must be float32 {(b, hkv, context_len)}, got {out.dtype} {tuple(out.shape)}")
    visible = check_visible(visible, context_len)
    if visible is not None:  # the sliced twin: the visible keys only, then scattered back
        s = _replay_chunk_scores_torch(query, visible_keys(keys, context_len, visible),
                                       visible[0] + visible[2] - visible[1], scaling=scaling, softcap=softcap,
                                       key_block=key_block, precision=precision, max_logits=max_logits)
        if out is None:
            out = torch.zeros((b, hkv, context_len), device=keys.device)
        return scatter_max(out, s, visible)
    s = _replay_chunk_scores_torch(query, keys, context_len, scaling=scaling, softcap=softcap,
                                   key_block=key_block, precision=precision, max_logits=max_logits)
    if out is not None:
        return torch.maximum(out, s, out=out)
    return s


def replay_chunk_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    context_len: int,
    *,
    scaling: float,
    softcap: float | None = None,
    precision: str = "auto",
    out: torch.Tensor | None = None,
    visible: Visible | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's causal attention output and its replay scores in one kernel (Triton only).

    The output replaces the model's own attention call during the replay (no ``C x (L + C)``
    mask, and the log-sum-exp the scores need comes from the same pass).
    :func:`replay_chunk_attention_reference` is its dense twin.

    ``visible`` (:func:`span_visible`) limits the context keys the queries attend to (output
    and scores); the kernel skips the key blocks outside.

    Returns:
        ``(scores, attn_output)``: as :func:`replay_chunk_scores` (``out`` accumulates), and
        ``[B, C, Hq, Dv]`` in the query's dtype.
    """
    scores, attn = kernel_module().replay_attention_scores_triton(
        query, keys, context_len, scaling=scaling, softcap=softcap, values=values, out=out,
        accumulate=out is not None, fp32_logits=not _mixed(query, precision), visible=visible)
    assert attn is not None  # values given
    return scores, attn


def replay_chunk_attention_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    context_len: int,
    *,
    scaling: float,
    softcap: float | None = None,
    visible: Visible | None = None,
) -> torch.Tensor:
    """Dense float64 twin of :func:`replay_chunk_attention`'s output: ``[B, C, Hq, Dv]`` float64."""
    b, hq, c, d = query.shape
    g = hq // keys.shape[1]
    k = keys.double().repeat_interleave(g, dim=1)
    v = values.double().repeat_interleave(g, dim=1)
    s = torch.matmul(query.double(), k.transpose(-1, -2)) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    allowed = _allowed(context_len, c, visible, query.device)
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.matmul(p, v).transpose(1, 2)


def _replay_chunk_scores_torch(
    query: torch.Tensor,
    keys: torch.Tensor,
    context_len: int,
    *,
    scaling: float,
    softcap: float | None,
    key_block: int,
    precision: str,
    max_logits: int,
) -> torch.Tensor:
    """The torch implementation of :func:`replay_chunk_scores` (the kernel's twin)."""
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
    visible: Visible | None = None,
) -> torch.Tensor:
    """Dense float64 twin of :func:`replay_chunk_scores` (one softmax over the whole key row).

    With ``visible`` the row is masked to the visible keys; the others score 0.
    """
    b, hq, c, d = query.shape
    hkv = keys.shape[1]
    k = keys.double().repeat_interleave(hq // hkv, dim=1)  # [B, Hq, L + C, D]
    s = torch.matmul(query.double(), k.transpose(-1, -2)) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    allowed = _allowed(context_len, c, visible, query.device)  # [C, L + C]
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)[..., :context_len]
    return p.amax(dim=-2).view(b, hkv, hq // hkv, context_len).amax(dim=2)


def _allowed(context_len: int, c: int, visible: Visible | None, device: torch.device) -> torch.Tensor:
    """``[C, L + C]`` bool: the replay's causal mask, context keys limited to ``visible``."""
    pos = torch.arange(context_len + c, device=device)
    allowed = pos[None, :] <= (context_len + torch.arange(c, device=device))[:, None]
    if visible is not None:
        sink_end, lo, hi = visible
        ctx = pos < context_len
        allowed &= ~ctx | (pos < sink_end) | (pos >= lo) & (pos < hi)
    return allowed


def replay_chunks(context_len: int, chunk: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` chunks of ``chunk`` context tokens (the last may be shorter)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return [(s, min(s + chunk, context_len)) for s in range(0, context_len, chunk)]
