"""KVzip: query-agnostic scores from a replay of the context, and the cache they select.

Based on Kim et al. 2025, "KVzip: Query-Agnostic KV Cache Compression with Context
Reconstruction", arXiv:2505.23416.

After the context has been prefilled, the model reads ``prompt_ids`` ("Repeat the previous
context:" and any chat framing) followed by the context again, one chunk at a time. Each
replay forward attends to the whole context KV plus its own tokens, never to earlier replay
chunks: the replay's keys are written after the context in a preallocated buffer
(:class:`ReplayCache`) and rolled back after each chunk, so memory is the context KV plus one
chunk. A scoped attention function records, per layer, the running max of
:func:`~snapkv.core.replay.replay_chunk_scores`: on CUDA the Triton kernel of
:mod:`snapkv.kernels.replay_score` also computes the chunk's attention output (``attention=
"kernel"``: one pass gives the output and the log-sum-exp the scores need, no ``C x (L + C)``
mask or logits anywhere); otherwise the model's own backend gives the output and the scores
are computed beside it (``attention="backend"``). The scores
then select per head like SnapKV's votes (:class:`KVzip` through
:meth:`SnapKVSession.derive`), so the compressed context serves any later question.

Exact replay costs more than the prefill by construction (every replay query sees all ``L``
context keys, and the scores need a second ``q.k`` pass). ``span=S`` approximates it in time
linear in ``L``: the replay of context chunk ``[a, b)`` attends only to the first ``sink``
context tokens and to ``[a - S, b + S)`` (where the copy attention of the replayed text
sits), plus its own tokens; a key's score is the max over the chunks that see it, each
normalised over its visible keys. The kernel skips the other key blocks; the ``backend``
path hands the model's attention the visible keys only.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from snapkv.cache.compressed import SnapKVCache
from snapkv.config import SnapKVConfig
from snapkv.core.replay import (
    DEFAULT_SINK,
    PRECISIONS,
    SCORE_BACKENDS,
    Visible,
    check_visible,
    replay_chunk_attention,
    replay_chunk_scores,
    replay_chunks,
    resolve_score_backend,
    scatter_max,
    span_visible,
    visible_keys,
    visible_positions,
)
from snapkv.core.scoring import pool_votes
from snapkv.integration.hf import cache_argument, model_backend
from snapkv.methods.base import Method, ScoreInputs

#: The replay instruction (the paper's; chat framing goes after it, in ``prompt_ids``).
DEFAULT_REPLAY_PROMPT = "\n\nRepeat the previous context:"

#: Backends the replay can wrap (their own output is used; scores are computed beside it).
BACKENDS: tuple[str, ...] = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")

#: Who computes the replay's attention output: ``kernel`` (the Triton replay kernel, with the
#: scores), ``backend`` (the model's own attention, scores beside it), ``auto`` (``kernel``
#: when the scores run on the kernel and the backend is not eager, else ``backend``).
ATTENTIONS: tuple[str, ...] = ("auto", "kernel", "backend")

_ids = itertools.count()


def _cache_kwarg(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    return {cache_argument(model): cache}


def _text_config(model: torch.nn.Module) -> Any:
    return model.config.get_text_config(decoder=True)


class ReplayLayer(DynamicLayer):
    """A full-attention layer in a buffer of ``capacity`` positions, written in place.

    The context fills the front; a replay chunk is written after it and :meth:`rollback`
    forgets it again, so no forward copies the context's KV.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.length = capacity, 0
        self.k_buf: torch.Tensor | None = None
        self.v_buf: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[B, Hkv, n, D]`` at the current length; return views of everything held."""
        if self.k_buf is None:
            b, h, _, d = key_states.shape
            self.k_buf = key_states.new_empty((b, h, self.capacity, d))
            self.v_buf = value_states.new_empty((b, h, self.capacity, value_states.shape[-1]))
            self.is_initialized, self.device = True, key_states.device
        n = key_states.shape[-2]
        if self.length + n > self.capacity:
            raise RuntimeError(f"replay buffer of {self.capacity} positions cannot take {self.length} + {n}")
        self.k_buf[:, :, self.length : self.length + n] = key_states
        self.v_buf[:, :, self.length : self.length + n] = value_states
        self.length += n
        self.keys, self.values = self.k_buf[:, :, : self.length], self.v_buf[:, :, : self.length]
        return self.keys, self.values

    def rollback(self, length: int) -> None:
        """Forget everything after the first ``length`` positions."""
        self.length = length
        if self.k_buf is not None:
            self.keys, self.values = self.k_buf[:, :, :length], self.v_buf[:, :, :length]

    def get_seq_length(self) -> int:
        """Positions held."""
        return self.length

    def get_mask_sizes(self, query_length: Any, *args: Any) -> tuple[int, int]:
        """Key length for mask creation (5.17 passes cache positions, 5.24 a count)."""
        q = query_length if isinstance(query_length, int) else int(query_length.shape[-1])
        return self.length + q, 0


class ReplayCache(DynamicCache):
    """A cache of :class:`ReplayLayer` s, ``capacity`` positions each (full-attention models only)."""

    def __init__(self, config: Any, capacity: int) -> None:
        super().__init__(config=config)
        if any(type(layer) is not DynamicLayer for layer in self.layers):
            raise ValueError("KVzip replay needs a model whose layers are all full attention "
                             "(sliding-window layers cannot be rolled back)")
        self.layers = [ReplayLayer(capacity) for _ in self.layers]

    @classmethod
    def from_kv(cls, config: Any, kv: Sequence[tuple[torch.Tensor, torch.Tensor]], capacity: int) -> ReplayCache:
        """A cache holding the given per-layer ``[B, Hkv, L, D]`` keys and values (copied once)."""
        cache = cls(config, capacity)
        if len(kv) != len(cache.layers):
            raise ValueError(f"{len(kv)} layers of KV given, the model has {len(cache.layers)}")
        for layer, (k, v) in zip(cache.layers, kv, strict=True):
            layer.update(k, v)
        return cache

    def rollback(self, length: int) -> None:
        """Every layer back to its first ``length`` positions."""
        for layer in self.layers:
            layer.rollback(length)


def _backend_function(name: str, module: torch.nn.Module) -> Callable[..., Any]:
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


class _Recorder:
    """The scoped attention function: the backend's output, plus the running max of replay scores."""

    def __init__(self, backend: str, key_block: int, precision: str, max_logits: int, score_backend: str = "torch",
                 fused: bool = False) -> None:
        self.backend, self.key_block, self.precision, self.max_logits = backend, key_block, precision, max_logits
        self.score_backend, self.fused = score_backend, fused
        self.context_len: int | None = None  # None: pass through (the context prefill)
        self.visible: Visible | None = None  # the current chunk's visible context keys (None: all)
        self.scores: dict[int, torch.Tensor] = {}

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        scaling, softcap = kwargs.get("scaling", module.scaling), kwargs.get("softcap")
        old = self.scores.get(module.layer_idx)  # the running max, updated in place
        if self.context_len is not None and self.fused:
            # The kernel's causal replay mask is the whole mask: no padding, window or sinks.
            if attention_mask is not None or kwargs.get("sliding_window") or kwargs.get("s_aux") is not None \
                    or kwargs.get("dropout", 0.0) or not getattr(module, "is_causal", True):
                raise ValueError("attention='kernel' computes plain causal attention only; this layer has a "
                                 "padding mask, sliding window, sinks or dropout: use attention='backend'")
            s, out = replay_chunk_attention(query, key, value, self.context_len, scaling=scaling, softcap=softcap,
                                            precision=self.precision, out=old, visible=self.visible)
            self.scores[module.layer_idx] = s
            return out, None
        if self.context_len is not None and self.visible is not None:
            return self._span_backend(module, query, key, value, attention_mask, old, **kwargs)
        out = _backend_function(self.backend, module)(module, query, key, value, attention_mask, **kwargs)
        if self.context_len is not None:
            self.scores[module.layer_idx] = replay_chunk_scores(
                query, key, self.context_len, scaling=scaling, softcap=softcap, key_block=self.key_block,
                precision=self.precision, max_logits=self.max_logits, backend=self.score_backend, out=old)
        return out

    def _span_backend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, old: torch.Tensor | None, **kwargs: Any) -> Any:
        """Span-limited replay through the backend: it sees the visible keys only (sliced), scores beside it."""
        length, vis = self.context_len, self.visible
        assert length is not None and vis is not None
        k, v = visible_keys(key, length, vis), visible_keys(value, length, vis)
        if attention_mask is not None:  # the mask's key columns, sliced the same way
            if attention_mask.shape[-1] != key.shape[-2]:
                raise ValueError(f"the attention mask covers {attention_mask.shape[-1]} keys, the layer holds "
                                 f"{key.shape[-2]}: a span-limited replay cannot slice it")
            idx = torch.cat([visible_positions(length, vis, key.device),
                             torch.arange(length, key.shape[-2], device=key.device)])
            attention_mask = attention_mask.index_select(-1, idx)
        out = _backend_function(self.backend, module)(module, query, k, v, attention_mask, **kwargs)
        n = k.shape[-2] - (key.shape[-2] - length)  # visible context keys
        s = replay_chunk_scores(query, k, n, scaling=kwargs.get("scaling", module.scaling),
                                softcap=kwargs.get("softcap"), key_block=self.key_block, precision=self.precision,
                                max_logits=self.max_logits, backend=self.score_backend)
        if old is None:
            old = torch.zeros((key.shape[0], key.shape[1], length), device=key.device)
        self.scores[module.layer_idx] = scatter_max(old, s, vis)
        return out


