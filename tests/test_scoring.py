"""SnapKV scoring and selection against a dense, obviously-correct reference of the paper.

The reference below is written straight from the paper's equations (arXiv:2404.14469,
Algorithm 1, with the GQA group reduction of kvpress / KVCache-Factory), in float64,
with one full softmax and no chunking:

    probs = softmax(q_win k^T * scale) over all L keys, causal inside the window, padding out
    votes = sum over the w window queries                          [B, Hq, L]
    votes = mean|max over the query heads of each KV head          [B, Hkv, L]
    score = pool1d(votes[:L-w], k, stride 1, pad k//2) ++ votes[L-w:]
    keep  = sorted(top-(n - w) of the prefix  +  the window)
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from snapkv.core.scoring import pool_votes, reduce_gqa, window_votes
from snapkv.core.selection import gather_positions, select_topk
from snapkv.methods import H2O, ScoreInputs, SnapKV

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the dense reference -------------------------------------------------------------------


def ref_votes(q_win, keys, key_valid=None, *, scaling, softcap=None):
    """``[B, Hq, L]`` float64 votes of the window queries, one dense softmax."""
    b, hq, w, _ = q_win.shape
    hkv, length = keys.shape[1], keys.shape[2]
    k = keys.double().repeat_interleave(hq // hkv, dim=1)  # [B, Hq, L, D]
    logits = q_win.double() @ k.transpose(-1, -2) * scaling  # [B, Hq, w, L]
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    q_pos = torch.arange(length - w, length)
    k_pos = torch.arange(length)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None]  # [1, 1, w, L]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    probs = probs.nan_to_num(0.0)  # a padding query with no visible key votes nothing
    return probs.sum(2)


def ref_scores(q_win, keys, key_valid, *, scaling, kernel, pooling, reduce, softcap=None):
    """``[B, Hkv, L]`` float64 SnapKV scores: votes, GQA-reduced, prefix pooled."""
    votes = ref_votes(q_win, keys, key_valid, scaling=scaling, softcap=softcap)
    b, hq, length = votes.shape
    hkv, w = keys.shape[1], q_win.shape[2]
    grouped = votes.view(b, hkv, hq // hkv, length)
    red = grouped.mean(2) if reduce == "mean" else grouped.amax(2)
    prefix = length - w
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    pooled = pool(red[..., :prefix].reshape(b * hkv, 1, prefix), kernel, stride=1, padding=kernel // 2)
    return torch.cat([pooled.view(b, hkv, prefix), red[..., prefix:]], dim=-1)


def ref_keep(scores_row, n_keep, window, valid_row):
    """The reference's kept positions of one (row, head), and the prefix score cut-off."""
    length = scores_row.shape[0]
    win = [p for p in range(length - window, length) if valid_row[p]]
    prefix = [p for p in range(length - window) if valid_row[p]]
    n_prefix = n_keep - len(win)
    ranked = sorted(prefix, key=lambda p: -float(scores_row[p]))
    return sorted(ranked[:n_prefix] + win), ranked, n_prefix


def check_selection(sel, scores, n_keep, window, key_valid, tol=1e-6):
    """Assert ``sel`` is the reference top-k of ``scores``; returns the number of tie-free (row, head).

    Where the reference scores at the cut-off differ by more than ``tol``, the kept set must equal
    the reference's exactly. Where they tie (max pooling copies one value to its neighbours; a
    prefix shorter than the kernel averages to one value), any valid top-k is accepted: the
    window whole, no padding, and every kept prefix score >= every dropped one - ``tol``.
    """
    b, h, length = scores.shape
    untied = 0
    for r in range(b):
        valid = key_valid[r] if key_valid is not None else torch.ones(length, dtype=torch.bool)
        pad = int(sel.pad[r])
        assert sel.indices[r, :, :pad].eq(0).all(), "filler slots must hold index 0"
        for head in range(h):
            kept = sel.indices[r, head, pad:].tolist()
            want, ranked, n_prefix = ref_keep(scores[r, head], int(n_keep[r]), window, valid)
            s = scores[r, head]
            tie = 0 < n_prefix < len(ranked) and float(s[ranked[n_prefix - 1]] - s[ranked[n_prefix]]) <= tol
            if not tie:
                untied += 1
                assert kept == want, f"row {r} head {head}: kept {kept}, reference {want}"
                continue
            assert len(kept) == int(n_keep[r])
            assert kept == sorted(set(kept)), f"not strictly increasing: {kept}"
            assert all(bool(valid[p]) for p in kept), "padding kept"
            kept_prefix = [p for p in kept if p < length - window]
            assert set(kept) - set(kept_prefix) == set(want) - set(ranked), "window not kept whole"
            assert len(kept_prefix) == n_prefix
            dropped = [p for p in ranked if p not in kept_prefix]
            gap = float(s[kept_prefix].min()) - float(s[dropped].max())
            assert gap >= -tol, f"row {r} head {head}: kept a prefix score {-gap:.3g} below a dropped one"
    return untied


