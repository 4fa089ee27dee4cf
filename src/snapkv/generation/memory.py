"""Memory plan of a generation: what the cache and the prefill need, checked before prefill.

The prefill holds at most one layer's full keys and values, the residual stream of the row
being prefilled, and the work of one chunk of queries or MLP rows; the cache holds every
layer's kept tokens plus room for the generated ones. :func:`check_fits` compares that with
the device's free memory and raises :class:`NotEnoughMemoryError` naming a setting that fits,
before any long computation starts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from snapkv.generation.adapter import DecoderParts

GiB = 1024**3
#: Slack for allocator fragmentation, cuBLAS/cuDNN workspaces and the decode graph's pool.
MARGIN_BYTES = 768 * 1024**2
MARGIN_FRACTION = 0.08


class NotEnoughMemoryError(MemoryError):
    """A prompt (or batch) cannot fit in the device's memory with these settings.

    Attributes:
        need_bytes: estimated bytes the run needs beyond what is already allocated.
        free_bytes: bytes the device could give.
        suggestion: a setting that would fit, in words.
    """

    def __init__(self, message: str, need_bytes: int, free_bytes: int, suggestion: str) -> None:
        super().__init__(message)
        self.need_bytes = need_bytes
        self.free_bytes = free_bytes
        self.suggestion = suggestion


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """Estimated bytes of one generation (weights excluded: they are already resident)."""

    cache_bytes: int
    prefill_work_bytes: int

    @property
    def total(self) -> int:
        """Cache plus the prefill's transient peak plus slack."""
        raw = self.cache_bytes + self.prefill_work_bytes
        return int(raw * (1 + MARGIN_FRACTION)) + MARGIN_BYTES


def cache_bytes(parts: DecoderParts, batch: int, capacity: int) -> int:
    """Bytes of a :class:`~snapkv.generation.static_cache.StaticKVCache` (K, V and the fp32 mask)."""
    elem = torch.empty((), dtype=parts.dtype).element_size()
    kv = 2 * parts.num_layers * batch * parts.num_kv_heads * capacity * parts.head_dim * elem
    return kv + 4 * parts.num_layers * batch * parts.num_kv_heads * capacity


def prefill_work_bytes(
    parts: DecoderParts, length: int, chunk: int, intermediate: int, whole_layer_bytes: int = 0
) -> int:
    """Transient peak of prefilling one row of ``length`` tokens in chunks of ``chunk``."""
    elem = torch.empty((), dtype=parts.dtype).element_size()
    h, hq, hkv, d = parts.hidden_size, parts.num_heads, parts.num_kv_heads, parts.head_dim
    c = min(chunk, length)
    resident = length * h * elem + 2 * length * hkv * d * elem + 16 * length  # residual, K, V, ids, positions
    whole = 2 * length * hq * d * elem
    if whole <= whole_layer_bytes:  # the layer's queries and attention output, and the kernel's LSE
        resident += whole + 4 * length * hq
    attn = c * (3 * hq * d * elem + 2 * h * elem + 4 * d * elem) + c * hq * d * 4 * 3 + 12 * c * hq
    mlp = c * (3 * intermediate * elem + 2 * h * elem)
    score = length * (hq * 4 + 6 * hkv * 4) + 2 * length * hkv * 8  # votes, pooled, top-k scratch
    return resident + max(attn, mlp, score)


def plan(
    parts: DecoderParts, lengths: Sequence[int], capacity: int, chunk: int, whole_layer_bytes: int = 0
) -> MemoryPlan:
    """The memory plan for prefilling ``lengths`` (one row at a time) into a cache of ``capacity``."""
    inter = getattr(parts.model.config.get_text_config(decoder=True), "intermediate_size", 4 * parts.hidden_size)
    work = prefill_work_bytes(parts, max(lengths), chunk, inter, whole_layer_bytes)
    return MemoryPlan(cache_bytes(parts, len(lengths), capacity), work)


def available_bytes(device: torch.device) -> int | None:
    """Bytes the CUDA caching allocator could still hand out (free plus cached), or None off CUDA."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + cached


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def check_fits(
    parts: DecoderParts,
    lengths: Sequence[int],
    capacity: int,
    chunk: int,
    *,
    compressed: bool,
    capacity_for: Callable[[int], int],
    whole_layer_bytes: int = 0,
) -> MemoryPlan:
    """Raise :class:`NotEnoughMemoryError` if the plan exceeds the free device memory.

    Args:
        parts: the model.
        lengths: prompt lengths of the rows.
        capacity: cache slots per row and layer of this run.
        chunk: prefill chunk length.
        compressed: whether a budget limits the cache (else it holds every prompt token).
        capacity_for: cache slots a single prompt of a given length would need (for suggestions).
        whole_layer_bytes: the prefill's allowance for whole-layer attention.
    """
    wb = whole_layer_bytes
    the_plan = plan(parts, lengths, capacity, chunk, wb)
    free = available_bytes(parts.device)
    if free is None or the_plan.total <= free:
        return the_plan
    n, b = max(lengths), len(lengths)
    hints = []
    if not compressed:
        hints.append("compress the cache (e.g. budget=2048)")
    if b > 1:
        fit_rows = max(r for r in range(0, b) if r == 0 or plan(parts, [n] * r, capacity, chunk, wb).total <= free)
        if fit_rows:
            hints.append(f"{fit_rows} rows per batch instead of {b}")
    if chunk > 2048:
        smaller = plan(parts, lengths, capacity, 2048, wb)
        if smaller.total <= free:
            hints.append("prefill_chunk=2048")
    lo, hi = 0, n
    while lo < hi:  # the longest single prompt that fits with these settings
        mid = (lo + hi + 1) // 2
        if plan(parts, [mid], capacity_for(mid), chunk, wb).total <= free:
            lo = mid
        else:
            hi = mid - 1
    if lo:
        hints.append(f"prompts of at most {lo} tokens")
    suggestion = "; or ".join(hints) if hints else "free device memory or use a larger GPU"
    message = (
        f"{b} prompt(s) of up to {n} tokens need about {_gib(the_plan.total)} on {parts.device} "
        f"(cache {_gib(the_plan.cache_bytes)}, prefill work {_gib(the_plan.prefill_work_bytes)}), "
        f"but only {_gib(free)} is free. Would fit: {suggestion}."
    )
    raise NotEnoughMemoryError(message, the_plan.total, free, suggestion)