def resolve_replay_backends(model: torch.nn.Module, backend: str | None, score_backend: str, attention: str
                            ) -> tuple[str, str, bool]:
    """What :func:`kvzip_scores` runs for this model: ``(attention backend, score backend, fused)``.

    ``backend`` None is the model's own; ``score_backend`` and ``attention`` as in
    :func:`kvzip_scores`, ``auto`` resolved by the model's device and dtype. ``fused``: the
    kernel computes the replay's attention output. ValueError for a combination that cannot run.
    """
    backend = backend or model_backend(model)  # the model's own, also while SnapKV's function is on it
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (the attention the replay wraps), got {backend!r}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    config = _text_config(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    param = next(model.parameters())
    probe = torch.empty(0, device=param.device, dtype=param.dtype)
    scores = resolve_score_backend(probe, head_dim, score_backend)
    if attention == "auto":
        attention = "kernel" if scores == "triton" and backend != "eager" else "backend"
    if attention == "kernel":
        if scores != "triton":
            raise ValueError(f"attention='kernel' needs score_backend 'triton' (or 'auto' on CUDA), got "
                             f"{score_backend!r} resolving to {scores!r}")
        if backend == "eager":
            raise ValueError("attention='kernel' needs an sdpa or flash backend (the context prefill runs "
                             "without a mask, causal by the backend's own flag); this model's is eager")
    return backend, scores, attention == "kernel"


@contextmanager
def _scoped_recorder(model: torch.nn.Module, backend: str | None, key_block: int, precision: str,
                     max_logits: int, score_backend: str = "torch", attention: str = "backend"
                     ) -> Iterator[_Recorder]:
    """Register the recorder under a unique name, switch the model to it, restore in ``finally``."""
    previous = _text_config(model)._attn_implementation or "eager"
    backend, score_backend, fused = resolve_replay_backends(model, backend, score_backend, attention)
    name = f"kvzip_{backend}_{next(_ids)}"
    recorder = _Recorder(backend, key_block, precision, max_logits, score_backend, fused)
    AttentionInterface.register(name, recorder)
    # Fused: no mask at all (flash's mask function gives None without padding); the backend
    # still runs the context prefill, causal by its own flag.
    mask_of = "flash_attention_2" if fused else backend
    AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[mask_of])
    try:
        model.set_attn_implementation(name)
        yield recorder
    finally:
        try:
            model.set_attn_implementation(previous)
        finally:
            AttentionInterface._global_mapping.pop(name, None)
            AttentionMaskInterface._global_mapping.pop(name, None)


