"""Measure one benchmark point: TTFT, prefill tokens/s, decode ms/token, peak memory, KV bytes.

Modes:

* ``hf``: transformers' own loop with a full ``DynamicCache`` (prefill with ``logits_to_keep=1``,
  then one ``model(...)`` call per token): the baseline.
* ``full``: the engine keeping every prompt token (static cache, captured decode, no scoring).
* ``snapkv``: the engine with a SnapKV budget.

Timing: CUDA events around each decode step (warm-up steps discarded, median reported);
synchronize around the prefill. An out-of-memory (predicted by the engine's memory check, or
raised by the allocator) is reported as ``status="oom"`` and the process carries on.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from snapkv.config import SnapKVConfig
from snapkv.generation import Engine, NotEnoughMemoryError, sample
from snapkv.generation.prefill import PrefillStats
from snapkv.integration.hf import cache_argument

MODES: tuple[str, ...] = ("hf", "full", "snapkv")
VARIANTS: tuple[str, ...] = ("", "unfused", "eager")
GiB = 1024**3


@dataclass(frozen=True)
class Point:
    """One configuration to measure."""

    mode: str
    length: int
    batch: int = 1
    budget: int | None = None
    layers: int | None = None  # run the prefill through the first layers only (peak memory at 1M)
    variant: str = ""  # engine ablations: "unfused" (no fused kernels), "eager" (no CUDA graph)

    @property
    def label(self) -> str:
        """Short name: ``hf``, ``full``, ``snapkv-2048`` or ``snapkv-2048/eager``."""
        base = f"snapkv-{self.budget}" if self.mode == "snapkv" else self.mode
        return f"{base}/{self.variant}" if self.variant else base


@dataclass
class Options:
    """Settings shared by all points of a sweep."""

    steps: int = 32
    warmup: int = 4
    prefill_chunk: int = 8192
    window: int = 32
    kernel: int = 31
    pooling: str = "max"
    backend: str | None = None
    use_graph: bool | None = None
    fused: bool | None = None
    whole_layer_bytes: int | None = None
    seed: int = 0
    #: Run one untimed prefill of the same prompt first (kernel plans, allocator growth), so TTFT
    #: is a warm prefill's, as every call after a server's or script's first is.
    warm_prefill: bool = False


@dataclass
class Result:
    """What was measured at one point (``None`` where it does not apply or was not reached)."""

    mode: str
    label: str
    length: int
    batch: int
    budget: int | None
    status: str = "ok"
    message: str = ""
    layers_run: int | None = None
    ttft_s: float | None = None
    ttft_full_depth_est_s: float | None = None
    prefill_tok_s: float | None = None
    decode_ms: float | None = None
    decode_ms_p10: float | None = None
    decode_ms_p90: float | None = None
    decode_tok_s: float | None = None
    capture_s: float | None = None
    peak_gib: float | None = None
    peak_prefill_gib: float | None = None
    reserved_gib: float | None = None
    kv_gib: float | None = None
    kept_kv_gib: float | None = None
    score_share: float | None = None
    phase_ms: dict[str, float] = field(default_factory=dict)
    wall_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _reset_peak(device: torch.device) -> None:
    """Free what a warm-up left (Python garbage) and restart the peak count; the allocator keeps its blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> tuple[float | None, float | None]:
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device) / GiB, torch.cuda.max_memory_reserved(device) / GiB


