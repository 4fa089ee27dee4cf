"""Torch twins of the Triton kernels: the reference they are tested against.

Each twin composes the pure-torch functions of :mod:`snapkv.core`; nothing is duplicated.
"""

from __future__ import annotations

import torch

from snapkv.core.scoring import reduce_gqa, window_votes


def reduced_window_votes_ref(
    q_win: torch.Tensor,
    keys: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    *,
    scaling: float,
    softcap: float | None = None,
    gqa_reduce: str = "mean",
    chunk_size: int = 8192,
) -> torch.Tensor:
    """Twin of :func:`snapkv.kernels.score.reduced_window_votes_triton`: ``[B, Hkv, L]`` fp32.

    ``reduce_gqa(window_votes(q_win, keys, key_valid, ...), Hkv, gqa_reduce)``; ``q_win`` is
    ``[B, Hq, w, D]``, ``keys`` ``[B, Hkv, L, D]``, ``key_valid`` ``[B, L]`` bool or None.
    """
    votes = window_votes(  # [B, Hq, L]
        q_win, keys, key_valid, scaling=scaling, softcap=softcap, chunk_size=chunk_size
    )
    return reduce_gqa(votes, keys.shape[1], gqa_reduce)  # [B, Hkv, L]
