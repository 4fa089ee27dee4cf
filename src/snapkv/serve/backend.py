"""What the scheduler asks of a backend: prefill one request, load it into a row, decode all rows.

Two backends implement it: :class:`~snapkv.serve.batcher.EngineBackend` (the engine: one
batched, captured decode step over a :class:`~snapkv.serve.slots.SlotKVCache`) and
:class:`~snapkv.serve.hf_backend.TransformersBackend` (transformers' forward with a SnapKV
session, one cache per request, decoded one request after another: not batched).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from snapkv.config import SnapKVConfig
from snapkv.serve.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class PrefillJob:
    """One request's prompt and SnapKV settings.

    Attributes:
        ids: the whole prompt's token ids.
        config: the request's SnapKV settings.
        context_tokens: > 0 to serve the first ``context_tokens`` ids from the document cache
            (compressed context-only on a miss); the rest is fed after them.
    """

    ids: list[int]
    config: SnapKVConfig
    context_tokens: int = 0


@dataclass
class Prefilled:
    """A prefilled request, ready to join the decode batch.

    Attributes:
        state: the backend's per-request cache (a 1-row static cache, or a transformers cache).
        logits: ``[V]`` logits of the last prompt token.
        prompt_tokens: prompt length.
        kept_tokens: prompt tokens the largest layer keeps.
        cached_tokens: context tokens read from the document cache (0 on a miss).
        ready: a CUDA event recorded after the prefill's work (None off CUDA).
        prefill_s: seconds the prefill took (host wall time).
    """

    state: Any
    logits: torch.Tensor
    prompt_tokens: int
    kept_tokens: int
    cached_tokens: int = 0
    ready: Any = None
    prefill_s: float = 0.0


class Backend(Protocol):
    """The operations the scheduler calls (all from its own thread but :meth:`prefill`)."""

    name: str
    rows: int
    slot_tokens: int
    concurrent_prefill: bool  # True: prefill() may run in a worker thread while step() runs
    device: torch.device

    def row_slots(self, prompt_tokens: int, config: SnapKVConfig, context_tokens: int) -> int:
        """Slots a request's kept prompt takes in a row."""

    def warmup(self) -> None:
        """Prepare decoding (e.g. capture the CUDA graph) before any prefill runs."""

    def prefill(self, job: PrefillJob) -> Prefilled:
        """Prefill one request."""

    def first_token(self, pre: Prefilled, params: SamplingParams, gen: torch.Generator | None) -> int:
        """Pick the request's first token from its prefill logits."""

    def load(self, row: int, pre: Prefilled) -> None:
        """Put a prefilled request into a free row."""

    def free(self, row: int) -> None:
        """Release a row."""

    def step(self, inputs: dict[int, int], samplers: dict[int, tuple[SamplingParams, Any]]) -> dict[int, int]:
        """Feed each busy row its last token; return each busy row's next token."""

    def held_bytes(self) -> int:
        """KV bytes held by busy rows."""
