"""Probe: query-agnostic (reuse) scoring by a generic question that votes, then leaves the cache.

A context compressed once and asked many questions later (``ContextCache``, the server's
document cache) has no question to vote with; its own last tokens are a poor observation
window. :class:`Probe` appends a task-agnostic question (:data:`DEFAULT_PROBE`) to the context
while it is compressed: the probe's tokens are the observation window of the inner SnapKV
scorer, then they are cut, so the cache holds the budget of context tokens only.

The default, ``Probe(SnapKV(kernel=31))``, is the reuse scorer the measurements chose
(docs/RESULTS.md, "Reuse at 4x"): a wide pooling kernel keeps whole digit-per-token numbers
and their sentence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from snapkv.methods.base import Method, ScoreInputs
from snapkv.methods.snapkv import SnapKV

#: A task-agnostic probe question for context-only caches (``ContextCache(probe=True)``).
DEFAULT_PROBE = (
    "\nQuestion: What are the special numbers, keys, names, values and words stated in the text above? "
    "Recall them exactly."
)

#: The pooling kernel of the default reuse scorer (``Probe()``).
REUSE_KERNEL = 31


@dataclass(slots=True)
class Probe(Method):
    """A generic question as the observation window of a SnapKV scorer, cut after it voted.

    The wrapper scores as its inner :class:`~snapkv.methods.SnapKV` does; what it adds is the
    probe text, which the cache that uses it (``ContextCache``, the server's document cache)
    appends to the context while compressing and then drops.

    Args:
        method: the inner method: a :class:`~snapkv.methods.SnapKV` (default kernel 31, max
            pooling) or a wrapper of one (e.g. ``AdaptiveHeads(SnapKV(kernel=31))``).
        text: the probe question (default :data:`DEFAULT_PROBE`), non-empty.
    """

    method: Method = field(default_factory=lambda: SnapKV(kernel=REUSE_KERNEL))
    text: str = DEFAULT_PROBE
    name: str = "probe"

    def __post_init__(self) -> None:
        if not isinstance(self.method, Method) or not isinstance(self.method.scorer, SnapKV):
            raise ValueError(f"method must be a SnapKV scorer or a wrapper of one, e.g. AdaptiveHeads(SnapKV()) "
                             f"(the probe votes as its observation window), got {type(self.method).__name__}")
        k = self.method.scorer.kernel
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"method.kernel must be a positive odd integer (1, 3, 5, 7, ...), got {k!r}")
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"text must be a non-empty probe question, got {self.text!r}")

    @property
    def scorer(self) -> Method:
        """The inner method's scorer (a SnapKV)."""
        return self.method.scorer

    @property
    def slack(self) -> int | None:  # type: ignore[override]
        """The inner method's (a ragged inner method keeps its slack)."""
        return self.method.slack

    def layer_budget(self, kept: int, window: int, rank: int, n_layers: int) -> int:
        """The inner method's layer budget."""
        return self.method.layer_budget(kept, window, rank, n_layers)

    def select(self, inputs: ScoreInputs, n_keep: torch.Tensor, scores: torch.Tensor | None = None) -> Any:
        """The inner method's selection (e.g. AdaKV's per-head budgets)."""
        return self.method.select(inputs, n_keep, scores)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """The inner scorer's votes; the window (the probe's tokens) is kept by the base class."""
        return self.method.score(inputs)