def time_steps(step: Any, n: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``n`` calls of ``step()``: CUDA events between calls, or a host clock."""
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
        events[0].record()
        for i in range(n):
            step()
            events[i + 1].record()
        torch.cuda.synchronize(device)
        return [events[i].elapsed_time(events[i + 1]) for i in range(n)]
    out = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        out.append(1000.0 * (time.perf_counter() - t))
    return out


def _fill_decode_stats(res: Result, times: list[float], batch: int) -> None:
    times = sorted(times)
    res.decode_ms = statistics.median(times)
    res.decode_ms_p10 = times[len(times) // 10]
    res.decode_ms_p90 = times[(9 * len(times)) // 10]
    res.decode_tok_s = 1000.0 * batch / res.decode_ms


def _prompt(point: Point, vocab: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed + point.length + 7919 * point.batch)
    return torch.randint(4, vocab, (point.batch, point.length), generator=g).to(device)


def _engine_point(model: torch.nn.Module, point: Point, opts: Options, res: Result) -> None:
    config = None
    if point.mode == "snapkv":
        config = SnapKVConfig(budget=point.budget, window=opts.window, kernel=opts.kernel, pooling=opts.pooling)
    if point.variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {point.variant!r}")
    use_graph = False if point.variant == "eager" else opts.use_graph
    fused = False if point.variant == "unfused" else opts.fused
    engine = Engine(model, config, prefill_chunk=opts.prefill_chunk, attention_backend=opts.backend,
                    use_graph=use_graph, fused=fused, whole_layer_bytes=opts.whole_layer_bytes)
    parts = engine.parts
    device = parts.device
    ids = _prompt(point, parts.vocab_size, device, opts.seed)
    _sync(device)
    with torch.inference_mode():
        if opts.warm_prefill:
            engine.prefill(ids, max_new_tokens=opts.warmup + opts.steps + 1, num_layers=point.layers)
            _sync(device)
            _reset_peak(device)
        t0 = time.perf_counter()
        cache, logits, stats = engine.prefill(ids, max_new_tokens=opts.warmup + opts.steps + 1, num_layers=point.layers)
        first = sample(logits)
        _sync(device)
        res.ttft_s = time.perf_counter() - t0
        res.peak_prefill_gib = _peak(device)[0]
        _record_prefill(res, stats, point, parts.num_layers)
        if point.layers is not None and point.layers < parts.num_layers:  # same work per layer as a full run
            for li in range(point.layers, parts.num_layers):
                cache.copy_layer(point.layers - 1, li)
        runner = engine.runner(cache)
        runner.feed(first)
        runner.capture()
        res.capture_s = runner.capture_s
        for _ in range(opts.warmup):
            runner.step()
        _fill_decode_stats(res, time_steps(runner.step, opts.steps, device), point.batch)
        res.kv_gib = cache.kv_bytes() / GiB
        res.kept_kv_gib = cache.kept_bytes() / GiB
        del runner, cache


def _record_prefill(res: Result, stats: PrefillStats, point: Point, depth: int) -> None:
    res.prefill_tok_s = point.batch * point.length / res.ttft_s
    res.phase_ms = {k: round(v, 3) for k, v in stats.phase_ms.items()}
    total = sum(stats.phase_ms.values())
    if total > 0:
        res.score_share = stats.phase_ms.get("score", 0.0) / total
    if point.layers is not None and point.layers < depth:
        per_layer = sum(v for k, v in stats.phase_ms.items() if k not in ("embed", "logits")) / point.layers
        fixed = stats.phase_ms.get("embed", 0.0) + stats.phase_ms.get("logits", 0.0)
        res.ttft_full_depth_est_s = (fixed + per_layer * depth) / 1000.0


def _hf_point(model: torch.nn.Module, point: Point, opts: Options, res: Result) -> None:
    from transformers import DynamicCache

    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().out_features
    ids = _prompt(point, vocab, device, opts.seed)
    key = cache_argument(model)
    with torch.inference_mode():
        if opts.warm_prefill:
            model(input_ids=ids, use_cache=True, logits_to_keep=1, **{key: DynamicCache(config=model.config)})
            _sync(device)
            _reset_peak(device)
        cache = DynamicCache(config=model.config)
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{key: cache})
        nxt = out.logits[:, -1].argmax(-1)
        _sync(device)
        res.ttft_s = time.perf_counter() - t0
        res.prefill_tok_s = point.batch * point.length / res.ttft_s
        res.peak_prefill_gib = _peak(device)[0]
        del out
        state = {"tok": nxt}

        def step() -> None:
            o = model(input_ids=state["tok"][:, None], use_cache=True, **{key: cache})
            state["tok"] = o.logits[:, -1].argmax(-1)

        for _ in range(opts.warmup):
            step()
        _fill_decode_stats(res, time_steps(step, opts.steps, device), point.batch)
        kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        res.kv_gib = res.kept_kv_gib = kv / GiB


def measure(model: torch.nn.Module, point: Point, opts: Options) -> Result:
    """Measure ``point``; out-of-memory and over-capacity are reported in the result, not raised."""
    if point.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {point.mode!r}")
    device = next(model.parameters()).device
    res = Result(point.mode, point.label, point.length, point.batch, point.budget, layers_run=point.layers)
    _reset(device)
    t0 = time.perf_counter()
    failure = None
    try:
        if point.mode == "hf":
            _hf_point(model, point, opts, res)
        else:
            _engine_point(model, point, opts, res)
    except NotEnoughMemoryError as err:
        failure = ("oom", f"predicted before prefill: {err}")
    except torch.OutOfMemoryError as err:
        failure = ("oom", "out of memory: " + str(err).splitlines()[0][:300])
    res.peak_gib, res.reserved_gib = _peak(device)
    if failure is not None:  # handled outside the except block: the failed frames are gone
        res.status, res.message = failure
        _reset(device)
    res.wall_s = time.perf_counter() - t0
    return res