# -- random cases --------------------------------------------------------------------------


def make_case(seed, *, batch, hkv, group, length, window, head_dim=8, pad_max=0):
    """Random post-RoPE-like queries/keys (distinct values, peaked attention) and left padding."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hkv * group, window, head_dim, generator=g) * 1.5
    k = torch.randn(batch, hkv, length, head_dim, generator=g) * 1.5
    key_valid = None
    if pad_max:
        pads = [0] + torch.randint(0, pad_max + 1, (batch - 1,), generator=g).tolist()
        pos = torch.arange(length)
        key_valid = torch.stack([pos >= p for p in pads])
    return q, k, key_valid


def _cases(n, seed):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.choice([5, 9, 16, 23, 37, 50, 64])
        window = rng.randint(1, length - 1)
        out.append(
            dict(
                seed=1000 * seed + i,
                batch=rng.choice([1, 1, 2, 3]),
                hkv=rng.choice([1, 2]),
                group=rng.choice([1, 2, 3, 4, 8]),
                length=length,
                window=window,
                kernel=rng.choice([1, 3, 5, 7]),
                pooling=rng.choice(["max", "avg"]),
                reduce=rng.choice(["mean", "max"]),
                chunk_size=rng.choice([1, 3, 7, 16, length - 1 if length > 1 else 1, 8192]),
                pad_frac=rng.choice([0.0, 0.3, 0.6, 0.9]),
                budget_frac=rng.random(),
            )
        )
    return out


CASES = _cases(80, seed=1)


def _id(c):
    return (
        f"B{c['batch']}Hkv{c['hkv']}G{c['group']}L{c['length']}w{c['window']}k{c['kernel']}"
        f"{c['pooling']}{c['reduce']}c{c['chunk_size']}p{c['pad_frac']}-{c['seed']}"
    )


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_window_votes_match_dense_reference(case):
    c = case
    q, k, key_valid = make_case(
        c["seed"], batch=c["batch"], hkv=c["hkv"], group=c["group"], length=c["length"], window=c["window"],
        pad_max=int(c["pad_frac"] * c["length"]),
    )
    scaling = q.shape[-1] ** -0.5
    got = window_votes(q, k, key_valid, scaling=scaling, chunk_size=c["chunk_size"])
    want = ref_votes(q, k, key_valid, scaling=scaling)
    assert got.shape == want.shape
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # each real window query distributes exactly one unit of probability
    n_real_queries = (
        key_valid[:, -c["window"]:].sum(-1) if key_valid is not None else torch.full((c["batch"],), c["window"])
    )
    torch.testing.assert_close(
        got.sum(-1).double(), n_real_queries[:, None].double().expand_as(got.sum(-1)), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_snapkv_score_and_selection_match_dense_reference(case):
    c = case
    length, window = c["length"], c["window"]
    q, k, key_valid = make_case(
        c["seed"], batch=c["batch"], hkv=c["hkv"], group=c["group"], length=length, window=window,
        pad_max=int(c["pad_frac"] * length),
    )
    scaling = q.shape[-1] ** -0.5
    method = SnapKV(kernel=c["kernel"], pooling=c["pooling"], gqa_reduce=c["reduce"], chunk_size=c["chunk_size"])
    # the method sees every prefill query; only the last `window` may vote
    full_q = torch.cat([torch.randn(c["batch"], q.shape[1], length - window, q.shape[-1]) * 100, q], dim=2)
    inputs = ScoreInputs(queries=full_q, keys=k, key_valid=key_valid, window=window, scaling=scaling)
    got = method.score(inputs)
    want = ref_scores(
        q, k, key_valid, scaling=scaling, kernel=c["kernel"], pooling=c["pooling"], reduce=c["reduce"]
    )
    assert got.shape == (c["batch"], c["hkv"], length)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)

    real = key_valid.sum(-1) if key_valid is not None else torch.full((c["batch"],), length)
    budget = window + 1 + int(c["budget_frac"] * (length - window - 1))
    n_keep = real.clamp(max=budget)
    sel = method.select(inputs, n_keep)
    check_selection(sel, want, n_keep, window, key_valid)
    # the gathered keys are the keys at the kept positions
    kept_k = gather_positions(k, sel.indices)
    for r in range(c["batch"]):
        for h in range(c["hkv"]):
            idx = sel.indices[r, h, int(sel.pad[r]):]
            assert torch.equal(kept_k[r, h, int(sel.pad[r]):], k[r, h, idx])


def test_reference_selection_is_exact_without_ties():
    """Avg pooling rarely ties: nearly every kept set is compared exactly with the reference's."""
    untied = total = 0
    for i, c in enumerate(_cases(30, seed=2)):
        q, k, key_valid = make_case(
            i, batch=2, hkv=2, group=c["group"], length=c["length"], window=c["window"], pad_max=c["length"] // 3
        )
        scaling = q.shape[-1] ** -0.5
        method = SnapKV(kernel=c["kernel"], pooling="avg", gqa_reduce=c["reduce"], chunk_size=c["chunk_size"])
        inputs = ScoreInputs(queries=q, keys=k, key_valid=key_valid, window=c["window"], scaling=scaling)
        want = ref_scores(q, k, key_valid, scaling=scaling, kernel=c["kernel"], pooling="avg", reduce=c["reduce"])
        n_keep = key_valid.sum(-1).clamp(max=c["window"] + max(1, (c["length"] - c["window"]) // 2))
        untied += check_selection(method.select(inputs, n_keep), want, n_keep, c["window"], key_valid)
        total += 2 * 2
    assert untied >= 0.8 * total, f"only {untied}/{total} (row, head) selections were compared exactly"


@pytest.mark.parametrize("softcap", [None, 1.0, 5.0])
@pytest.mark.parametrize("chunk_size", [4, 8192])
def test_window_votes_softcap(softcap, chunk_size):
    q, k, key_valid = make_case(3, batch=2, hkv=2, group=2, length=29, window=6, pad_max=9)
    q, k = q * 3, k * 3  # large logits, so that the cap matters
    got = window_votes(q, k, key_valid, scaling=0.25, softcap=softcap, chunk_size=chunk_size)
    want = ref_votes(q, k, key_valid, scaling=0.25, softcap=softcap)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    if softcap == 1.0:
        assert not torch.allclose(want, ref_votes(q, k, key_valid, scaling=0.25), atol=1e-3)


def test_window_votes_without_padding_equals_all_valid():
    q, k, _ = make_case(4, batch=2, hkv=2, group=3, length=21, window=5)
    a = window_votes(q, k, None, scaling=0.3, chunk_size=4)
    b = window_votes(q, k, torch.ones(2, 21, dtype=torch.bool), scaling=0.3, chunk_size=8192)
    torch.testing.assert_close(a, b)


def test_window_votes_rejects_bad_head_ratio():
    with pytest.raises(ValueError, match="multiple"):
        window_votes(torch.randn(1, 3, 2, 4), torch.randn(1, 2, 9, 4), scaling=0.5)


def test_causal_inside_window():
    """The first window query must not vote for the keys after it."""
    q, k, _ = make_case(5, batch=1, hkv=1, group=1, length=12, window=4)
    votes_first = window_votes(q[:, :, :1], k[:, :, :9], scaling=0.5)  # the first window query alone
    votes_all = window_votes(q, k, scaling=0.5)
    # keys 9..11 get no vote from the first query, so dropping it leaves their votes unchanged
    votes_rest = window_votes(q[:, :, 1:], k, scaling=0.5)
    torch.testing.assert_close(votes_all[..., 9:], votes_rest[..., 9:])
    torch.testing.assert_close(votes_all[..., :9], votes_rest[..., :9] + votes_first, rtol=1e-5, atol=1e-6)


# -- known answers for the small steps ------------------------------------------------------


def test_reduce_gqa_known_values():
    votes = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [1.0, 7.0]]])  # [1, 4, 2]
    torch.testing.assert_close(reduce_gqa(votes, 2, "mean"), torch.tensor([[[2.0, 1.0], [3.0, 6.0]]]))
    torch.testing.assert_close(reduce_gqa(votes, 2, "max"), torch.tensor([[[3.0, 2.0], [5.0, 7.0]]]))
    torch.testing.assert_close(reduce_gqa(votes, 4, "mean"), votes)
    with pytest.raises(ValueError, match="gqa_reduce"):
        reduce_gqa(votes, 2, "sum")


