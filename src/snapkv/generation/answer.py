"""The engine side of :mod:`snapkv.api`: which backend runs, and ``answer()`` / ``ContextCache`` on it.

``backend="auto"`` picks the engine when :func:`engine_refusal` finds nothing against the model
(a supported model type on one device; see :data:`AUTO_DEVICES`) and the transformers path
otherwise; ``"engine"`` raises ``ValueError`` with the reason instead; nothing falls back
silently, and every :class:`~snapkv.api.Answer` names the backend that ran.

On the engine, a context-only cache is one prefill into a
:class:`~snapkv.generation.static_cache.StaticKVCache`; each question is fed over it by
teacher-forced decode steps (:meth:`Engine.extend`), answered, and rewound
(:meth:`StaticKVCache.rewind`): no second prefill.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from snapkv.api import Answer, LayerStats
from snapkv.cache.compress import snapkv_from
from snapkv.config import SnapKVConfig
from snapkv.generation.adapter import runner_for
from snapkv.generation.generate import Engine
from snapkv.generation.static_cache import StaticKVCache
from snapkv.methods.base import Method
from snapkv.methods.probe import probe_config, probe_selector

BACKENDS: tuple[str, ...] = ("auto", "engine", "transformers")

#: Device types on which ``backend="auto"`` picks the engine. CPU is included because the engine
#: was not slower there. Measured 2026-11-30, SmolLM2-135M fp32, answer()'s 2,037-token prompt,
#: budget 512, on a shared 2-core CPU (load ~11, so process CPU time, interleaved runs, medians):
#: OMP_NUM_THREADS=1: prefill 8.7 s engine vs 10.3 s transformers; decode 80 vs 95 ms/token.
#: 2 threads: prefill 18.1 vs 18.9 CPU s (wall 42 vs 55 s); decode inconclusive (604 vs 517
#: CPU ms/token, dominated by OpenMP spin-waiting under that load).
AUTO_DEVICES: tuple[str, ...] = ("cuda", "cpu")

#: New-token slots a context-only cache allocates at first (question plus answer); a longer
#: question plus answer moves the prompt into a larger cache (one copy, one graph capture).
DEFAULT_ROOM = 512


def _devices(model: torch.nn.Module) -> set[torch.device]:
    return {p.device for p in model.parameters()}


def engine_refusal(model: torch.nn.Module) -> str | None:
    """Why the engine cannot run ``model`` (None when it can)."""
    devices = _devices(model)
    if len(devices) != 1:
        return f"the engine runs a model on one device; this one spans {sorted(map(str, devices))}"
    try:
        runner_for(model)
    except ValueError as err:
        return str(err)
    return None


def resolve_backend(model: torch.nn.Module, backend: str) -> str:
    """``"engine"`` or ``"transformers"`` for ``backend`` in :data:`BACKENDS` (before any model work).

    Raises ``ValueError`` for an unknown backend, or ``"engine"`` on a model it cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "transformers":
        return backend
    reason = engine_refusal(model)
    if backend == "engine":
        if reason is not None:
            raise ValueError(f"backend='engine': {reason}")
        return backend
    device = next(iter(_devices(model)))
    return "engine" if reason is None and device.type in AUTO_DEVICES else "transformers"


def layer_stats(cache: StaticKVCache, row: int = 0, drop: int = 0, kinds: list[str] | None = None) -> list[LayerStats]:
    """Per compressed layer what compression kept of ``row`` (``drop``: probe tokens not counted).

    ``kinds``: the runner's layer kinds (``OwnLayers.kinds``; None: every layer is a full one).
    Sliding-window layers are left out, as on the transformers path, which compresses (and
    reports) the full-attention layers only.
    """
    per_token = 2 * cache.keys.shape[2] * cache.keys.shape[4] * cache.keys.element_size()
    n = cache.prompt_lengths[row]
    return [LayerStats(li, [n], [round(cache.kept[li][row])], (n + drop) * per_token,
                       round(cache.kept[li][row] * per_token))
            for li in range(cache.num_layers) if kinds is None or kinds[li] != "sliding"]


def runner_kinds(engine: Engine) -> list[str] | None:
    """The layer kinds of ``engine``'s runner (``"full"``/``"sliding"``), None for a runner without kinds."""
    return getattr(engine.parts, "kinds", None)


def _answer(tokenizer: Any, tokens: list[int], eos: list[int], stats: list[LayerStats], prompt_tokens: int,
            pre: float, dec: float, capture: float) -> Answer:
    text = tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True).strip()
    kept_tokens = max((max(s.kept_tokens) for s in stats), default=None)
    full = sum(s.bytes_before for s in stats)
    kept = sum(s.bytes_after for s in stats)
    return Answer(text, tokens, prompt_tokens, kept_tokens, full, kept, pre, dec, stats, backend="engine",
                  capture_s=capture)