def replay_inputs(context_ids: Sequence[int], prompt_ids: Sequence[int], chunk: int, overlap: int
                  ) -> list[list[int]]:
    """Token ids of each replay forward: the prompt, ``overlap`` tokens before the chunk, the chunk."""
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    ctx = list(context_ids)
    return [list(prompt_ids) + ctx[max(0, s - overlap) if s else 0 : s] + ctx[s:e]
            for s, e in replay_chunks(len(ctx), chunk)]


def _check_span(span: int | None, sink: int) -> None:
    if span is not None and (isinstance(span, bool) or not isinstance(span, int) or span < 0):
        raise ValueError(f"span must be None (exact replay) or an integer >= 0 (context tokens either side "
                         f"of a chunk its replay sees), got {span!r}")
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        raise ValueError(f"sink must be an integer >= 0 (context tokens at the front every chunk sees), "
                         f"got {sink!r}")


def _check(context_ids: torch.Tensor, chunk: int, key_block: int) -> None:
    if context_ids.dim() != 2 or context_ids.shape[1] < 1:
        raise ValueError(f"context_ids must be [B, L] with L >= 1, got shape {tuple(context_ids.shape)}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1 (context tokens per replay forward), got {chunk!r}")
    if isinstance(key_block, bool) or not isinstance(key_block, int) or key_block < 1:
        raise ValueError(f"key_block must be an integer >= 1, got {key_block!r}")


