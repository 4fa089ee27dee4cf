"""A preallocated KV cache for compressed prompts plus the tokens generated after them.

Layout (one allocation per tensor, written in place, never reallocated)::

    keys, values  [layers, B, Hkv, capacity, D]
    bias          [layers, B, Hkv, capacity] fp32: 0 where a slot holds a token, -inf elsewhere
    write_pos     [1] int64: the slot the next decoded token is written to (same for all rows)
    positions     [B] int64: the RoPE position of each row's next token

Each head's kept prompt tokens sit right-aligned in slots ``[P - kept, P)`` of its row and layer,
so the first decoded token of every row lands in slot ``P`` and all rows advance together; rows
(or heads, with head-adaptive budgets) that keep fewer tokens have masked filler slots in front.
Positions continue from each row's original prompt length, not from the compressed length.

With head-adaptive budgets ``P`` is the largest count any head keeps; the prefill holds the kept
tokens in a :class:`PromptStaging` until that is known, then :meth:`PromptStaging.build` sizes
the cache. The fused decode's ragged attention reads each head's ``lengths`` tokens only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class DecodeState:
    """Saved decode counters, to rewind a cache to an earlier step (benchmarks, capture)."""

    host_pos: int
    write_pos: torch.Tensor
    positions: torch.Tensor


class StaticKVCache:
    """Per-layer K/V buffers sized once for ``prompt_slots + max_new_tokens`` slots.

    Args:
        num_layers: decoder layers.
        batch: rows.
        num_kv_heads: KV heads per layer.
        head_dim: head width.
        prompt_slots: ``P``, slots reserved for the kept prompt tokens of the longest row.
        max_new_tokens: slots reserved for generated tokens.
        dtype: K/V dtype (the model's).
        device: where the buffers live.
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        prompt_slots: int,
        max_new_tokens: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        for name, v in (("num_layers", num_layers), ("batch", batch), ("prompt_slots", prompt_slots)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.prompt_slots = prompt_slots
        self.capacity = prompt_slots + max_new_tokens
        shape = (num_layers, batch, num_kv_heads, self.capacity, head_dim)
        with torch.inference_mode(False):  # plain tensors: updatable in and out of inference mode
            # Zeros, not empty: masked slots get probability 0, and 0 * NaN garbage would still be NaN.
            self.keys = torch.zeros(shape, dtype=dtype, device=device)
            self.values = torch.zeros(shape, dtype=dtype, device=device)
            self.bias = torch.full((num_layers, batch, num_kv_heads, self.capacity), float("-inf"), device=device)
            self.write_pos = torch.full((1,), prompt_slots, dtype=torch.long, device=device)
            self.positions = torch.zeros(batch, dtype=torch.long, device=device)
            # Ragged view for the fused decode kernel: row b, head h of layer l owns flat slots
            # starts[l, b, h] .. starts + lengths of keys[l].view(-1, D) (its kept and new tokens).
            self.first = torch.full((num_layers, batch, num_kv_heads), prompt_slots, dtype=torch.long, device=device)
            heads = torch.arange(batch * num_kv_heads, device=device).view(batch, num_kv_heads)
            self._base = (heads * self.capacity).to(torch.int32)  # [B, Hkv] first slot of each head
            self.starts = self._base.expand(num_layers, -1, -1).contiguous()  # [L, B, Hkv] int32
            self.lengths = torch.zeros((num_layers, batch, num_kv_heads), dtype=torch.int32, device=device)
        self.host_pos = prompt_slots  # host mirror of write_pos: bounds checks without a sync
        self.prompt_lengths = [0] * batch
        self.kept: list[list[float]] = [[0] * batch for _ in range(num_layers)]  # tokens per head (mean)

    # -- shape -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Decoder layers."""
        return self.keys.shape[0]

    @property
    def batch(self) -> int:
        """Rows."""
        return self.keys.shape[1]

    @property
    def remaining(self) -> int:
        """Tokens that can still be appended."""
        return self.capacity - self.host_pos

    def kv_bytes(self) -> int:
        """Bytes allocated for keys and values (the whole capacity)."""
        return 2 * self.keys.numel() * self.keys.element_size()

    def layer_tokens(self, layer: int) -> int:
        """Tokens the heads of ``layer`` can hold in all: kept prompt tokens plus every new slot (host int)."""
        heads, new = self.keys.shape[2], self.capacity - self.prompt_slots
        return round(heads * sum(self.kept[layer])) + self.batch * heads * new

    def head_tokens(self) -> torch.Tensor:
        """``[layers, B, Hkv]`` kept prompt tokens of each head (they differ with head-adaptive budgets)."""
        return self.prompt_slots - self.first

    def kept_bytes(self) -> int:
        """Bytes of the kept prompt tokens (all layers and rows, no filler, no free slots)."""
        per_token = 2 * self.keys.shape[2] * self.keys.shape[4] * self.keys.element_size()
        return round(per_token * sum(sum(row) for row in self.kept))

    # -- filling (prefill) -------------------------------------------------------------------
    def load(
        self,
        layer: int,
        row: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        head_lengths: torch.Tensor | list[int] | None = None,
    ) -> None:
        """Write one row's kept prompt K/V ``[Hkv, n, D]`` right-aligned into the prompt slots.

        ``head_lengths`` (``Hkv`` counts, each in ``[1, n]``): head ``h`` keeps only its last
        ``head_lengths[h]`` of the ``n`` entries (head-adaptive budgets); the rest is filler.
        """
        hkv, n = keys.shape[0], keys.shape[-2]
        if n > self.prompt_slots:
            raise ValueError(f"{n} kept tokens exceed the {self.prompt_slots} prompt slots of this cache")
        start = self.prompt_slots - n
        if head_lengths is None:
            counts = torch.full((hkv,), n, dtype=torch.long)
        else:
            counts = torch.as_tensor(head_lengths, dtype=torch.long).cpu()
            if counts.shape != (hkv,) or bool((counts < 1).any()) or bool((counts > n).any()):
                raise ValueError(f"head_lengths must hold {hkv} counts in [1, {n}], got {counts.tolist()}")
        self.keys[layer, row, :, start : self.prompt_slots].copy_(keys)
        self.values[layer, row, :, start : self.prompt_slots].copy_(values)
        self._set_heads(layer, row, counts)

    def load_heads(
        self, layer: int, row: int, keys: torch.Tensor, values: torch.Tensor, head_lengths: torch.Tensor
    ) -> None:
        """Write one row's per-head kept K/V (head-adaptive budgets), each head right-aligned.

        ``keys, values [N, D]`` are the heads' segments one after the other (head 0 first),
        ``head_lengths`` their ``Hkv`` counts (each >= 1, summing to ``N``): head ``h``'s
        tokens fill its slots ``[P - head_lengths[h], P)``, the rest of its prompt slots are
        masked filler. The decode attention then reads only each head's own tokens.
        """
        hkv = self.keys.shape[2]
        counts = torch.as_tensor(head_lengths, dtype=torch.long).cpu()  # [Hkv]
        if counts.shape != (hkv,) or bool((counts < 1).any()) or int(counts.sum()) != keys.shape[0]:
            raise ValueError(f"head_lengths must hold {hkv} counts >= 1 summing to the {keys.shape[0]} "
                             f"kept entries, got {counts.tolist()}")
        if keys.shape != values.shape or keys.dim() != 2 or keys.shape[1] != self.keys.shape[-1]:
            raise ValueError(f"keys and values must both be [N, {self.keys.shape[-1]}], got "
                             f"{tuple(keys.shape)} and {tuple(values.shape)}")
        if int(counts.max()) > self.prompt_slots:
            raise ValueError(f"a head keeps {int(counts.max())} tokens, more than the {self.prompt_slots} "
                             "prompt slots of this cache")
        head = torch.repeat_interleave(torch.arange(hkv), counts)  # [N] head of each entry
        rank = torch.arange(keys.shape[0]) - (counts.cumsum(0) - counts)[head]  # [N] place inside its segment
        slot = self.prompt_slots - counts[head] + rank  # [N] right-aligned slot
        where = (head.to(self.keys.device), slot.to(self.keys.device))
        self.keys[layer, row].index_put_(where, keys.to(self.keys.dtype))
        self.values[layer, row].index_put_(where, values.to(self.values.dtype))
        self._set_heads(layer, row, counts)

    def _set_heads(self, layer: int, row: int, counts: torch.Tensor) -> None:
        """Mask, counters and the ragged view of one row and layer whose heads keep ``counts [Hkv]``."""
        hkv = counts.numel()
        first = self.prompt_slots - counts  # [Hkv]
        slot = torch.arange(self.prompt_slots)
        bias = torch.where(slot[None] >= first[:, None], 0.0, float("-inf"))  # [Hkv, P]
        self.bias[layer, row, :, : self.prompt_slots].copy_(bias)
        self.kept[layer][row] = float(counts.sum()) / hkv if bool((counts != counts[0]).any()) else int(counts[0])
        self.first[layer, row].copy_(first)
        self.starts[layer, row].copy_(self._base[row] + first.to(self._base))
        self.lengths[layer, row].copy_(counts.to(self.lengths))

    def copy_layer(self, src: int, dst: int) -> None:
        """Make layer ``dst`` hold what layer ``src`` holds (benchmarks of partial prefills)."""
        for t in (self.keys, self.values, self.bias, self.first, self.lengths):
            t[dst].copy_(t[src])
        self.starts[dst].copy_(self.starts[src])
        self.kept[dst] = list(self.kept[src])

    def set_prompt_length(self, row: int, length: int) -> None:
        """Record a row's original prompt length: its first decoded token takes this position."""
        self.prompt_lengths[row] = length
        self.positions[row] = length

    @torch.inference_mode()
    def drop_prompt_tail(self, row: int, count: int) -> None:
        """Remove the last ``count`` kept prompt tokens of ``row`` in every layer and head.

        For a probe that voted as the observation window and must then leave the cache: the
        remaining kept tokens move right by ``count`` so they stay right-aligned (the decode
        kernel's contiguous view stays valid), and the row's next position is its prompt
        length minus ``count``. Only before any decode step.
        """
        if self.host_pos != self.prompt_slots:
            raise RuntimeError("drop_prompt_tail() runs before decoding (rewind to the prompt's end first)")
        kept = self.lengths[:, row]  # [L, Hkv]: the prompt's kept tokens (nothing decoded yet)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 < count < int(kept.min()):
            raise ValueError(f"count must be an integer in [1, {int(kept.min()) - 1}] (fewer than every head "
                             f"keeps), got {count!r}")
        p = self.prompt_slots
        src = (torch.arange(p, device=self.keys.device) - count).clamp_min(0)  # slot s takes slot s - count
        for t in (self.keys, self.values):
            t[:, row, :, :p] = t[:, row, :, :p].index_select(2, src)
        self.first[:, row] += count
        slot = torch.arange(p, device=self.keys.device)
        self.bias[:, row, :, :p] = torch.where(slot >= self.first[:, row, :, None], 0.0, float("-inf"))
        self.starts[:, row] = self._base[row] + self.first[:, row].to(self._base)
        self.lengths[:, row] = (p - self.first[:, row]).to(self.lengths)
        for layer in range(self.num_layers):
            self.kept[layer][row] -= count
        self.set_prompt_length(row, self.prompt_lengths[row] - count)

    @torch.inference_mode()
    def copy_prompt_from(self, other: StaticKVCache) -> None:
        """Hold ``other``'s kept prompt (same layers, rows, heads and prompt slots), nothing decoded.

        To move a prefilled prompt into a cache with more room for new tokens.
        """
        if other.host_pos != other.prompt_slots:
            raise RuntimeError("copy_prompt_from() copies a cache with nothing decoded (rewind it first)")
        same = other.keys.shape[:3] == self.keys.shape[:3] and other.keys.shape[-1] == self.keys.shape[-1]
        if not same or other.prompt_slots != self.prompt_slots:
            raise ValueError("copy_prompt_from() needs the same layers, rows, heads, head_dim and prompt slots")
        p = self.prompt_slots
        for mine, theirs in ((self.keys, other.keys), (self.values, other.values)):
            mine[..., :p, :].copy_(theirs[..., :p, :])
        self.bias[..., :p].copy_(other.bias[..., :p])
        self.first.copy_(other.first)
        self.starts.copy_(self._base + self.first.to(self._base))
        self.lengths.copy_(other.lengths)
        self.positions.copy_(other.positions)
        self.prompt_lengths = list(other.prompt_lengths)
        self.kept = [list(k) for k in other.kept]

    # -- decoding (capturable: no host sync, fixed shapes) ------------------------------------
    def open_slot(self) -> None:
        """Unmask slot ``write_pos`` in every layer and row: the new token attends to itself."""
        self.bias.index_fill_(3, self.write_pos, 0.0)
        self.lengths.copy_(self.write_pos + 1 - self.first)

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write one decoded token's K/V ``[B, Hkv, 1, D]`` into slot ``write_pos``, in place."""
        self.keys[layer].index_copy_(2, self.write_pos, keys)
        self.values[layer].index_copy_(2, self.write_pos, values)

    def advance(self) -> None:
        """Move to the next slot and position (device counters, in place)."""
        self.write_pos.add_(1)
        self.positions.add_(1)

    # -- host bookkeeping ----------------------------------------------------------------------
    def check_room(self, steps: int = 1) -> None:
        """Raise before a decode step would write past the capacity."""
        if self.host_pos + steps > self.capacity:
            raise RuntimeError(
                f"static cache full: capacity {self.capacity} slots ({self.prompt_slots} prompt + "
                f"{self.capacity - self.prompt_slots} new); raise max_new_tokens"
            )

    @torch.inference_mode()
    def state(self) -> DecodeState:
        """The decode counters now."""
        return DecodeState(self.host_pos, self.write_pos.clone(), self.positions.clone())

    @torch.inference_mode()
    def rewind(self, state: DecodeState) -> None:
        """Go back to ``state``: later slots are masked again (their stale K/V stay unseen)."""
        self.write_pos.copy_(state.write_pos)
        self.positions.copy_(state.positions)
        self.bias[..., state.host_pos :] = float("-inf")
        self.lengths.copy_(self.write_pos - self.first)
        self.host_pos = state.host_pos


class PromptStaging:
    """Kept prompt K/V of every layer and row, held until the static cache can be sized.

    With head-adaptive budgets (:class:`~snapkv.methods.AdaptiveHeads`) the heads of a layer
    share its ``kept * Hkv`` tokens, so how many the fullest head keeps (the cache's prompt
    slots ``P``) is known only once every layer is selected. The prefill writes into this
    object instead (same :meth:`load` / :meth:`load_heads` calls as a
    :class:`StaticKVCache`), which holds exactly the kept tokens (the bytes of a uniform
    cache); :meth:`build` then allocates the cache with ``P`` = the largest head count and
    moves the tokens in, freeing each layer as it goes.

    Args:
        num_layers: decoder layers.
        batch: rows.
    """

    def __init__(self, num_layers: int, batch: int) -> None:
        self.num_layers, self.batch = num_layers, batch
        self.prompt_lengths = [0] * batch
        # (layer, row) -> (keys, values, head lengths or None): [Hkv, n, D] dense or [N, D] per head
        self._held: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}

    def load(self, layer: int, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold one row's kept K/V ``[Hkv, n, D]``, every head the same ``n`` tokens."""
        self._held[(layer, row)] = (keys, values, None)

    def load_heads(
        self, layer: int, row: int, keys: torch.Tensor, values: torch.Tensor, head_lengths: torch.Tensor
    ) -> None:
        """Hold one row's per-head K/V ``[N, D]`` (see :meth:`StaticKVCache.load_heads`)."""
        self._held[(layer, row)] = (keys, values, torch.as_tensor(head_lengths, dtype=torch.long).cpu())

    def set_prompt_length(self, row: int, length: int) -> None:
        """Record a row's original prompt length (passed on to the cache)."""
        self.prompt_lengths[row] = length

    def prompt_slots(self) -> int:
        """Slots the cache needs per head: the most tokens any head of any layer and row keeps."""
        out = [int(n.max()) if n is not None else k.shape[-2] for k, _, n in self._held.values()]
        return max(out, default=1)

    def kept_bytes(self) -> int:
        """Bytes of keys and values held now."""
        return sum(2 * k.numel() * k.element_size() for k, _, _ in self._held.values())

    def build(self, make_cache: Callable[[int, int, int], StaticKVCache], max_new_tokens: int) -> StaticKVCache:
        """The static cache (``make_cache(batch, prompt_slots, max_new_tokens)``) holding every kept token.

        Each layer's held tensors are released once copied, so the staging and the cache
        overlap by at most the whole staging (kept tokens, a uniform cache's size).
        """
        cache = make_cache(self.batch, self.prompt_slots(), max_new_tokens)
        for key in sorted(self._held):
            keys, values, counts = self._held.pop(key)
            if counts is None:
                cache.load(key[0], key[1], keys, values)
            else:
                cache.load_heads(key[0], key[1], keys, values, counts)
            del keys, values
        for row, n in enumerate(self.prompt_lengths):
            cache.set_prompt_length(row, n)
        return cache