def engine_answer(
    model: torch.nn.Module, tokenizer: Any, ids: list[int], config: SnapKVConfig | None, max_new_tokens: int,
    eos: list[int], method: Method | None = None,
) -> Answer:
    """``answer()`` on the engine: one prefill of ``ids`` (``config`` None: full cache), greedy decode.

    ``method``: the selection method (default SnapKV from ``config``), e.g. ``AdaptiveHeads(SnapKV())``.
    """
    engine = Engine(model, config, method=method)
    out = engine.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, eos_token_id=eos or None)
    tokens = out.tokens[0, : out.lengths[0]].tolist()
    stats = layer_stats(out.cache, kinds=runner_kinds(engine))
    return _answer(tokenizer, tokens, eos, stats, len(ids), out.ttft_s, out.decode_s - out.capture_s, out.capture_s)


class EngineContext:
    """A compressed context on the engine: prefilled once, asked many questions, rewound after each.

    Args:
        model, tokenizer: as :class:`~snapkv.api.ContextCache`'s.
        config: budget and scoring of the context.
        ctx_ids: the context's token ids.
        probe_ids: a probe's token ids (the observation window while the context is
            compressed, then cut), or empty.
        room: new-token slots allocated at first (question plus answer).
        method: the selection method (default SnapKV from ``config``), e.g. ``AdaptiveHeads(SnapKV())``.
        probe_tail: context tokens before the probe kept whatever the votes (``Probe.tail``; None: the window).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: SnapKVConfig, ctx_ids: list[int],
                 probe_ids: list[int], room: int = DEFAULT_ROOM, method: Method | None = None,
                 probe_tail: int | None = None) -> None:
        self.tokenizer = tokenizer
        n, g = len(ctx_ids), len(probe_ids)
        if g:  # the probe votes, the context's tail is kept, the probe is cut
            probed = probe_config(config, n, g, probe_tail)
            if probed is None:
                raise ValueError(f"probe_ids given, but the {n}-token context fits its budget: nothing to select "
                                 "(pass no probe)")
            method = probe_selector(method or snapkv_from(config), config, probe_tail)
            config = probed
        self.engine = Engine(model, config, method=method)
        sync = _sync_fn(self.engine.parts.device)
        t0 = time.perf_counter()
        self.cache, _, _ = self.engine.prefill(torch.tensor([ctx_ids + probe_ids]), max_new_tokens=room,
                                               probe_tokens=g)
        sync()
        self.prefill_s = time.perf_counter() - t0
        self.stats = layer_stats(self.cache, drop=0, kinds=runner_kinds(self.engine))
        self.context_tokens = n
        self.state = self.cache.state()
        self.runner = self.engine.runner(self.cache)
        self._capture()

    def _capture(self) -> None:
        """Capture the decode graph now (reported with the next answer, outside its timings)."""
        self.runner.capture()
        self._capture_s = self.runner.capture_s

    def _make_room(self, need: int) -> None:
        if need <= self.cache.remaining:
            return
        bigger = self.engine.parts.make_cache(self.cache.batch, self.cache.prompt_slots, max(need, 2 * DEFAULT_ROOM))
        bigger.copy_prompt_from(self.cache)
        self.cache = bigger
        self.state = bigger.state()
        self.runner = self.engine.runner(bigger)
        self._capture()

    def ask(self, q_ids: list[int], max_new_tokens: int, eos: list[int]) -> Answer:
        """Feed the question over the compressed context, decode greedily, rewind."""
        if not q_ids:
            raise ValueError("the question has no tokens")
        self._make_room(len(q_ids) + max_new_tokens - 1)
        sync = _sync_fn(self.engine.parts.device)
        try:
            t0 = time.perf_counter()
            logits = self.engine.extend(self.runner, torch.tensor([q_ids]))
            sync()
            pre = time.perf_counter() - t0
            stream = self.engine.decode(self.runner, logits, max_new_tokens=max_new_tokens, eos_token_id=eos or None)
            for _ in stream:
                pass
            out = stream.output
        finally:
            self.cache.rewind(self.state)
        tokens = out.tokens[0, : out.lengths[0]].tolist()
        capture, self._capture_s = self._capture_s, 0.0
        return _answer(self.tokenizer, tokens, eos, self.stats, self.context_tokens + len(q_ids),
                       self.prefill_s + pre, out.decode_s, capture)


def _sync_fn(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


__all__ = ["AUTO_DEVICES", "BACKENDS", "EngineContext", "engine_answer", "engine_refusal", "resolve_backend"]