@torch.no_grad()
def kvzip_scores(
    model: torch.nn.Module,
    context_ids: torch.Tensor,
    prompt_ids: Sequence[int],
    *,
    chunk: int = 2048,
    overlap: int = 8,
    key_block: int = 4096,
    cache: ReplayCache | None = None,
    backend: str | None = None,
    precision: str = "auto",
    max_logits: int = 1 << 26,
    score_backend: str = "auto",
    attention: str = "auto",
    span: int | None = None,
    sink: int = DEFAULT_SINK,
) -> list[torch.Tensor]:
    """Per layer ``[B, Hkv, L]`` fp32 replay scores of the context ``context_ids`` (``[B, L]``, no padding).

    Args:
        model: a transformers decoder whose layers are all full attention.
        context_ids: the context (rows of equal length).
        prompt_ids: the replay instruction's ids (:data:`DEFAULT_REPLAY_PROMPT`, tokenized,
            plus any chat framing), read before every chunk.
        chunk: context tokens per replay forward (memory: one chunk's activations and at
            most ``max(max_logits, B * Hq * chunk * key_block)`` fp32 logits).
        overlap: tokens of the previous chunk repeated after the prompt, so the model knows
            where to go on (KVzip's "starting with").
        key_block: keys per scoring block when a chunk's logits exceed ``max_logits``
            (below it, one matmul per layer and chunk; see
            :func:`~snapkv.core.replay.replay_chunk_scores`).
        cache: the context already prefilled into a :class:`ReplayCache` (e.g. from a
            captured prefill) with room for the longest replay forward; its replay
            positions are rolled back afterwards. None (or an empty one): prefill the context here.
        backend: the attention implementation the replay wraps (default: the model's own,
            also while SnapKV's attention function is enabled on it).
        precision: logit precision (:data:`~snapkv.core.replay.PRECISIONS`; ``auto``: fp32
            accumulation of half-precision inputs on CUDA, fp32 inputs elsewhere).
        score_backend: the scores' implementation (:data:`~snapkv.core.replay.SCORE_BACKENDS`;
            ``auto``: the Triton kernel on CUDA, the torch twin elsewhere).
        attention: who computes the replay's attention output (:data:`ATTENTIONS`; ``auto``:
            the kernel when it scores and the backend is not eager). With the kernel nothing
            of size ``chunk x L`` is allocated (no mask, no logits).
        span: None: exact replay (every replay query sees the whole context). An integer
            ``S >= 0``: the replay of context chunk ``[a, b)`` sees only the context keys
            ``[0, sink)`` and ``[a - S, b + S)`` (clipped to the context), plus its own; a key's
            score is the max over the chunks that see it (approximate, linear in ``L``;
            ``S >= L`` is the exact replay).
        sink: context tokens at the front every span-limited chunk sees
            (:data:`~snapkv.core.replay.DEFAULT_SINK`; ignored when ``span`` is None).
    """
    _check(context_ids, chunk, key_block)
    _check_span(span, sink)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if score_backend not in SCORE_BACKENDS:
        raise ValueError(f"score_backend must be one of {SCORE_BACKENDS}, got {score_backend!r}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    b, length = context_ids.shape
    rows = [replay_inputs(r.tolist(), prompt_ids, chunk, overlap) for r in context_ids]
    longest = max(len(x) for x in rows[0])
    device = context_ids.device
    if cache is None:
        cache = ReplayCache(model.config, length + longest)
    elif cache.get_seq_length() not in (0, length):  # empty: the context is prefilled into it here
        raise ValueError(f"cache holds {cache.get_seq_length()} positions, the context has {length}")
    with _scoped_recorder(model, backend, key_block, precision, max_logits, score_backend, attention) as rec:
        if cache.get_seq_length() == 0:
            pos = torch.arange(length, device=device)[None].expand(b, -1)
            model(input_ids=context_ids, position_ids=pos, use_cache=True, logits_to_keep=1,
                  **_cache_kwarg(model, cache))
        rec.context_len = length
        spans = replay_chunks(length, chunk)
        try:
            for i in range(len(rows[0])):
                if span is not None:
                    rec.visible = check_visible(span_visible(length, *spans[i], span, sink), length)
                ids = torch.tensor([r[i] for r in rows], device=device)  # [B, n]
                pos = torch.arange(length, length + ids.shape[1], device=device)[None].expand(b, -1)
                model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1,
                      **_cache_kwarg(model, cache))
                cache.rollback(length)
        finally:
            cache.rollback(length)
    n_layers = len(cache.layers)
    if sorted(rec.scores) != list(range(n_layers)):
        raise RuntimeError(f"replay recorded layers {sorted(rec.scores)}, expected all {n_layers}")
    return [rec.scores[i] for i in range(n_layers)]


