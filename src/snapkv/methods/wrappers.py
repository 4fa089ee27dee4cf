"""Wrappers: budget policies that take a method (kvpress's ``AdaKVPress(press)`` shape).

* :class:`PyramidBudgets`: lower layers keep more, upper layers fewer (PyramidKV), same total.
* :class:`AdaptiveHeads`: the heads of a layer share its total through one top-k (AdaKV),
  stored in a ragged per-head cache.

Wrappers compose either way round: ``PyramidBudgets(AdaptiveHeads(SnapKV()))`` and
``AdaptiveHeads(PyramidBudgets(SnapKV()))`` keep the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from snapkv.core.adaptive import select_adaptive
from snapkv.core.budgets import layer_budget
from snapkv.methods.base import Method, ScoreInputs


def _check_method(method: object) -> None:
    if not isinstance(method, Method):
        raise ValueError(f"method must be a snapkv Method (e.g. SnapKV()), got {type(method).__name__}")


@dataclass(slots=True)
class PyramidBudgets(Method):
    """Per-layer budgets that shrink linearly from the first compressed layer to the last.

    Based on Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
    Information Funneling", arXiv:2406.02069. The average prefix budget equals the uniform
    one: ``min = (kept - window) // beta``, ``max = 2 (kept - window) - min``.

    Args:
        method: the scoring method (e.g. ``SnapKV()``).
        beta: ratio of the average prefix budget to the top layer's (integer >= 1, default 20).
    """

    method: Method
    beta: int = 20
    name: str = "pyramid"

    def __post_init__(self) -> None:
        _check_method(self.method)
        if isinstance(self.beta, bool) or not isinstance(self.beta, int) or self.beta < 1:
            raise ValueError(f"beta must be an integer >= 1, got {self.beta!r}")

    @property
    def slack(self) -> int | None:  # type: ignore[override]
        """The inner method's (a ragged inner method keeps its slack)."""
        return self.method.slack

    @property
    def scorer(self) -> Method:
        """The inner method's scorer."""
        return self.method.scorer

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """The inner method's scores."""
        return self.method.score(inputs)

    def layer_budget(self, kept: int, window: int, rank: int, n_layers: int) -> int:
        """Pyramid share of layer ``rank`` (the inner method's own budget policy first)."""
        kept = self.method.layer_budget(kept, window, rank, n_layers)
        return layer_budget("pyramid", kept, window, rank, n_layers, self.beta)

    def select(self, inputs: ScoreInputs, n_keep: torch.Tensor, scores: torch.Tensor | None = None) -> Any:
        """The inner method's selection at this layer's budget."""
        return self.method.select(inputs, n_keep, scores)


@dataclass(slots=True)
class AdaptiveHeads(Method):
    """Head-adaptive budgets: one top-k across the KV heads of a layer, a floor per head.

    Based on Feng et al. 2024, "Ada-KV", arXiv:2407.11550. Each row keeps
    ``budget * Hkv`` tokens per layer in all; every head keeps the window and its own top
    ``alpha`` share of the prefix budget, the rest goes to the best positions of all heads.
    Kept tokens live in a ragged per-head cache (:class:`~snapkv.cache.ragged.RaggedLayer`)
    that holds no padding.

    Args:
        method: the scoring method (e.g. ``SnapKV()``).
        alpha: share of each head's uniform prefix budget guaranteed to it, in [0, 1]
            (1 is uniform SnapKV).
        slack: slots per head reserved for generated tokens (integer >= 1); appending more
            raises.
    """

    method: Method
    alpha: float = 0.2
    slack: int = 256  # type: ignore[assignment]
    name: str = "adaptive"

    def __post_init__(self) -> None:
        _check_method(self.method)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha!r}")
        if isinstance(self.slack, bool) or not isinstance(self.slack, int) or self.slack < 1:
            raise ValueError(f"slack must be an integer >= 1 (new tokens per head), got {self.slack!r}")

    @property
    def scorer(self) -> Method:
        """The inner method's scorer."""
        return self.method.scorer

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """The inner method's scores."""
        return self.method.score(inputs)

    def layer_budget(self, kept: int, window: int, rank: int, n_layers: int) -> int:
        """The inner method's layer budget."""
        return self.method.layer_budget(kept, window, rank, n_layers)

    def select(self, inputs: ScoreInputs, n_keep: torch.Tensor, scores: torch.Tensor | None = None) -> Any:
        """A :class:`~snapkv.core.adaptive.RaggedSelection` of ``n_keep[b] * Hkv`` tokens per row."""
        scores = self.method.score(inputs) if scores is None else scores
        return select_adaptive(scores, n_keep, inputs.window, inputs.key_valid, alpha=float(self.alpha))
