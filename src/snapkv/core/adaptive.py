"""Head-adaptive selection: one top-k across the heads of a layer, with a floor per head.

Based on Feng et al. 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
Allocation for Efficient LLM Inference", arXiv:2407.11550.

Uniform SnapKV keeps ``n_keep`` tokens in every KV head. Here the row's total,
``n_keep * Hkv``, is shared by the heads of the layer:

1. every head keeps the whole observation window (the last ``window`` positions);
2. every head keeps its own top ``floor(alpha * (n_keep - window))`` prefix positions
   (the floor), so no head is starved;
3. the rest of the total goes to the best remaining positions of *all* heads of the row,
   by one top-k over ``Hkv * L`` scores.

Padding is never kept. Heads then hold different counts, so the result is ragged:
flat kept positions with per-(row, head) lengths, stored by
:class:`~snapkv.cache.ragged.RaggedLayer` without padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: How the kept tokens of a layer are split between its KV heads.
HEAD_MODES: tuple[str, ...] = ("uniform", "adaptive")


@dataclass(slots=True)
class RaggedSelection:
    """Which prompt positions each KV head of one layer keeps, heads holding different counts.

    Attributes:
        indices: ``[N]`` int64 kept positions; segment ``(b, h)`` occupies
            ``offsets[b, h] : offsets[b, h] + lengths[b, h]``, in increasing position order.
            Segments follow each other in row-major ``(b, h)`` order.
        segment: ``[N]`` int64 ``b * Hkv + h`` of each entry.
        lengths: ``[B, Hkv]`` int32 kept tokens per head.
        offsets: ``[B, Hkv]`` int64 start of each segment in ``indices``.
        prompt_length: ``L``, the padded prompt length the positions index into.
    """

    indices: torch.Tensor
    segment: torch.Tensor
    lengths: torch.Tensor
    offsets: torch.Tensor
    prompt_length: int

    @property
    def total(self) -> int:
        """Kept tokens over all rows and heads (``N``)."""
        return self.indices.numel()

    def gather(self, states: torch.Tensor) -> torch.Tensor:
        """Kept states, flat: ``[B, Hkv, L, D] -> [N, D]`` in segment order."""
        b, h, length, d = states.shape
        if length != self.prompt_length or b * h != self.lengths.numel():
            raise ValueError(
                f"states of shape {tuple(states.shape)} do not match a selection over "
                f"{tuple(self.lengths.shape)} heads and {self.prompt_length} positions"
            )
        flat = states.reshape(b * h * length, d)
        return flat.index_select(0, self.segment * length + self.indices)

    def trailing_run(self) -> int:
        """The largest ``n`` such that every head keeps the prompt's last ``n`` positions as its last ``n``.

        The window (always kept) makes it at least the window; a probe that voted as the
        window can be cut from every head exactly when its length is at most this (one host sync).
        """
        if self.total == 0:
            return 0
        lengths = self.lengths.reshape(-1).to(self.indices.device, torch.long)
        offsets = self.offsets.reshape(-1).to(self.indices.device, torch.long)
        rank = torch.arange(self.total, device=self.indices.device) - offsets[self.segment]
        from_end = lengths[self.segment] - 1 - rank  # 0 at each head's last kept position
        bad = self.indices != self.prompt_length - 1 - from_end
        run = lengths.clone()  # a head whose every entry matches: its whole segment
        run.scatter_reduce_(0, self.segment[bad], from_end[bad], reduce="amin")
        return int(run.min())

    def to_padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense view for references: ``indices [B, Hkv, P]`` (0 at filler) and ``valid [B, Hkv, P]``.

        ``P`` is the longest segment (one host sync; not for the hot path).
        """
        b, h = self.lengths.shape
        p = int(self.lengths.max()) if self.lengths.numel() else 0
        slot = torch.arange(p, device=self.indices.device)
        valid = slot[None, None, :] < self.lengths[..., None]  # [B, Hkv, P]
        src = (self.offsets[..., None] + slot).clamp_max(max(self.total - 1, 0))
        idx = self.indices[src] if self.total else torch.zeros_like(src)
        return torch.where(valid, idx, torch.zeros_like(idx)), valid


def floor_tokens(n_keep: torch.Tensor, window: int, alpha: float) -> torch.Tensor:
    """``[B]`` tokens every head keeps for sure: ``window + floor(alpha * (n_keep - window))``.

    Never more than ``n_keep`` (a short prompt kept whole has ``n_keep < window``).
    """
    prefix = (n_keep - window).clamp_min(0)
    floor = window + torch.floor(alpha * prefix.double()).long()
    return torch.minimum(floor, n_keep)


def _rank_desc(keys: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim, 0 for the largest (stable: earlier first on ties)."""
    order = keys.sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    src = torch.arange(keys.shape[-1], device=keys.device).expand_as(order)
    return rank.scatter_(-1, order, src)


def select_adaptive(
    scores: torch.Tensor,
    n_keep: torch.Tensor,
    window: int,
    key_valid: torch.Tensor | None = None,
    alpha: float = 0.2,
) -> RaggedSelection:
    """Share each row's ``n_keep[b] * Hkv`` kept tokens between its KV heads.

    Args:
        scores: ``[B, Hkv, L]`` higher is kept first (e.g. ``SnapKV().score(inputs)``).
        n_keep: ``[B]`` int tokens per head of a uniform budget (window included, at most
            the row's real length); the row keeps ``n_keep[b] * Hkv`` tokens in all.
        window: the last ``window`` positions are kept by every head.
        key_valid: ``[B, L]`` bool, False at padding, or None.
        alpha: share of the prefix budget guaranteed to every head, in [0, 1]. ``1`` is
            uniform SnapKV; ``0`` leaves only the window guaranteed.

    Returns:
        A :class:`RaggedSelection`; one host sync sizes its flat indices.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    b, h, length = scores.shape
    device = scores.device
    n_keep = n_keep.to(device=device, dtype=torch.long)
    # Finite real scores, the window above them, padding below everything.
    big = torch.finfo(torch.float32).max
    s = scores.float().nan_to_num(nan=-big, posinf=big, neginf=-big)  # [B, Hkv, L]
    s[..., max(length - window, 0) :] = float("inf")
    if key_valid is not None:
        s.masked_fill_(~key_valid.to(device)[:, None, :], float("-inf"))
    # Step 1-2: the floor of every head (window first, as it scores +inf).
    floor = floor_tokens(n_keep, window, alpha)  # [B]
    in_floor = _rank_desc(s) < floor[:, None, None]  # [B, Hkv, L]
    # Step 3: one top-k over all heads of the row for the rest of the total.
    pooled = torch.where(in_floor, torch.full_like(s, float("inf")), s).view(b, h * length)
    kept = _rank_desc(pooled) < (n_keep * h)[:, None]  # [B, Hkv*L]
    kept = kept.view(b, h, length)
    if key_valid is not None:
        kept &= key_valid.to(device)[:, None, :]
    # Row-major nonzero: segments in (b, h) order, positions increasing inside each.
    nz = kept.nonzero()  # [N, 3], the one host sync
    lengths = kept.sum(-1, dtype=torch.int32)  # [B, Hkv]
    offsets = (lengths.view(-1).cumsum(0, dtype=torch.long) - lengths.view(-1)).view(b, h)
    return RaggedSelection(
        indices=nz[:, 2],
        segment=nz[:, 0] * h + nz[:, 1],
        lengths=lengths,
        offsets=offsets,
        prompt_length=length,
    )
