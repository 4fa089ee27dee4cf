"""A slot cache for continuous batching: the engine's static cache with one write position per row.

Layout (inherited from :class:`~snapkv.generation.StaticKVCache`, allocated once)::

    keys, values  [layers, rows, Hkv, capacity, D]
    bias          [layers, rows, Hkv, capacity] fp32: 0 where a slot holds a token, -inf elsewhere
    write_pos     [rows] int64: the slot each row's next token is written to (per row, not shared)
    positions     [rows] int64: the RoPE position of each row's next token
    active        [rows] int64: 1 for a busy row, 0 for a free one (free rows do not advance)

A request owns one row. Its kept prompt tokens are loaded right-aligned into slots
``[P - kept_l, P)`` of each layer ``l`` (``P`` = its largest layer's count), its generated
tokens follow at ``P, P + 1, ...``; so a row needs ``P + max_tokens`` slots whatever the other
rows hold, and a row can join or leave between any two decode steps. Free rows still run
through the step (fixed shapes for the CUDA graph): they write into their slot 0 and their
outputs are ignored.

:meth:`open_slot`, :meth:`append` and :meth:`advance` replace the base class's shared-slot
versions with per-row scatters, so the engine's own
:func:`~snapkv.generation.decode_one_token` and :class:`~snapkv.generation.DecodeRunner`
run over this cache unchanged; the fused step runs too with :func:`slot_ops` (its ragged
attention reads each row's own segment; only the K/V write is per row).
"""

from __future__ import annotations

import torch

from snapkv.generation.fused import FusedOps
from snapkv.generation.static_cache import DecodeState, StaticKVCache
from snapkv.kernels.decode_ops_ref import rope_qk


