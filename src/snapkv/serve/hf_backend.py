"""The transformers backend: one SnapKV cache per request, decoded one request after another.

For models the engine cannot run (Gemma's sliding-window layers, fused projections, ...): the
model's own forward with one :class:`~snapkv.cache.compressed.SnapKVCache` per request (each
with the request's SnapKV settings), as :func:`snapkv.answer` does. Requests still join and
leave between steps and the scheduler serves them round-robin, but each step runs one forward
per busy request: this backend is NOT batched, and it has no document cache. Prefills run in
the scheduler's thread, so they pause the others' decoding.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from snapkv.cache.compressed import SnapKVCache
from snapkv.config import SnapKVConfig
from snapkv.integration.hf import cache_argument
from snapkv.serve.backend import Prefilled, PrefillJob
from snapkv.serve.extend import method_for
from snapkv.serve.sampling import SamplingParams, sample_token


@dataclasses.dataclass
class _Row:
    cache: SnapKVCache
    position: int  # the next token's position


class TransformersBackend:
    """Per-request transformers caches that compress themselves (not batched).

    Args:
        model: any decoder :class:`~snapkv.cache.compressed.SnapKVCache` supports.
        rows: concurrent requests.
        slot_tokens: kept prompt tokens plus ``max_tokens`` a request may use.
    """

    name = "transformers"
    concurrent_prefill = False

    def __init__(self, model: torch.nn.Module, *, rows: int, slot_tokens: int) -> None:
        if rows < 1:
            raise ValueError(f"rows (--max-batch) must be >= 1, got {rows}")
        self.model, self.rows, self.slot_tokens = model, rows, slot_tokens
        self.device = model.device
        self._keyword = cache_argument(model)
        self._rows: dict[int, _Row] = {}

    def close(self) -> None:
        """Close every cache still held (each gives its hold on the model back)."""
        for row in list(self._rows):
            self.free(row)

    def row_slots(self, prompt_tokens: int, config: SnapKVConfig, context_tokens: int) -> int:
        """Kept prompt tokens (the largest layer's)."""
        if context_tokens:
            raise ValueError("the document cache needs --backend engine")
        return config.kept_tokens(prompt_tokens)

    def warmup(self) -> None:
        """Nothing to capture."""

    @torch.inference_mode()
    def prefill(self, job: PrefillJob) -> Prefilled:
        """Prefill one request with its own SnapKV settings (scheduler thread only)."""
        if job.context_tokens:
            raise ValueError("the document cache needs --backend engine")
        t0 = time.perf_counter()
        cache = SnapKVCache(self.model, job.config, method_for(job.config))
        try:
            ids = torch.tensor([job.ids], device=self.device)
            logits = self.model(input_ids=ids, **{self._keyword: cache}).logits[0, -1]
        except BaseException:
            cache.close()
            raise
        kept = max((max(st.kept_tokens) for st in cache.stats), default=len(job.ids))
        return Prefilled(_Row(cache, len(job.ids)), logits, len(job.ids), kept, 0, None, time.perf_counter() - t0)

    def first_token(self, pre: Prefilled, params: SamplingParams, gen: torch.Generator | None) -> int:
        """The first generated token."""
        return int(sample_token(pre.logits, params, gen))

    def load(self, row: int, pre: Prefilled) -> None:
        """Hold the request's cache in ``row``."""
        if row in self._rows:
            raise ValueError(f"row {row} is busy; free it first")
        self._rows[row] = pre.state

    def free(self, row: int) -> None:
        """Close the row's cache."""
        state = self._rows.pop(row, None)
        if state is not None:
            state.cache.close()

    @torch.inference_mode()
    def step(self, inputs: dict[int, int], samplers: dict[int, tuple[SamplingParams, Any]]) -> dict[int, int]:
        """One forward per busy row, round-robin (not batched)."""
        out = {}
        for row, tok in inputs.items():
            state = self._rows[row]
            x = torch.tensor([[tok]], device=self.device)
            pos = torch.tensor([[state.position]], device=self.device)
            logits = self.model(input_ids=x, position_ids=pos, **{self._keyword: state.cache}).logits[0, -1]
            state.position += 1
            params, gen = samplers.get(row, (SamplingParams(temperature=0.0), None))
            out[row] = int(sample_token(logits, params, gen))
        return out

    def held_bytes(self) -> int:
        """KV bytes of the busy requests' caches."""
        return sum(r.cache.kv_bytes() for r in self._rows.values())
