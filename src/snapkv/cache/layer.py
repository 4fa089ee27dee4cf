"""One full-attention cache layer that is replaced by its kept prompt tokens once.

Rows of a batch that keep fewer tokens than the longest are padded at the front (``pad``),
and attention masks those slots. The layer counts every token it has seen (``seen``), so a
forward without explicit positions continues at the original position, not at the
compressed length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from snapkv.cache.ragged import RaggedLayer


class CompressedLayer(DynamicLayer):
    """A full-attention cache layer that can be replaced by its kept tokens once.

    Attributes:
        seen: tokens this layer has received (prompt plus appended), i.e. the next position.
        pad: ``[B]`` filler slots at the front of each row, or None before compression.
        positions: ``[B, Hkv, P]`` original positions of the kept prompt tokens, or None.
        compressed: whether the prompt part has been replaced by its selection.
        ragged: the per-head ragged store when heads keep different counts (head-adaptive
            budgets); ``keys``/``values`` then hold only the latest new tokens.
        ragged_tail: for a ragged store, how many of the prompt's last positions every head
            keeps as its last entries (what :meth:`drop_tail` may cut).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen = 0
        self.pad: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.compressed = False
        self.prefilled = False
        self.prompt_length = 0
        self.ragged: RaggedLayer | None = None
        self.ragged_tail = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys/values (``[B, Hkv, q, D]``) and return the whole layer.

        A ragged layer returns only the new tokens: its attention appends them in place.
        """
        if self.ragged is not None:
            self.keys, self.values = key_states, value_states
            self.seen += key_states.shape[-2]
            return key_states, value_states
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.seen += key_states.shape[-2]
        return keys, values

    def get_seq_length(self) -> int:
        """Tokens seen so far (the original position of the next token)."""
        return self.seen

    def get_mask_sizes(self, query_length: Any, *args: Any) -> tuple[int, int]:
        """Physical key length for mask creation (SnapKV builds its own decode mask)."""
        q = query_length if isinstance(query_length, int) else int(query_length.shape[-1])
        return self.physical_length + q, 0

    @property
    def physical_length(self) -> int:
        """Slots stored now (kept prompt tokens of the longest row plus appended tokens)."""
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0 or self.ragged is not None:
            return 0
        return self.keys.shape[-2]

    def replace(self, keys: torch.Tensor, values: torch.Tensor, pad: torch.Tensor, positions: torch.Tensor) -> None:
        """Swap the full prompt KV for the kept tokens (done once, right after prefill)."""
        self.prompt_length = self.seen
        self.keys, self.values, self.pad, self.positions = keys, values, pad, positions
        self.compressed = True

    def replace_ragged(self, ragged: RaggedLayer, tail: int = 0) -> None:
        """Swap the full prompt KV for a per-head ragged store (head-adaptive budgets).

        ``tail``: how many of the prompt's last positions every head keeps as its last entries
        (:meth:`~snapkv.core.adaptive.RaggedSelection.trailing_run`), what :meth:`drop_tail` may cut.
        """
        self.prompt_length = self.seen
        self.ragged, self.keys, self.values = ragged, None, None
        self.ragged_tail = tail
        self.compressed = True

    def kv_bytes(self) -> int:
        """Bytes of keys and values this layer holds (a ragged store counts its slack too)."""
        if self.ragged is not None:
            return self.ragged.bytes()
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if isinstance(t, torch.Tensor))

    def slot_valid(self, total: int | None = None) -> torch.Tensor:
        """``[B, total]`` bool: False at filler slots."""
        total = self.physical_length if total is None else total
        slots = torch.arange(total, device=self.keys.device)
        pad = self.pad if self.pad is not None else torch.zeros(self.keys.shape[0], dtype=torch.long)
        return slots[None, :] >= pad.to(self.keys.device)[:, None]

    def _no_ragged(self, what: str) -> None:
        if self.ragged is not None:
            raise NotImplementedError(f"{what} is not supported with head-adaptive (ragged) budgets")

    @property
    def appended(self) -> int:
        """Tokens appended after the compressed prompt (0 before compression)."""
        if not self.compressed or self.ragged is not None:
            return self.ragged.appended if self.ragged is not None else 0
        return self.physical_length - self.positions.shape[-1]

    def _crop_count(self, tokens_to_remove: int) -> int:
        """Tokens a ``crop(tokens_to_remove)`` removes (negative: that many; positive: keep that many)."""
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int):
            raise ValueError(f"crop() takes an integer, got {tokens_to_remove!r}")
        n = -tokens_to_remove if tokens_to_remove < 0 else max(0, self.seen - tokens_to_remove)
        if self.compressed and n > self.appended:
            raise ValueError(
                f"crop() can remove at most the {self.appended} tokens appended after the compressed prompt "
                f"(its removed tokens cannot come back), asked to remove {n}; restore a snapshot instead"
            )
        return n

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (a positive value keeps that many).

        On a compressed layer only appended tokens can be removed; more raises ``ValueError``.
        """
        self._no_ragged("crop")
        n = self._crop_count(tokens_to_remove)
        if n == 0 or not self.is_initialized:
            return
        if n > self.physical_length:
            raise ValueError(f"crop() asked to remove {n} tokens from a layer holding {self.physical_length}")
        keep = self.physical_length - n
        self.keys, self.values = self.keys[..., :keep, :], self.values[..., :keep, :]
        self.seen -= n

    def drop_tail(self, n: int) -> None:
        """Forget the last ``n`` tokens of the compressed prompt (e.g. a probe window that voted).

        They must be the layer's last slots: the prompt's final ``n`` positions, kept (a window
        always is), with nothing appended after them. Positions go back by ``n``. A ragged
        (head-adaptive) layer cuts them from every head's segment (a new ragged store).
        """
        if self.ragged is not None:
            if self.ragged.appended or self.seen != self.prompt_length:
                raise RuntimeError("drop_tail() takes a layer holding only its compressed prompt, nothing appended")
            if not isinstance(n, bool) and isinstance(n, int) and n > self.ragged_tail:
                raise ValueError(f"the last {n} slots are not the prompt's last {n} positions in every head "
                                 f"(each keeps the last {self.ragged_tail}; were they kept?)")
            self.ragged = self.ragged.without_tail(n)
            self.ragged_tail -= n
            self.seen -= n
            self.prompt_length -= n
            return
        if not self.compressed:
            raise RuntimeError("drop_tail() applies to a compressed layer")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.physical_length:
            raise ValueError(f"n must be an integer in [1, {self.physical_length}] (slots held), got {n!r}")
        if self.physical_length != self.positions.shape[-1] or self.seen != self.prompt_length:
            raise RuntimeError("drop_tail() takes a layer holding only its compressed prompt, nothing appended")
        tail = self.positions[:, :, -n:].to(torch.long)
        want = torch.arange(self.prompt_length - n, self.prompt_length, device=tail.device)
        if not bool((tail == want).all()):
            raise ValueError(f"the last {n} slots are not the prompt's last {n} positions (were they kept?)")
        self.keys, self.values = self.keys[:, :, :-n], self.values[:, :, :-n]
        self.positions = self.positions[:, :, :-n]
        self.seen -= n
        self.prompt_length -= n

    def reset(self) -> None:
        """Forget everything, compression included."""
        super().reset()
        self.seen, self.pad, self.positions, self.prompt_length = 0, None, None, 0
        self.compressed = self.prefilled = False
        self.ragged, self.ragged_tail = None, 0

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each row ``repeats`` times (beam search, several samples)."""
        self._no_ragged("repeating rows")
        super().batch_repeat_interleave(repeats)
        if self.pad is not None:
            self.pad = self.pad.repeat_interleave(repeats, dim=0)
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the given rows."""
        self._no_ragged("selecting rows")
        super().batch_select_indices(indices)
        if self.pad is not None:
            self.pad = self.pad[indices]
            self.positions = self.positions[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder rows for beam search."""
        self._no_ragged("beam search")
        super().reorder_cache(beam_idx)
        if self.pad is not None:
            self.pad = self.pad.index_select(0, beam_idx.to(self.pad.device))
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))


@dataclass(slots=True, frozen=True)
class Snapshot:
    """Saved per-layer state, to roll a cache back (tensors are shared, never copied)."""

    states: tuple[tuple[Any, ...], ...]


_SAVED = ("keys", "values", "is_initialized", "seen", "pad", "positions", "compressed", "prefilled",
          "prompt_length", "cumulative_length", "ragged", "ragged_tail")


def _ragged_state(layer: Any) -> tuple[torch.Tensor, int] | None:
    ragged = getattr(layer, "ragged", None)
    return None if ragged is None else (ragged.lengths.clone(), ragged.appended)