@torch.no_grad()
def kvzip_scores_reference(
    model: torch.nn.Module, context_ids: torch.Tensor, prompt_ids: Sequence[int], *, chunk: int, overlap: int = 8,
    span: int | None = None, sink: int = DEFAULT_SINK,
) -> list[torch.Tensor]:
    """Dense twin of :func:`kvzip_scores`: one forward of the context and every replay input.

    The mask lets each replay input see the context (with ``span``: its visible part) and
    itself only; positions restart at ``L`` for each. Needs eager attention
    (``output_attentions``); run it in float64.
    """
    _check_span(span, sink)
    b, length = context_ids.shape
    inputs = [replay_inputs(r.tolist(), prompt_ids, chunk, overlap) for r in context_ids]
    ids = torch.cat([context_ids, torch.tensor([sum(r, []) for r in inputs])], dim=1)
    sizes = [len(x) for x in inputs[0]]
    total = ids.shape[1]
    allowed = torch.zeros(total, total, dtype=torch.bool)
    allowed[:length, :length] = torch.ones(length, length, dtype=torch.bool).tril()
    pos = list(range(length))
    start = length
    for n, (a, e) in zip(sizes, replay_chunks(length, chunk), strict=True):
        if span is None:
            allowed[start : start + n, :length] = True
        else:
            sink_end, lo, hi = span_visible(length, a, e, span, sink)
            allowed[start : start + n, :sink_end] = True
            allowed[start : start + n, lo:hi] = True
        allowed[start : start + n, start : start + n] = torch.ones(n, n, dtype=torch.bool).tril()
        pos += list(range(length, length + n))
        start += n
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(b, 1, total, total, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    out = model(input_ids=ids, attention_mask=mask, position_ids=torch.tensor([pos] * b), use_cache=False,
                output_attentions=True)
    hkv = _text_config(model).num_key_value_heads
    scores = []
    for att in out.attentions:  # [B, Hq, T, T]
        p = att[:, :, length:, :length].amax(dim=2)  # [B, Hq, L]
        scores.append(p.view(b, hkv, -1, length).amax(dim=2))
    return scores


@dataclass(eq=False)
class KVzip(Method):
    """Replay scores as a selection method: :meth:`fit` runs the replay, :meth:`score` returns its layer.

    Args:
        chunk: context tokens per replay forward (default 2048).
        overlap: previous-chunk tokens repeated after the prompt (default 8).
        key_block: keys per scoring block (default 4096).
        precision: logit precision (default ``auto``, see :func:`kvzip_scores`).
        score_backend: scores by the Triton kernel or the torch twin (default ``auto``, see
            :func:`kvzip_scores`).
        attention: who computes the replay's attention output (default ``auto``, see
            :func:`kvzip_scores`).
        kernel: odd max-pooling width over the sequence applied to the scores (default 1:
            none; SnapKV's pooling, which keeps digit-per-token numbers whole).
        span: None (default): exact replay. ``S >= 0``: span-limited replay, each chunk sees
            the first ``sink`` context tokens and ``S`` tokens either side of its own (linear
            in the context length; see :func:`kvzip_scores`).
        sink: context tokens at the front every span-limited chunk sees (default
            :data:`~snapkv.core.replay.DEFAULT_SINK`).
    """

    chunk: int = 2048
    overlap: int = 8
    key_block: int = 4096
    precision: str = "auto"
    kernel: int = 1
    score_backend: str = "auto"
    attention: str = "auto"
    span: int | None = None
    sink: int = DEFAULT_SINK
    fitted: int = -1  # which fit the scores come from (derive() memoizes by the repr)
    scores: list[torch.Tensor] | None = field(default=None, repr=False)
    name: str = "kvzip"

    def __post_init__(self) -> None:
        _check(torch.zeros(1, 1), self.chunk, self.key_block)
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, int) or self.overlap < 0:
            raise ValueError(f"overlap must be an integer >= 0, got {self.overlap!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.score_backend not in SCORE_BACKENDS:
            raise ValueError(f"score_backend must be one of {SCORE_BACKENDS}, got {self.score_backend!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if isinstance(self.kernel, bool) or not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd integer >= 1, got {self.kernel!r}")
        _check_span(self.span, self.sink)

    def fit(self, model: torch.nn.Module, context_ids: torch.Tensor, prompt_ids: Sequence[int], *,
            cache: ReplayCache | None = None, backend: str | None = None) -> KVzip:
        """Score ``context_ids`` by :func:`kvzip_scores` (arguments as there); returns self."""
        self.scores = kvzip_scores(model, context_ids, prompt_ids, chunk=self.chunk, overlap=self.overlap,
                                   key_block=self.key_block, cache=cache, backend=backend,
                                   precision=self.precision, score_backend=self.score_backend,
                                   attention=self.attention, span=self.span, sink=self.sink)
        self.fitted = next(_ids)
        return self

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """The layer's replay scores, checked against the keys being compressed."""
        if self.scores is None:
            raise RuntimeError("KVzip.score() needs fit() first: the replay runs the model on the context")
        s = self.scores[inputs.layer_idx]
        b, h, length, _ = inputs.keys.shape
        if tuple(s.shape) != (b, h, length):
            raise ValueError(f"layer {inputs.layer_idx}: replay scores of shape {tuple(s.shape)} "
                             f"do not match the keys being compressed {(b, h, length)}")
        return pool_votes(s, self.kernel, "max").to(inputs.keys.device)


def replay_cache_from_capture(model: torch.nn.Module, captured: dict[int, Any], prefix: int,
                              capacity: int) -> ReplayCache:
    """A :class:`ReplayCache` of the first ``prefix`` positions of a captured prefill.

    ``captured`` is a capture cache's ``captured`` (``SnapKVCache(..., capture=True)``): per
    layer a ``Capture`` with the post-RoPE keys (``inputs.keys``) and the values.
    """
    n = _text_config(model).num_hidden_layers
    if sorted(captured) != list(range(n)):
        raise ValueError("the capture lacks layers (sliding-window layers are not captured): KVzip needs a "
                         "model whose layers are all full attention")
    if any(getattr(c, "order", None) is not None for c in captured.values()):
        raise ValueError("the capture holds right-padded rows; KVzip replays unpadded contexts only")
    kv = [(captured[i].inputs.keys[:, :, :prefix], captured[i].values[:, :, :prefix]) for i in range(n)]
    return ReplayCache.from_kv(model.config, kv, prefix + capacity)


@torch.no_grad()
def kvzip_context_cache(
    model: torch.nn.Module,
    context_ids: torch.Tensor,
    prompt_ids: Sequence[int],
    config: SnapKVConfig | None = None,
    *,
    chunk: int = 2048,
    overlap: int = 8,
    key_block: int = 4096,
    kernel: int = 1,
    method: KVzip | None = None,
) -> tuple[SnapKVCache, KVzip]:
    """Compress a context (``[1, L]``) by its replay scores into a reusable :class:`~snapkv.SnapKVCache`.

    One captured prefill of the context, the replay (:func:`kvzip_scores` reading the
    captured KV), then ``derive()``: the cache keeps ``config.budget`` context tokens per
    layer and KV head, the top replay scores plus, as every method here, the last
    ``config.window`` context tokens. Questions are then fed at positions ``L, L+1, ...``.
    The capture is closed before returning (only the kept tokens stay alive). This is the
    adapter ``ContextCache(..., method=KVzip(...))`` and the server's document cache call.

    ``method``: a :class:`KVzip` whose settings (chunk, overlap, key_block, precision, kernel,
    span, sink) replace the keyword ones; it is not modified (a fitted copy is returned).

    Returns:
        ``(cache, method)``: the compressed cache and the fitted :class:`KVzip` (its scores).
    """
    if method is None:
        method = KVzip(chunk=chunk, overlap=overlap, key_block=key_block, kernel=kernel)  # validates
    elif not isinstance(method, KVzip):
        raise ValueError(f"method must be a KVzip (or None), got {type(method).__name__}")
    else:
        method = dataclasses.replace(method, scores=None, fitted=-1)
    chunk, overlap = method.chunk, method.overlap
    _check(context_ids, chunk, method.key_block)
    config = config or SnapKVConfig()
    length = context_ids.shape[1]
    longest = max(len(x) for x in replay_inputs(range(length), prompt_ids, chunk, overlap))
    with SnapKVCache(model, config, capture=True) as source:
        model(input_ids=context_ids, position_ids=torch.arange(length, device=context_ids.device)[None],
              logits_to_keep=1, **_cache_kwarg(model, source))
        replay = replay_cache_from_capture(model, source.captured, length, longest)
        method.fit(model, context_ids, prompt_ids, cache=replay)
        del replay
        cache = source.derive(method, config, window=config.window)
    return cache, method
