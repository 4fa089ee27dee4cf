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
        method: the inner scorer, a :class:`~snapkv.methods.SnapKV` (default kernel 31, max pooling).
        text: the probe question (default :data:`DEFAULT_PROBE`), non-empty.
    """

    method: SnapKV = field(default_factory=lambda: SnapKV(kernel=REUSE_KERNEL))
    text: str = DEFAULT_PROBE
    name: str = "probe"

    def __post_init__(self) -> None:
        if not isinstance(self.method, SnapKV):
            raise ValueError(f"method must be a SnapKV scorer (the probe votes as its observation window), "
                             f"got {type(self.method).__name__}")
        k = self.method.kernel
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"method.kernel must be a positive odd integer (1, 3, 5, 7, ...), got {k!r}")
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"text must be a non-empty probe question, got {self.text!r}")

    @property
    def scorer(self) -> Method:
        """The inner SnapKV scorer."""
        return self.method.scorer

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """The inner scorer's votes; the window (the probe's tokens) is kept by the base class."""
        return self.method.score(inputs)
