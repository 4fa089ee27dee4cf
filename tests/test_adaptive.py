"""Head-adaptive selection: row totals, per-head floors, window, padding, global top-k."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from snapkv.core.adaptive import RaggedSelection, floor_tokens, select_adaptive
from snapkv.core.selection import select_topk


def _case(seed: int, b: int, h: int, length: int, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random scores, left padding and per-row budgets: ``scores [B, H, L], n_keep [B], key_valid [B, L]``."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(b, h, length, generator=g)
    real = torch.randint(1, length + 1, (b,), generator=g)
    real[0] = length  # one row unpadded
    key_valid = torch.arange(length)[None, :] >= (length - real)[:, None]
    lo = torch.minimum(real, torch.full_like(real, window + 1))
    n_keep = lo + (torch.rand(b, generator=g) * (real - lo + 1).float()).long().clamp_max(real - lo)
    return scores, n_keep, key_valid


def _check_invariants(
    sel: RaggedSelection,
    scores: torch.Tensor,
    n_keep: torch.Tensor,
    key_valid: torch.Tensor,
    window: int,
    alpha: float,
) -> None:
    b, h, length = scores.shape
    kept = torch.zeros(b * h, length, dtype=torch.bool)
    kept[sel.segment, sel.indices] = True
    kept = kept.view(b, h, length)
    idx, valid = sel.to_padded()
    assert torch.equal(idx[valid], sel.indices)
    # Segment bookkeeping: lengths, offsets, sorted unique positions.
    assert sel.lengths.dtype == torch.int32 and sel.lengths.shape == (b, h)
    assert torch.equal(kept.sum(-1), sel.lengths.long())
    assert sel.total == int(sel.lengths.sum())
    for s in range(b * h):
        seg = sel.indices[sel.offsets.view(-1)[s] : sel.offsets.view(-1)[s] + sel.lengths.view(-1)[s]]
        assert torch.all(seg[1:] > seg[:-1])
        assert torch.all(sel.segment[sel.offsets.view(-1)[s] : sel.offsets.view(-1)[s] + len(seg)] == s)
    # Exactly the row total, the floor per head, never padding.
    assert torch.equal(kept.sum((1, 2)), n_keep * h)
    floor = floor_tokens(n_keep, window, alpha)
    assert torch.all(sel.lengths.long() >= floor[:, None])
    assert not torch.any(kept & ~key_valid[:, None, :])
    # The window's real positions are kept by every head.
    win = torch.zeros(length, dtype=torch.bool)
    win[max(length - window, 0) :] = True
    must = win[None, None, :] & key_valid[:, None, :]
    assert torch.all(kept[must.expand_as(kept)])
    # Beyond the floors, the row keeps its best remaining scores (one top-k over heads).
    for r in range(b):
        s = scores[r].clone()
        s[:, max(length - window, 0) :] = float("inf")
        s.masked_fill_(~key_valid[r][None, :], float("-inf"))
        f = int(floor[r])
        forced = torch.zeros(h, length, dtype=torch.bool)
        if f:
            forced.scatter_(-1, s.topk(f, dim=-1).indices, True)
        extra = kept[r] & ~forced
        unkept = ~kept[r] & key_valid[r][None, :]
        if extra.any() and unkept.any():
            assert scores[r][extra].min() >= scores[r][unkept].max()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    b=st.integers(1, 3),
    h=st.integers(1, 4),
    length=st.integers(2, 48),
    window=st.integers(1, 8),
    alpha=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
)
def test_adaptive_invariants(seed: int, b: int, h: int, length: int, window: int, alpha: float) -> None:
    scores, n_keep, key_valid = _case(seed, b, h, length, window)
    sel = select_adaptive(scores, n_keep, window, key_valid, alpha=alpha)
    _check_invariants(sel, scores, n_keep, key_valid, window, alpha)


def test_alpha_one_is_uniform_snapkv() -> None:
    scores, n_keep, key_valid = _case(3, 3, 4, 64, 6)
    sel = select_adaptive(scores, n_keep, 6, key_valid, alpha=1.0)
    uni = select_topk(scores, n_keep, 6, key_valid)
    assert torch.all(sel.lengths.long() == n_keep[:, None])
    idx, _ = sel.to_padded()
    for r in range(3):
        pad = int(uni.pad[r])
        assert torch.equal(idx[r, :, : int(n_keep[r])], uni.indices[r, :, pad:])


def test_adaptive_moves_budget_to_peaked_heads() -> None:
    # Head 0 has many strong positions, head 1 none: head 0 takes the shared budget.
    scores = torch.full((1, 2, 100), 0.01)
    scores[0, 0, :60] = 1.0 + torch.rand(60)
    sel = select_adaptive(scores, torch.tensor([30]), window=4, alpha=0.2)
    floor = int(floor_tokens(torch.tensor([30]), 4, 0.2))
    assert sel.lengths.tolist() == [[60 - floor, floor]]


def test_gather_and_no_padding() -> None:
    scores, n_keep, key_valid = _case(7, 2, 3, 40, 4)
    states = torch.randn(2, 3, 40, 5)
    sel = select_adaptive(scores, n_keep, 4, key_valid)
    flat = sel.gather(states)
    seg = sel.segment
    assert torch.equal(flat, states.view(6, 40, 5)[seg, sel.indices])
    with pytest.raises(ValueError, match="do not match"):
        sel.gather(states[:, :, :-1])


def test_nan_and_inf_scores_keep_totals() -> None:
    scores, n_keep, key_valid = _case(11, 2, 3, 30, 3)
    scores[0, 0, :5] = float("nan")
    scores[1, 1, 3:9] = float("-inf")
    scores[1, 2, 10:12] = float("inf")
    sel = select_adaptive(scores, n_keep, 3, key_valid)
    assert torch.equal(sel.lengths.long().sum(-1), n_keep * 3)


def test_bad_alpha() -> None:
    with pytest.raises(ValueError, match="alpha"):
        select_adaptive(torch.rand(1, 2, 10), torch.tensor([5]), 2, alpha=1.5)
