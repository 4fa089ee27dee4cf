"""A ragged KV cache: each KV head keeps its own number of tokens, nothing padded.

For one layer, keys and values live in two flat buffers ``[S, D]``. KV head ``h`` of row
``b`` owns the contiguous segment ``starts[b, h] : starts[b, h] + capacity[b, h]`` of
them, where ``capacity = kept + slack``: its kept prompt tokens first, then room for
``slack`` generated tokens. ``lengths[b, h]`` counts the tokens stored now. Appending
one token per head writes it in place at ``starts + lengths`` (``index_copy_``) and bumps
``lengths`` on the device: no concatenation, no reallocation, no host sync, so the
append can run inside a captured CUDA graph.

Memory is exactly ``2 * (kept + B * Hkv * slack) * D * itemsize`` for keys and values,
plus three ``[B, Hkv]`` int32 tensors of bookkeeping (:meth:`RaggedLayer.bytes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from snapkv.core.adaptive import RaggedSelection
from snapkv.kernels.ragged_ref import ragged_decode


@dataclass(slots=True)
class RaggedLayer:
    """One layer's ragged keys and values.

    Attributes:
        keys: ``[S, D]`` flat key buffer (post-RoPE keys, as the model cached them).
        values: ``[S, D]`` flat value buffer.
        starts: ``[B, Hkv]`` int32 first slot of each head's segment.
        lengths: ``[B, Hkv]`` int32 tokens stored per head now (advanced in place).
        capacity: ``[B, Hkv]`` int32 slots owned per head (``kept + slack``).
        slack: slots reserved per head for generated tokens.
        max_capacity: the longest segment (host int): an upper bound of ``lengths`` for
            kernel launch grids that must not change between decode steps.
        appended: tokens appended per head since construction (host count; appends
            replayed inside a CUDA graph do not advance it).
    """

    keys: torch.Tensor
    values: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    capacity: torch.Tensor
    slack: int
    max_capacity: int
    appended: int = field(default=0)

    @property
    def batch_size(self) -> int:
        """Rows ``B``."""
        return self.lengths.shape[0]

    @property
    def num_kv_heads(self) -> int:
        """KV heads ``Hkv``."""
        return self.lengths.shape[1]

    @property
    def head_dim(self) -> int:
        """Head size ``D``."""
        return self.keys.shape[-1]

    @classmethod
    def from_selection(
        cls, keys: torch.Tensor, values: torch.Tensor, sel: RaggedSelection, slack: int
    ) -> RaggedLayer:
        """Store the kept tokens of a dense prompt KV.

        Args:
            keys: ``[B, Hkv, L, D]`` prompt keys (post-RoPE).
            values: ``[B, Hkv, L, D]`` prompt values.
            sel: the kept positions (:func:`~snapkv.core.adaptive.select_adaptive`).
            slack: slots per head for generated tokens (``max_new_tokens``).
        """
        if slack < 0:
            raise ValueError(f"slack must be >= 0, got {slack}")
        if keys.shape != values.shape:
            raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ in shape")
        b, h, _, d = keys.shape
        lengths = sel.lengths.to(device=keys.device, dtype=torch.int32)  # [B, Hkv]
        capacity = lengths + slack
        cap_flat = capacity.view(-1).long()
        starts = (cap_flat.cumsum(0) - cap_flat).view(b, h)  # [B, Hkv]
        total = sel.total + b * h * slack
        k_buf = keys.new_empty((total, d))
        v_buf = values.new_empty((total, d))
        # Destination slot of each kept entry: its segment's start plus its rank inside it.
        seg = sel.segment.to(keys.device)
        rank = torch.arange(sel.total, device=keys.device) - sel.offsets.view(-1).to(keys.device)[seg]
        dest = starts.view(-1)[seg] + rank  # [N]
        k_buf.index_copy_(0, dest, sel.gather(keys))
        v_buf.index_copy_(0, dest, sel.gather(values))
        max_cap = int(capacity.max()) if capacity.numel() else 0
        return cls(k_buf, v_buf, starts.to(torch.int32), lengths.clone(), capacity, slack, max_cap)

    @classmethod
    def from_dense(cls, keys: torch.Tensor, values: torch.Tensor, slack: int) -> RaggedLayer:
        """Every head keeps all ``L`` tokens of ``[B, Hkv, L, D]`` (uniform budget, no padding)."""
        b, h, length, _ = keys.shape
        device = keys.device
        seg = torch.arange(b * h, device=device).repeat_interleave(length)
        lengths = torch.full((b, h), length, dtype=torch.int32, device=device)
        offsets = (torch.arange(b * h, device=device) * length).view(b, h)
        idx = torch.arange(length, device=device).repeat(b * h)
        sel = RaggedSelection(indices=idx, segment=seg, lengths=lengths, offsets=offsets, prompt_length=length)
        return cls.from_selection(keys, values, sel, slack)

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write one new token per head in place: ``key``/``value`` ``[B, Hkv, 1, D]`` or ``[B, Hkv, D]``.

        Raises ``RuntimeError`` once ``slack`` tokens have been appended (host count).
        """
        b, h, d = self.batch_size, self.num_kv_heads, self.head_dim
        if key.dim() == 4:
            if key.shape[2] != 1:
                raise ValueError(f"append takes one token per head, got {key.shape[2]}")
            key, value = key[:, :, 0], value[:, :, 0]
        if key.shape != (b, h, d) or value.shape != (b, h, d):
            raise ValueError(f"append expects [{b}, {h}, {d}] keys and values, got {tuple(key.shape)}")
        if self.appended >= self.slack:
            raise RuntimeError(f"ragged layer is full: {self.slack} slack slots per head already used")
        dest = (self.starts + self.lengths).view(-1).long()  # [B*Hkv]
        self.keys.index_copy_(0, dest, key.reshape(b * h, d).to(self.keys.dtype))
        self.values.index_copy_(0, dest, value.reshape(b * h, d).to(self.values.dtype))
        self.lengths.add_(1)
        self.appended += 1

    def without_tail(self, n: int) -> RaggedLayer:
        """A new layer holding every head's tokens but its last ``n`` (nothing appended yet).

        For a probe that voted as the window and must leave: each head keeps ``lengths - n``
        tokens and the same ``slack``, packed into fresh buffers (no slot is wasted, and this
        layer, which a snapshot may still hold, is left as it is).
        """
        if self.appended:
            raise RuntimeError("without_tail() takes a layer holding only its kept prompt, nothing appended")
        shortest = int(self.lengths.min()) if self.lengths.numel() else 0
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= shortest:
            raise ValueError(f"n must be an integer in [1, {shortest}] (tokens of the shortest head), got {n!r}")
        b, h, d = self.batch_size, self.num_kv_heads, self.head_dim
        device = self.keys.device
        lengths = (self.lengths - n).to(torch.int32)
        capacity = lengths + self.slack
        cap_flat, len_flat = capacity.view(-1).long(), lengths.view(-1).long()
        starts = cap_flat.cumsum(0) - cap_flat
        kept = int(len_flat.sum())
        seg = torch.arange(b * h, device=device).repeat_interleave(len_flat)
        rank = torch.arange(kept, device=device) - (len_flat.cumsum(0) - len_flat)[seg]
        src, dest = self.starts.view(-1).long()[seg] + rank, starts[seg] + rank
        total = kept + b * h * self.slack
        k_buf, v_buf = self.keys.new_empty((total, d)), self.values.new_empty((total, d))
        k_buf.index_copy_(0, dest, self.keys.index_select(0, src))
        v_buf.index_copy_(0, dest, self.values.index_select(0, src))
        max_cap = int(capacity.max()) if capacity.numel() else 0
        return RaggedLayer(k_buf, v_buf, starts.view(b, h).to(torch.int32), lengths, capacity, self.slack, max_cap)

    def kv_bytes(self) -> int:
        """Bytes of the key and value buffers (kept tokens plus slack)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))

    def bytes(self) -> int:
        """Exact bytes this layer allocated: buffers plus bookkeeping."""
        meta = sum(t.numel() * t.element_size() for t in (self.starts, self.lengths, self.capacity))
        return self.kv_bytes() + meta

    def to_padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dense copy for references: ``keys, values [B, Hkv, P, D]`` and ``valid [B, Hkv, P]``.

        ``P`` is the longest head now (one host sync; not for the hot path).
        """
        p = int(self.lengths.max()) if self.lengths.numel() else 0
        slot = torch.arange(p, device=self.keys.device)
        valid = slot < self.lengths[..., None]  # [B, Hkv, P]
        idx = (self.starts[..., None].long() + slot).clamp_max(self.keys.shape[0] - 1)
        idx = torch.where(valid, idx, torch.zeros_like(idx))
        return self.keys[idx], self.values[idx], valid


