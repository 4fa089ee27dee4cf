"""Benchmark sweeps: which points to measure, in priority order (a time budget cuts the tail).

Presets:

* ``gpu``: the Llama-3-8B shape with random bf16 weights on one GPU. Batch 1 from 4K to 1M
  tokens (the 1M point runs its prefill through the first layers of the full-weight model, see
  :class:`~snapkv.bench.measure.Point`), batches 2-8, the full cache until it runs out of
  memory, transformers' loop as the baseline, SnapKV budgets 1024-4096.
* ``cpu``: the default offline model (SmolLM2-135M), one 8K prompt, full cache vs budget 1024.
* ``quick``: a tiny random model, a few short prompts (tests and smoke runs).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from snapkv.bench.measure import MODES, Options, Point

K = 1024


@dataclass
class Sweep:
    """A model, the points to measure on it, and shared options."""

    name: str
    model: str
    points: list[Point]
    options: Options = field(default_factory=Options)
    model_layers: int | None = None


def grid(
    lengths: Sequence[int],
    batches: Sequence[int] = (1,),
    budgets: Sequence[int] = (2048,),
    modes: Sequence[str] = MODES,
    *,
    hf_max_tokens: int | None = None,
    partial_layers: dict[int, int] | None = None,
) -> list[Point]:
    """Every (length, batch, mode, budget) point; ``hf`` only up to ``hf_max_tokens`` prompt tokens."""
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"modes must be among {MODES}, got {bad}")
    partial_layers = partial_layers or {}
    points = []
    for n in lengths:
        for b in batches:
            for mode in modes:
                if mode == "hf" and hf_max_tokens is not None and n * b > hf_max_tokens:
                    continue
                for budget in budgets if mode == "snapkv" else (None,):
                    layers = partial_layers.get(n) if mode == "snapkv" else None
                    points.append(Point(mode, n, b, budget, layers))
    return points


def _dedupe(points: Iterable[Point]) -> list[Point]:
    seen: set[Point] = set()
    out = []
    for p in points:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def gpu_points(max_length: int = 1024 * K, partial_layers_1m: int = 4) -> list[Point]:
    """The GPU preset's points, most important first."""
    short = [n for n in (4 * K, 16 * K, 32 * K, 64 * K, 128 * K) if n <= max_length]
    pts: list[Point] = []
    # 1. batch 1 up to 128K: the target budget, the two baselines, then the other budgets.
    pts += grid(short, budgets=(2048,), modes=("snapkv", "full", "hf"))
    # 2. eight 128K prompts at once (the throughput target), and what the full cache does there.
    if 128 * K <= max_length:
        pts += grid([128 * K], batches=(8,), budgets=(2048,), modes=("snapkv", "full", "hf"))
    # 3. longer prompts at batch 1: budget 2048 and the full cache until it runs out of memory.
    long = [n for n in (256 * K, 512 * K) if n <= max_length]
    pts += grid(long, budgets=(2048,), modes=("snapkv", "full"))
    if 1024 * K <= max_length:
        pts += grid([1024 * K], budgets=(2048,), modes=("full", "snapkv"),
                    partial_layers={1024 * K: partial_layers_1m} if partial_layers_1m else None)
    # 4. what the fused kernels and the CUDA graph each bring (budget 2048, 16K, batch 1).
    if 16 * K <= max_length:
        pts += [Point("snapkv", 16 * K, 1, 2048, variant=v) for v in ("unfused", "eager")]
    # 5. the other budgets, and batches 2-8 at 16K.
    pts += grid(short, budgets=(1024, 4096), modes=("snapkv",))
    pts += grid([16 * K], batches=(2, 4, 8), budgets=(2048,), modes=("snapkv", "full", "hf"))
    pts += grid([16 * K], batches=(8,), budgets=(1024, 4096), modes=("snapkv",))
    if 256 * K <= max_length:
        pts += grid([256 * K], modes=("hf",))  # the baseline's own out-of-memory point
    return _dedupe(pts)


def split_parts(points: list[Point], part: int | None) -> list[Point]:
    """Part 1: batch 1 up to 128K with the target budget and both baselines, and eight 128K prompts;
    part 2: everything else (256K to 1M, the other budgets, batches 2-8 at 16K, ablations).

    One device command may run 10 minutes; the whole GPU preset takes about 11 (part 1 about 3.5,
    leaving room for the checks and tests in the same command; part 2 about 7.5).
    """
    if part is None:
        return points
    first = [p for p in points if p.length <= 128 * K and not p.variant and p.budget in (None, 2048)
             and (p.batch == 1 or p.length == 128 * K)]
    if part == 1:
        return first
    if part == 2:
        return [p for p in points if p not in first]
    raise ValueError(f"part must be 1 or 2, got {part}")


def preset(name: str) -> Sweep:
    """A named sweep: ``gpu``, ``cpu`` or ``quick``."""
    if name == "gpu":
        return Sweep("gpu", "llama3-8b", gpu_points(), Options(steps=48, warmup=6, prefill_chunk=8192))
    if name == "cpu":
        pts = grid([8 * K], budgets=(1024,), modes=("full", "snapkv"))
        return Sweep("cpu", "smollm2", pts, Options(steps=8, warmup=2, prefill_chunk=2048))
    if name == "quick":
        pts = grid([256, 1024], batches=(1, 2), budgets=(64, 128), modes=MODES)
        return Sweep("quick", "tiny-llama", pts, Options(steps=4, warmup=1, prefill_chunk=128, window=8))
    raise ValueError(f"preset must be one of ('gpu', 'cpu', 'quick'), got {name!r}")
