"""Properties of ``select_topk`` (SnapKV step 5) and the selection-only baselines."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from snapkv.core.selection import Selection, gather_positions, select_topk
from snapkv.methods import RandomSelect, ScoreInputs, SnapKV, StreamingLLM

pytestmark = pytest.mark.usefixtures("one_thread")



@st.composite
def selection_problems(draw):
    """Scores ``[B, H, L]``, left padding, window and per-row budgets (budget > window)."""
    b = draw(st.integers(1, 3))
    h = draw(st.integers(1, 3))
    length = draw(st.integers(1, 40))
    window = draw(st.integers(1, length))
    pads = draw(st.lists(st.integers(0, length - 1), min_size=b, max_size=b))
    n_keep = draw(st.lists(st.integers(min(window + 1, length), length), min_size=b, max_size=b))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["distinct", "ties", "constant"]))
    gen = torch.Generator().manual_seed(seed)
    if kind == "distinct":
        scores = torch.randn(b, h, length, generator=gen)
    elif kind == "ties":
        scores = torch.randint(0, 3, (b, h, length), generator=gen).float()
    else:
        scores = torch.zeros(b, h, length)
    pos = torch.arange(length)
    key_valid = torch.stack([pos >= p for p in pads])
    use_none = draw(st.booleans()) and all(p == 0 for p in pads)
    return scores, torch.tensor(n_keep), window, (None if use_none else key_valid), key_valid


@given(selection_problems())
def test_select_topk_invariants(problem):
    scores, n_keep, window, key_valid_arg, key_valid = problem
    b, h, length = scores.shape
    sel = select_topk(scores, n_keep, window, key_valid_arg)
    assert isinstance(sel, Selection)
    real = key_valid.sum(-1)
    expected = torch.minimum(real, n_keep)
    assert sel.indices.shape == (b, h, int(n_keep.max()))  # documented: P = max(n_keep)
    assert sel.length == int(n_keep.max())
    # exactly min(L_b, n_keep_b) kept; filler slots only at the front, and as many as the gap
    assert torch.equal(sel.pad, sel.length - expected)
    valid_slots = sel.slot_valid()
    assert torch.equal(valid_slots.sum(-1), expected)
    slots = torch.arange(sel.length)
    assert torch.equal(valid_slots, slots[None, :] >= sel.pad[:, None])
    for r in range(b):
        pad = int(sel.pad[r])
        assert sel.indices[r, :, :pad].eq(0).all()
        real_pos = set(torch.nonzero(key_valid[r]).flatten().tolist())
        win = {p for p in range(length - window, length) if p in real_pos}
        for head in range(h):
            kept = sel.indices[r, head, pad:].tolist()
            assert kept == sorted(set(kept)), f"not strictly increasing: {kept}"
            assert set(kept) <= real_pos, "padding kept"
            assert win <= set(kept), "window not kept whole"
            # the rest is a top-k of the scores: nothing dropped beats anything kept
            kept_prefix = [p for p in kept if p not in win]
            dropped = sorted(real_pos - set(kept))
            if kept_prefix and dropped:
                assert scores[r, head, kept_prefix].min() >= scores[r, head, dropped].max()


@given(selection_problems())
def test_select_topk_does_not_modify_scores(problem):
    scores, n_keep, window, key_valid_arg, _ = problem
    before = scores.clone()
    select_topk(scores, n_keep, window, key_valid_arg)
    assert torch.equal(scores, before)


@given(
    length=st.integers(2, 40),
    pad=st.integers(1, 20),
    seed=st.integers(0, 2**31 - 1),
    levels=st.integers(1, 4),
)
def test_select_topk_is_invariant_to_left_padding(length, pad, seed, levels):
    """A row selects the same positions alone and left-padded, ties included.

    Max pooling copies each local maximum to its neighbours, so exact ties are the rule; the
    choice among tied positions must not depend on how much padding precedes the row, or a
    batch decodes differently from its rows run alone.
    """
    gen = torch.Generator().manual_seed(seed)
    window = 1 + seed % length
    n_keep = torch.tensor([min(length, window + 1 + seed % 7)])
    scores = torch.randint(0, levels, (1, 2, length), generator=gen).float()
    alone = select_topk(scores, n_keep, window)
    padded_scores = torch.cat([torch.rand(1, 2, pad, generator=gen), scores], dim=-1)
    key_valid = (torch.arange(pad + length) >= pad)[None]
    padded = select_topk(padded_scores, n_keep, window, key_valid)
    assert torch.equal(padded.indices - pad, alone.indices)


def test_select_topk_rows_keep_different_counts():
    scores = torch.arange(10.0).flip(0).expand(2, 1, 10).clone()  # position 0 scores best
    key_valid = torch.ones(2, 10, dtype=torch.bool)
    key_valid[1, :7] = False  # row 1 holds 3 real tokens
    sel = select_topk(scores, torch.tensor([5, 5]), window=2, key_valid=key_valid)
    assert sel.indices[0, 0].tolist() == [0, 1, 2, 8, 9]
    assert sel.pad.tolist() == [0, 2]
    assert sel.indices[1, 0, 2:].tolist() == [7, 8, 9]
    assert sel.slot_valid().tolist() == [[True] * 5, [False, False, True, True, True]]


def test_select_topk_heads_choose_independently():
    scores = torch.zeros(1, 2, 8)
    scores[0, 0, 1] = 1.0
    scores[0, 1, 4] = 1.0
    sel = select_topk(scores, torch.tensor([3]), window=2)
    assert sel.indices.tolist() == [[[1, 6, 7], [4, 6, 7]]]


def test_gather_positions():
    states = torch.randn(2, 3, 9, 4)
    idx = torch.randint(0, 9, (2, 3, 5))
    out = gather_positions(states, idx)
    for b in range(2):
        for h in range(3):
            assert torch.equal(out[b, h], states[b, h, idx[b, h]])


def test_method_compress_gathers_keys_and_values():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 12, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)
    key_valid = torch.ones(2, 12, dtype=torch.bool)
    key_valid[1, :3] = False
    inputs = ScoreInputs(queries=q, keys=k, key_valid=key_valid, window=3, scaling=0.35)
    new_k, new_v, sel = SnapKV(kernel=3).compress(inputs, v, torch.tensor([6, 6]))
    assert new_k.shape == new_v.shape == (2, 2, 6, 8)
    assert sel.pad.tolist() == [0, 0]
    for b in range(2):
        for h in range(2):
            assert torch.equal(new_k[b, h], k[b, h, sel.indices[b, h]])
            assert torch.equal(new_v[b, h], v[b, h, sel.indices[b, h]])
    assert not sel.indices[1].lt(3).any()


@pytest.mark.parametrize("pad", [0, 3])
def test_streaming_keeps_sinks_and_recent(pad):
    length, window, sinks = 20, 3, 2
    keys = torch.randn(1, 2, length, 4)
    key_valid = (torch.arange(length) >= pad)[None]
    inputs = ScoreInputs(queries=keys, keys=keys, key_valid=key_valid, window=window, scaling=1.0)
    sel = StreamingLLM(sinks=sinks).select(inputs, torch.tensor([8]))
    want = [pad, pad + 1] + list(range(length - 6, length))
    assert sel.indices[0].tolist() == [want, want]


def test_random_select_is_seeded_per_layer():
    keys = torch.randn(1, 2, 30, 4)

    def pick(seed, layer):
        inputs = ScoreInputs(queries=keys, keys=keys, key_valid=None, window=2, scaling=1.0, layer_idx=layer)
        return RandomSelect(seed=seed).select(inputs, torch.tensor([10])).indices

    assert torch.equal(pick(0, 1), pick(0, 1))
    assert not torch.equal(pick(0, 1), pick(0, 2))
    assert not torch.equal(pick(0, 1), pick(1, 1))
