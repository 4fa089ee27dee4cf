"""A method scores prompt positions; the base class keeps the window, selects and gathers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from snapkv.core.selection import Selection, gather_positions, select_topk


@dataclass(slots=True)
class ScoreInputs:
    """What a method may look at for one layer right after its prefill attention.

    Attributes:
        queries: ``[B, Hq, Lq, D]`` post-RoPE queries of the prefill (``Lq`` may be only
            the window's rows when the prefill ran elsewhere).
        keys: ``[B, Hkv, L, D]`` post-RoPE keys of the prompt.
        key_valid: ``[B, L]`` bool, False at padding, or None.
        window: observation window (the last ``window`` positions are always kept).
        scaling: the attention's logit scale.
        softcap: the attention's logit soft-cap, or None.
        layer_idx: the model layer.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    key_valid: torch.Tensor | None
    window: int
    scaling: float
    softcap: float | None = None
    layer_idx: int = 0


class Method(ABC):
    """Base of every selection method: subclasses write :meth:`score` only.

    A method owns how positions are scored and chosen; the cache that uses it owns the
    budget (:class:`~snapkv.SnapKVConfig`). Wrappers such as
    :class:`~snapkv.methods.PyramidBudgets` and :class:`~snapkv.methods.AdaptiveHeads` take a
    method and change how many tokens each layer keeps or how they are split between heads.
    """

    name: str = "method"
    #: Slots per KV head kept free for generated tokens when :meth:`select` returns a ragged
    #: (per-head) selection; None for methods whose heads keep equal counts.
    slack: int | None = None

    @abstractmethod
    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        """``[B, Hkv, L]`` scores; the highest positions of each head are kept."""

    @property
    def scorer(self) -> Method:
        """The method whose :meth:`score` this one uses (itself; a wrapper's inner scorer)."""
        return self

    def layer_budget(self, kept: int, window: int, rank: int, n_layers: int) -> int:
        """Tokens the ``rank``-th of ``n_layers`` compressed layers keeps, ``kept`` being the uniform count."""
        return kept

    def select(self, inputs: ScoreInputs, n_keep: torch.Tensor, scores: torch.Tensor | None = None) -> Any:
        """Top ``n_keep[b]`` positions per row and head, window always, padding never.

        ``scores`` are this method's (:meth:`score`) when already computed. Returns a
        :class:`~snapkv.core.selection.Selection` (or a ragged selection for per-head budgets).
        """
        scores = self.score(inputs) if scores is None else scores
        return select_topk(scores, n_keep, inputs.window, inputs.key_valid)

    def compress(
        self, inputs: ScoreInputs, values: torch.Tensor, n_keep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Selection]:
        """Kept keys and values ``[B, Hkv, P, D]`` and the selection behind them."""
        sel = self.select(inputs, n_keep)
        if not isinstance(sel, Selection):
            raise TypeError(f"{type(self).__name__} selects per head; compress() returns dense keys only")
        return gather_positions(inputs.keys, sel.indices), gather_positions(values, sel.indices), sel