class SlotKVCache(StaticKVCache):
    """Per-row slots of ``capacity`` tokens each, for requests that join and leave a running batch.

    Args:
        num_layers: decoder layers.
        rows: concurrent requests (the decode batch).
        num_kv_heads: KV heads per layer.
        head_dim: head width.
        capacity: slots per row: kept prompt tokens plus generated tokens.
        dtype: K/V dtype (the model's).
        device: where the buffers live.
    """

    def __init__(
        self,
        num_layers: int,
        rows: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if capacity < 2:
            raise ValueError(f"capacity must be >= 2 slots (one prompt token, one new), got {capacity}")
        super().__init__(num_layers, rows, num_kv_heads, head_dim, 1, capacity - 1, dtype=dtype, device=device)
        with torch.inference_mode(False):
            self.write_pos = torch.zeros(rows, dtype=torch.long, device=self.keys.device)
            self.active = torch.zeros(rows, dtype=torch.long, device=self.keys.device)
            self.first.zero_()
            self.starts.copy_(self._base.expand(num_layers, -1, -1))
        self.row_end = [0] * rows  # host mirror of write_pos for busy rows (0 for free rows)
        self.busy = [False] * rows
        self.kept = [[0] * rows for _ in range(num_layers)]

    # -- rows (host side, between decode steps) ------------------------------------------------
    def free_rows(self) -> list[int]:
        """Rows no request holds."""
        return [r for r, b in enumerate(self.busy) if not b]

    def busy_count(self) -> int:
        """Rows held by requests."""
        return sum(self.busy)

    def row_kv_bytes(self) -> int:
        """Bytes of keys and values one row owns (its whole capacity)."""
        return self.kv_bytes() // self.batch

    def held_bytes(self) -> int:
        """Bytes of keys and values held by busy rows (their whole slots)."""
        return self.busy_count() * self.row_kv_bytes()

    @torch.inference_mode()
    def load_row(self, row: int, src: StaticKVCache, src_row: int = 0) -> int:
        """Copy row ``src_row`` of a prefilled static cache into ``row``; returns its prompt slots ``P``.

        The source holds its kept tokens right-aligned in its ``prompt_slots`` (as the engine's
        :func:`~snapkv.generation.prefill` leaves them) and its prompt length; after this call
        the row decodes from slot ``P`` at that position.
        """
        if self.busy[row]:
            raise ValueError(f"row {row} is busy; free it first")
        p = src.prompt_slots
        if p >= self.capacity:
            raise ValueError(f"{p} prompt slots leave no room in a row of {self.capacity} slots")
        if (src.num_layers, src.keys.shape[2], src.keys.shape[4]) != (self.num_layers, *self.keys.shape[2:5:2]):
            raise ValueError("source cache has another layer count or head shape")
        self.keys[:, row, :, :p].copy_(src.keys[:, src_row, :, :p])
        self.values[:, row, :, :p].copy_(src.values[:, src_row, :, :p])
        self.bias[:, row].fill_(float("-inf"))
        self.bias[:, row, :, :p].copy_(src.bias[:, src_row, :, :p])
        self.first[:, row].copy_(src.first[:, src_row])
        self.lengths[:, row].copy_(p - src.first[:, src_row])
        self.starts[:, row].copy_(self._base[row] + src.first[:, src_row].to(self._base))
        self.write_pos[row] = p
        self.positions[row] = src.prompt_lengths[src_row]
        self.active[row] = 1
        self.prompt_lengths[row] = src.prompt_lengths[src_row]
        for layer in range(self.num_layers):
            self.kept[layer][row] = src.kept[layer][src_row]
        self.row_end[row] = p
        self.busy[row] = True
        return p

    @torch.inference_mode()
    def free_row(self, row: int) -> None:
        """Release ``row``: masked everywhere, counters at 0, no longer advanced."""
        self.active[row] = 0
        self.write_pos[row] = 0
        self.positions[row] = 0
        self.bias[:, row].fill_(float("-inf"))
        self.first[:, row] = 0
        self.lengths[:, row] = 0
        self.starts[:, row].copy_(self._base[row].expand_as(self.starts[:, row]))
        self.prompt_lengths[row] = 0
        for layer in range(self.num_layers):
            self.kept[layer][row] = 0
        self.row_end[row] = 0
        self.busy[row] = False

    def room(self, row: int) -> int:
        """Tokens row ``row`` can still append."""
        return self.capacity - self.row_end[row]

    def note_step(self) -> None:
        """Advance the host mirror after one decode step (busy rows moved one slot)."""
        for r, b in enumerate(self.busy):
            if b:
                self.row_end[r] += 1

    # -- decoding (capturable: no host sync, fixed shapes) -------------------------------------
    def open_slot(self) -> None:
        """Unmask each row's slot ``write_pos[row]`` in every layer: the new token attends to itself."""
        layers, rows, heads, _ = self.bias.shape
        idx = self.write_pos.view(1, rows, 1, 1).expand(layers, rows, heads, 1)
        self.bias.scatter_(3, idx, 0.0)
        self.lengths.copy_(self.write_pos.view(1, rows, 1) + 1 - self.first)

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write one decoded token's K/V ``[rows, Hkv, 1, D]`` into each row's own slot, in place."""
        idx = self.write_pos.view(-1, 1, 1, 1).expand_as(keys)
        self.keys[layer].scatter_(2, idx, keys)
        self.values[layer].scatter_(2, idx, values)

    def advance(self) -> None:
        """Busy rows move to their next slot and position; free rows stay."""
        self.write_pos.add_(self.active)
        self.positions.add_(self.active)

    # -- host bookkeeping ----------------------------------------------------------------------
    def check_room(self, steps: int = 1) -> None:
        """Raise before a decode step would write past a busy row's capacity."""
        for r, b in enumerate(self.busy):
            if b and self.row_end[r] + steps > self.capacity:
                raise RuntimeError(f"row {r} is full ({self.capacity} slots); its request should have ended")

    @torch.inference_mode()
    def state(self) -> DecodeState:
        """The decode counters now (for the runner's warm-up before capture)."""
        return DecodeState(self.host_pos, self.write_pos.clone(), self.positions.clone())

    @torch.inference_mode()
    def rewind(self, state: DecodeState) -> None:
        """Undo steps taken since ``state``: the slots they opened are masked again."""
        layers, rows, heads, _ = self.bias.shape
        for pos in (self.write_pos, state.write_pos):
            self.bias.scatter_(3, pos.view(1, rows, 1, 1).expand(layers, rows, heads, 1), float("-inf"))
        # Busy rows' kept prompt slots lie below their write position: re-open nothing else.
        self.write_pos.copy_(state.write_pos)
        self.positions.copy_(state.positions)
        self.lengths.copy_((self.write_pos.view(1, rows, 1) - self.first).clamp_min(0))
        self.host_pos = state.host_pos


def rope_append_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    write_pos: torch.Tensor,
) -> torch.Tensor:
    """:func:`~snapkv.kernels.decode_ops_ref.rope_append_ref` with one write slot per row (``write_pos [B]``).

    Rotated queries ``[B, Hq, D]``; rotated keys and the values are scattered into each row's
    own slot of ``k_cache, v_cache [B, Hkv, cap, D]``.
    """
    b, d = cos.shape
    q_rot, k_rot = rope_qk(q, k, cos, sin)
    idx = write_pos.view(b, 1, 1, 1).expand(b, k_rot.shape[1], 1, d)
    k_cache.scatter_(2, idx, k_rot[:, :, None, :].to(k_cache.dtype))
    v_cache.scatter_(2, idx, v.view(b, -1, d)[:, :, None, :].to(v_cache.dtype))
    return q_rot


def slot_ops(ops: FusedOps) -> FusedOps:
    """The fused decode operations over a :class:`SlotKVCache`: the same kernels, per-row K/V writes.

    The ragged attention kernel already reads each row's and head's own segment (``starts``,
    ``lengths``); only the shared-slot ``rope_append`` is replaced by :func:`rope_append_rows`.
    """
    return FusedOps(ops.add_rmsnorm, rope_append_rows, ops.silu_mul, ops.attention, f"{ops.name}, per-row writes")