def test_pool_votes_known_values():
    v = torch.tensor([[[0.0, 3.0, 1.0, 0.0, 0.0, 2.0]]])
    torch.testing.assert_close(pool_votes(v, 3, "max"), torch.tensor([[[3.0, 3.0, 3.0, 1.0, 2.0, 2.0]]]))
    torch.testing.assert_close(
        pool_votes(v, 3, "avg"), torch.tensor([[[1.0, 4 / 3, 4 / 3, 1 / 3, 2 / 3, 2 / 3]]])
    )  # zero padding counted in the average, as F.avg_pool1d does
    torch.testing.assert_close(pool_votes(v, 1, "max"), v)
    with pytest.raises(ValueError, match="pooling"):
        pool_votes(v, 3, "median")


def test_snapkv_pools_the_prefix_only():
    """A large vote inside the window must not spread into the prefix through the pooling."""
    length, window = 12, 3
    q = torch.zeros(1, 1, window, 4)
    k = torch.zeros(1, 1, length, 4)
    q[..., 0] = 1.0
    k[0, 0, length - window, 0] = 30.0  # the first window key takes nearly all the attention
    inputs = ScoreInputs(queries=q, keys=k, key_valid=None, window=window, scaling=1.0)
    scores = SnapKV(kernel=7, pooling="max").score(inputs)
    assert scores[0, 0, length - window] > 2.5
    assert scores[0, 0, : length - window].max() < 1e-6


