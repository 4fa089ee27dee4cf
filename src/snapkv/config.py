"""SnapKV settings, validated once, before any model work."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

Pooling = Literal["max", "avg"]
Reduce = Literal["mean", "max"]

POOLINGS: tuple[str, ...] = ("max", "avg")
REDUCTIONS: tuple[str, ...] = ("mean", "max")


@dataclass(slots=True, frozen=True)
class SnapKVConfig:
    """How much of each layer's prompt KV cache to keep, and how to choose it.

    Based on SnapKV (Li et al. 2024, arXiv:2404.14469).

    Args:
        budget: tokens kept per layer and KV head, window included (an ``int`` above
            ``window``), or the fraction of each prompt kept (a ``float`` in (0, 1]).
        window: observation window: the last ``window`` prompt tokens vote and are always kept.
        kernel: odd width of the 1-D pooling applied to the votes along the sequence
            (default 31; the paper's is 7: on our measurements 31 is never worse and keeps
            whole multi-token values, see README "Why kernel 31" and docs/RESULTS.md).
        pooling: ``"max"`` or ``"avg"`` pooling of the votes.
        gqa_reduce: how votes of the query heads that share one KV head are combined,
            ``"mean"`` or ``"max"``; the cache keeps the model's native KV-head width.
        chunk_size: keys scored per chunk, bounding the scoring memory on long prompts.
    """

    budget: int | float = 1024
    window: int = 32
    kernel: int = 31
    pooling: Pooling = "max"
    gqa_reduce: Reduce = "mean"
    chunk_size: int = field(default=8192)

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise ValueError(f"budget must be an int (tokens) or a float in (0, 1] (fraction kept), got {b!r}")
        if isinstance(b, float):
            if not (0.0 < b <= 1.0) or math.isnan(b):
                raise ValueError(f"budget as a fraction must lie in (0, 1], got {b!r}")
        elif b <= self.window:
            raise ValueError(
                f"budget must be greater than window ({self.window}) tokens, got {b}; "
                "the window is kept whole and counts towards the budget"
            )
        if isinstance(self.kernel, bool) or not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd integer (1, 3, 5, 7, ...), got {self.kernel!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.gqa_reduce not in REDUCTIONS:
            raise ValueError(f"gqa_reduce must be one of {REDUCTIONS}, got {self.gqa_reduce!r}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {self.chunk_size!r}")

    def kept_tokens(self, length: int, window: int | None = None) -> int:
        """Tokens kept of a ``length``-token prompt (the whole prompt if it fits the budget).

        Raises ``ValueError`` when a fractional budget of this prompt does not exceed the window.
        """
        window = self.window if window is None else window
        if isinstance(self.budget, float):
            n = math.ceil(self.budget * length)
            if n >= length:
                return length
            if n <= window:
                raise ValueError(
                    f"budget fraction {self.budget} of a {length}-token prompt is {n} tokens, "
                    f"not above the window ({window}); raise budget or lower window"
                )
            return n
        if self.budget <= window:
            raise ValueError(f"budget ({self.budget}) must be greater than the observation window ({window})")
        return min(length, self.budget)

    def with_window(self, window: int) -> SnapKVConfig:
        """A copy with another observation window (validated again)."""
        return replace(self, window=window)
