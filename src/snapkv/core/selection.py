"""Selection: SnapKV step 5 (top-k of the prefix plus the whole window, original order)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class Selection:
    """Which prompt positions one layer keeps.

    Attributes:
        indices: ``[B, H, P]`` kept positions in increasing order; the first ``pad[b]``
            slots of row ``b`` are filler (index 0) that attention must mask.
        pad: ``[B]`` filler slots at the front of each row (rows keep different counts).
    """

    indices: torch.Tensor
    pad: torch.Tensor

    @property
    def length(self) -> int:
        """Slots per row (the longest row's kept count)."""
        return self.indices.shape[-1]

    def slot_valid(self) -> torch.Tensor:
        """``[B, P]`` bool, True where a slot holds a kept token."""
        slots = torch.arange(self.length, device=self.indices.device)
        return slots[None, :] >= self.pad[:, None]



def select_topk(
    scores: torch.Tensor,
    n_keep: torch.Tensor,
    window: int,
    key_valid: torch.Tensor | None = None,
) -> Selection:
    """Keep each row's top ``n_keep[b]`` positions per head: the last ``window`` always, padding never.

    Args:
        scores: ``[B, H, L]`` higher is kept first (pooled votes for SnapKV).
        n_keep: ``[B]`` int64 tokens kept in each row (window included, at most its real length).
        window: the last ``window`` positions are always kept.
        key_valid: ``[B, L]`` bool, False at padding, or None.

    Returns:
        A :class:`Selection` with ``P = max(n_keep)`` slots per row.
    """
    b, h, length = scores.shape
    scores = scores.float().clone()
    scores[..., length - window :] = float("inf")
    if key_valid is not None:
        scores.masked_fill_(~key_valid[:, None, :], float("-inf"))
    p = min(int(n_keep.max()), length)
    # Stable sort, not topk: among tied scores (max pooling makes many) the earlier position wins,
    # whatever padding precedes the row, so a padded batch row selects as it would alone.
    top_vals, top_idx = (t[..., :p] for t in scores.sort(dim=-1, descending=True, stable=True))  # [B, H, P]
    rank = torch.arange(p, device=scores.device)
    keep = (rank[None, None, :] < n_keep[:, None, None].to(scores.device)) & (top_vals > float("-inf"))
    # Filler slots sort first (key -1), kept positions follow in increasing order.
    order_key = torch.where(keep, top_idx, torch.full_like(top_idx, -1))
    sorted_idx = order_key.sort(dim=-1).values
    pad = (sorted_idx[:, 0, :] < 0).sum(-1)  # [B]; equal over heads for a uniform budget
    return Selection(indices=sorted_idx.clamp_min(0), pad=pad)


def gather_positions(states: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather kept positions: ``[B, H, L, D]`` x ``[B, H, P] -> [B, H, P, D]``."""
    return states.gather(2, indices[..., None].expand(-1, -1, -1, states.shape[-1]))