def test_h2o_matches_dense_reference_with_every_query():
    q, k, key_valid = make_case(6, batch=2, hkv=2, group=2, length=19, window=19, pad_max=6)
    inputs = ScoreInputs(queries=q, keys=k, key_valid=key_valid, window=3, scaling=0.35)
    got = H2O(gqa_reduce="max", chunk_size=5).score(inputs)
    want = ref_votes(q, k, key_valid, scaling=0.35).view(2, 2, 2, 19).amax(2)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_select_topk_simple_example():
    scores = torch.tensor([[[5.0, 1.0, 4.0, 2.0, 0.0, 0.0]]])
    sel = select_topk(scores, torch.tensor([4]), window=2)
    assert sel.indices.tolist() == [[[0, 2, 4, 5]]]
    assert sel.pad.tolist() == [0]


def test_case_grid_covers_the_space():
    """The random grid above exercises every option the reference is meant to check."""
    seen = {key: {c[key] for c in CASES} for key in ("group", "kernel", "pooling", "reduce", "batch")}
    assert seen["group"] == {1, 2, 3, 4, 8}
    assert seen["kernel"] == {1, 3, 5, 7}
    assert seen["pooling"] == {"max", "avg"} and seen["reduce"] == {"mean", "max"}
    assert seen["batch"] >= {1, 3}
    assert any(c["chunk_size"] < c["length"] for c in CASES)
    assert any(c["length"] % 2 for c in CASES)
    assert any(c["window"] == 1 for c in CASES) and any(c["window"] == c["length"] - 1 for c in CASES)
    assert any(c["pad_frac"] > 0 and c["batch"] > 1 for c in CASES)