@dataclass
class RaggedKV:
    """Ragged layers of a model, by layer index (None where a layer is not ragged)."""

    layers: list[RaggedLayer | None]

    def bytes(self) -> int:
        """Exact bytes of all ragged layers."""
        return sum(layer.bytes() for layer in self.layers if layer is not None)

    def kv_bytes(self) -> int:
        """Bytes of all ragged key and value buffers."""
        return sum(layer.kv_bytes() for layer in self.layers if layer is not None)

    def kept_tokens(self) -> int:
        """Tokens stored now over all layers, rows and heads (one host sync per layer)."""
        return sum(int(layer.lengths.sum()) for layer in self.layers if layer is not None)


def ragged_attention(
    query: torch.Tensor,
    layer: RaggedLayer,
    new_key: torch.Tensor,
    new_value: torch.Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    use_kernel: bool | None = None,
) -> torch.Tensor:
    """Append the new tokens to ``layer`` and attend to each head's segment: the decode step.

    Args:
        query: ``[B, Hq, q, D]`` post-RoPE queries of the new tokens (HF layout).
        layer: the ragged layer; ``new_key``/``new_value`` are appended in place.
        new_key: ``[B, Hkv, q, D]`` post-RoPE keys of the new tokens.
        new_value: ``[B, Hkv, q, D]`` their values.
        scaling: logit scale; softcap: logit soft-cap or None.
        sinks: ``[Hq]`` attention-sink logits (gpt-oss ``s_aux``) or None.
        use_kernel: force the Triton kernel (True) or the torch twin (False); None picks the
            kernel on CUDA.

    Returns:
        ``[B, q, Hq, D]``, the layout HF attention functions return. With ``q > 1`` each
        token is appended then attended in turn (causal), one kernel call per token.
    """
    b, hq, q_len, d = query.shape
    if new_key.shape[2] != q_len or new_value.shape[2] != q_len:
        raise ValueError(f"{q_len} queries but {new_key.shape[2]} new keys")
    outs = []
    for t in range(q_len):
        layer.append(new_key[:, :, t], new_value[:, :, t])
        out = ragged_decode(
            query[:, :, t].contiguous(),
            layer.keys,
            layer.values,
            layer.starts,
            layer.lengths,
            max_len=layer.max_capacity,
            scaling=scaling,
            softcap=softcap,
            sinks=sinks,
            use_kernel=use_kernel,
        )  # [B, Hq, D]
        outs.append(out)
    return torch.stack(outs, dim=1)  # [B, q, Hq, D]
