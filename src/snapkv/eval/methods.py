"""Evaluated methods by name: each is a selection :class:`~snapkv.methods.Method` plus a layer profile.

``full`` keeps the whole cache (the reference). Every other method selects from the same
captured prefill, so one prefill per sample serves all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from snapkv.api import DEFAULT_PROBE
from snapkv.methods import H2O, Method, RandomSelect, SnapKV, StreamingLLM
from snapkv.methods.kvzip import DEFAULT_REPLAY_PROMPT, KVzip, replay_cache_from_capture, replay_inputs


@dataclass(frozen=True)
class EvalMethod:
    """A named evaluation method.

    Attributes:
        name: command-line name.
        make: builds the selection method (None for the full cache).
        profile: layer budget profile (``uniform`` or ``pyramid``).
        uses_queries: whether scores come from prompt queries (so a probe window can help).
        head_budget: ``uniform`` (every KV head keeps the budget) or ``adaptive`` (AdaKV: the
            layer's heads share the total, ragged cache).
        replay: the method scores by replaying the context (KVzip): it is fitted on the
            context before deriving (:func:`fit_replay`) and runs in ``context`` mode only.
    """

    name: str
    make: Callable[[], Method] | None
    profile: str = "uniform"
    uses_queries: bool = False
    head_budget: str = "uniform"
    replay: bool = False

    @property
    def scorer(self) -> str:
        """Methods with the same scorer share its memoized scores on one prefill."""
        return "snapkv" if self.name in ("pyramidkv", "adakv") else self.name


METHODS: dict[str, EvalMethod] = {
    "full": EvalMethod("full", None),
    "snapkv": EvalMethod("snapkv", lambda: SnapKV(kernel=7, pooling="max"), "uniform", True),
    "pyramidkv": EvalMethod("pyramidkv", lambda: SnapKV(kernel=7, pooling="max"), "pyramid", True),
    # A wider pooling kernel: keeps whole digit-per-token numbers and their sentence (see RESULTS.md).
    "snapkv-k31": EvalMethod("snapkv-k31", lambda: SnapKV(kernel=31, pooling="max"), "uniform", True),
    "adakv": EvalMethod("adakv", lambda: SnapKV(kernel=7, pooling="max"), "uniform", True, "adaptive"),
    "streaming": EvalMethod("streaming", lambda: StreamingLLM(sinks=4)),
    "random": EvalMethod("random", lambda: RandomSelect(seed=0)),
    "h2o": EvalMethod("h2o", lambda: H2O(), "uniform", True),
    # Query-agnostic: the context's replay votes (KVzip); chunk 512 keeps CPU memory small at 2K-8K.
    "kvzip": EvalMethod("kvzip", lambda: KVzip(chunk=512), replay=True),
    # The same replay scores max-pooled over 31 positions, as snapkv-k31 pools its votes.
    "kvzip-k31": EvalMethod("kvzip-k31", lambda: KVzip(chunk=512, kernel=31), replay=True),
    # Span-limited replay (linear in the context): each 512-token chunk sees the first 32 context
    # tokens and 512 (1024) tokens either side of its own, not the whole context. It loses the votes
    # distant replay chunks give a key (results/kvzip/span_overlap_smollm2_4k.json).
    "kvzip-span": EvalMethod("kvzip-span", lambda: KVzip(chunk=512, span=512), replay=True),
    "kvzip-span1024": EvalMethod("kvzip-span1024", lambda: KVzip(chunk=512, span=1024), replay=True),
}

#: Where :func:`fit_replay` keeps the last replay of a prefill, for variants that share it.
REPLAY_KEY = "_replay"

#: ``query``: the question is in the prompt when the cache is compressed (the paper's setting).
#: ``context``: the context alone is compressed, the question comes afterwards.
#: ``probe``: context-only, but a generic question appended to the context votes, the context's
#: last ``window`` tokens are kept too (the library's ``Probe()``), then the probe is dropped.
#: ``probe-only``: the same without the kept tail (``Probe(tail=0)``; the probe mode of records
#: made before 2026-12).
MODES: tuple[str, ...] = ("query", "context", "probe", "probe-only")

#: The probe's tail (``Probe.tail``) of each probe mode: None is the window.
PROBE_TAILS: dict[str, int | None] = {"probe": None, "probe-only": 0}

#: The generic observation window of ``probe`` mode (task-agnostic; the library's default probe).
PROBE_TEXT = DEFAULT_PROBE


def resolve_methods(names: Sequence[str]) -> list[str]:
    """Check method names (``all`` expands); ``ValueError`` names the unknown ones."""
    out: list[str] = []
    for n in names:
        for m in METHODS if n == "all" else (n,):
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r}; choose from {sorted(METHODS)} or 'all'")
            if m not in out:
                out.append(m)
    return out


def resolve_modes(names: Sequence[str]) -> list[str]:
    """Check mode names; ``ValueError`` names the unknown ones."""
    for n in names:
        if n not in MODES:
            raise ValueError(f"unknown mode {n!r}; choose from {list(MODES)}")
    return list(dict.fromkeys(names))


def applies(method: str, mode: str) -> bool:
    """Whether ``method`` is evaluated in ``mode``.

    ``full`` runs once (query mode); replay methods score the context alone (context mode);
    ``probe`` needs votes from prompt queries (not H2O's accumulated scores).
    """
    m = METHODS[method]
    if m.make is None:
        return mode == "query"
    if m.replay:
        return mode == "context"
    return mode not in PROBE_TAILS or m.uses_queries and method != "h2o"


def fit_replay(model: torch.nn.Module, methods: dict[str, Method], method: str, captured: dict[int, Any],
               context_ids: Sequence[int], codec: Any) -> None:
    """Fit a replay method (KVzip) on the first ``len(context_ids)`` tokens of a captured prefill.

    Stores the fitted method in ``methods`` under its scorer name (once per prefill); replay
    methods with the same replay settings (e.g. other pooling) share one replay; other
    methods are left alone. The replay prompt is :data:`DEFAULT_REPLAY_PROMPT` followed by the
    codec's chat framing up to the answer (``codec.tail``), so the replay is the model's answer.
    """
    m = METHODS[method]
    if not m.replay or m.scorer in methods:
        return
    kvzip = m.make()
    done = methods.get(REPLAY_KEY)
    if done is not None and (done.chunk, done.overlap, done.precision, done.span, done.sink) == (
            kvzip.chunk, kvzip.overlap, kvzip.precision, kvzip.span, kvzip.sink):
        methods[m.scorer] = dataclasses.replace(kvzip, scores=done.scores, fitted=done.fitted)  # one replay
        return
    prompt = list(codec.encode(DEFAULT_REPLAY_PROMPT)) + list(codec.tail)
    n = len(context_ids)
    longest = max(len(x) for x in replay_inputs(range(n), prompt, kvzip.chunk, kvzip.overlap))
    cache = replay_cache_from_capture(model, captured, n, longest)
    device = next(model.parameters()).device
    ids = torch.tensor([list(context_ids)], device=device)
    methods[m.scorer] = methods[REPLAY_KEY] = kvzip.fit(model, ids, prompt, cache=cache)
