"""Probe: query-agnostic (reuse) scoring by a generic question that votes, then leaves the cache.

A context compressed once and asked many questions later (``ContextCache``, the server's
document cache) has no question to vote with; its own last tokens are a poor observation
window. :class:`Probe` appends a task-agnostic question (:data:`DEFAULT_PROBE`) to the context
while it is compressed: the probe's tokens are the observation window of the inner SnapKV
scorer (they vote), the context's own last ``tail`` tokens before them are kept whatever the
votes (as plain SnapKV keeps its window: a fact at the very end of a document stays), then the
probe's tokens are cut, so the cache holds the budget of context tokens only
(:func:`probe_config`, :func:`probe_selector`).

The default, ``Probe(SnapKV(kernel=31))``, is the reuse scorer the measurements chose
(docs/RESULTS.md, "Reuse at 4x"): a wide pooling kernel keeps whole digit-per-token numbers
and their sentence.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from snapkv.config import SnapKVConfig
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
        tail: context tokens just before the probe that are always kept (they do not vote:
            at high compression the context's own last tokens outvote the probe);
            None (default): the cache config's ``window``, as plain SnapKV keeps its window;
            0: only what the probe votes for (the behaviour before 2026-12).
    """

    method: Method = field(default_factory=lambda: SnapKV(kernel=REUSE_KERNEL))
    text: str = DEFAULT_PROBE
    tail: int | None = None
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
        if self.tail is not None and (isinstance(self.tail, bool) or not isinstance(self.tail, int) or self.tail < 0):
            raise ValueError(f"tail must be None (the config's window) or an integer >= 0, got {self.tail!r}")

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
        """The inner method's selection (e.g. AdaKV's per-head budgets) of the probe's votes.

        ``inputs.window`` is the probe (the voters); the ``tail`` positions before it are kept
        too (None counts as 0 here: :func:`probe_selector` resolves it against the config).
        """
        scores = self.method.score(inputs) if scores is None else scores
        if self.tail:
            inputs = dataclasses.replace(inputs, window=inputs.window + self.tail)
        return self.method.select(inputs, n_keep, scores)

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """The inner scorer's votes; the window (the probe's tokens) is kept by the base class."""
        return self.method.score(inputs)


def probe_config(config: SnapKVConfig, context_tokens: int, probe_tokens: int,
                 tail: int | None = None) -> SnapKVConfig | None:
    """The config that compresses the context followed by a ``probe_tokens``-token probe.

    Once the probe's tokens are cut, ``config``'s budget of context tokens remains: the budget
    grows by the probe's length, the observation window (the voters) is the probe, and the
    budget must exceed the context's ``tail`` tokens that :func:`probe_selector` keeps (None:
    ``config.window``). None when the whole context fits its budget (nothing to select, no probe
    needed). Every path that compresses with a probe (``ContextCache`` on either backend, the
    server's document cache, ``snapkv eval --modes probe``) takes its budget and window from here
    and selects with :func:`probe_selector`.

    Raises ``ValueError`` when the budget does not exceed the tail (or, for ``tail=0``, is not
    positive), or ``probe_tokens`` / ``tail`` is out of range.
    """
    if isinstance(probe_tokens, bool) or not isinstance(probe_tokens, int) or probe_tokens < 1:
        raise ValueError(f"probe_tokens must be a positive integer, got {probe_tokens!r}")
    tail = config.window if tail is None else tail
    if isinstance(tail, bool) or not isinstance(tail, int) or not 0 <= tail < context_tokens:
        raise ValueError(f"tail must be an integer in [0, {context_tokens}) (context tokens), got {tail!r}")
    keep = config.kept_tokens(context_tokens, window=tail)
    if keep >= context_tokens:
        return None
    return dataclasses.replace(config, budget=keep + probe_tokens, window=probe_tokens)


def probe_selector(method: Method, config: SnapKVConfig, tail: int | None = None) -> Probe:
    """The selection method of a probed compression: ``method``'s votes, the context's tail kept.

    ``method`` is the probe's inner method (a SnapKV or a wrapper of one) or a :class:`Probe`
    (its ``tail`` is used unless ``tail`` is given); a tail of None becomes ``config.window``.
    """
    if isinstance(method, Probe):
        tail = method.tail if tail is None else tail
        method = method.method
    return Probe(method, tail=config.window if tail is None else tail)
