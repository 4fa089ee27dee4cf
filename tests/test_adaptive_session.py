"""Head-adaptive budgets through the HF path: ragged cache in SnapKVSession."""

from __future__ import annotations

import pytest
import torch

from snapkv import SnapKVConfig, SnapKVSession
from snapkv.methods import AdaptiveHeads, SnapKV
from tests.tiny_models import left_padded, tiny_model

pytestmark = pytest.mark.usefixtures("no_grad")


def _generate(model, ids, mask, config, n=6, **session_kw):
    with SnapKVSession(model, config, **session_kw) as s:
        cache = s.new_cache()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, **s.cache_kwargs(cache))
    return out, cache, s


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_alpha_one_equals_uniform_snapkv(family):
    model = tiny_model(family)
    ids, mask = left_padded([90, 120, 70])
    config = SnapKVConfig(budget=40, window=8)
    uni, _, _ = _generate(model, ids, mask, config)
    ada, cache, _ = _generate(model, ids, mask, config, head_budget="adaptive", alpha=1.0, slack=8)
    assert torch.equal(uni.sequences, ada.sequences)
    for a, b in zip(uni.logits, ada.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert any(getattr(layer, "ragged", None) is not None for layer in cache.layers)


def test_adaptive_batch_equals_rows_alone_and_keeps_row_totals():
    model = tiny_model("llama")
    lengths = [90, 120, 70]
    ids, mask = left_padded(lengths)
    config = SnapKVConfig(budget=40, window=8)
    batch, cache, session = _generate(model, ids, mask, config, n=5, head_budget="adaptive", slack=8)
    for row, n in enumerate(lengths):
        alone, _, _ = _generate(model, ids[row:row + 1, -n:], mask[row:row + 1, -n:], config, n=5,
                                head_budget="adaptive", slack=8)
        assert torch.equal(batch.sequences[row, -5:], alone.sequences[0, -5:])
    for layer in cache.layers:
        rag = layer.ragged
        hkv = rag.num_kv_heads
        # 4 tokens were appended to every head after the prompt's kept tokens.
        kept = rag.lengths - rag.appended
        assert kept.sum(-1).tolist() == [40 * hkv] * 3
        assert bool((kept >= 8).all())  # the window, at least
        assert rag.kv_bytes() == 2 * (int(kept.sum()) + 3 * hkv * 8) * rag.head_dim * 4
    assert all(s.bytes_after < s.bytes_before for s in session.stats)


def test_adaptive_slack_overflow_raises_and_snapshot_rewinds():
    model = tiny_model("llama")
    ids, mask = left_padded([100])
    with SnapKVSession(model, SnapKVConfig(budget=40, window=8), head_budget="adaptive", slack=3) as s:
        cache = s.new_cache()
        model(input_ids=ids, **s.cache_kwargs(cache))
        snap = cache.snapshot()
        first = model(input_ids=torch.tensor([[5, 6]]), **s.cache_kwargs(cache)).logits
        cache.restore(snap)
        again = model(input_ids=torch.tensor([[5, 6]]), **s.cache_kwargs(cache)).logits
        torch.testing.assert_close(first, again)
        model(input_ids=torch.tensor([[7]]), **s.cache_kwargs(cache))
        with pytest.raises(RuntimeError, match="slack"):
            model(input_ids=torch.tensor([[8]]), **s.cache_kwargs(cache))


def test_drop_tail_on_ragged_layers_equals_the_dense_cut():
    """alpha=1 adaptive equals uniform SnapKV; cutting the prompt's last tokens (a probe that voted)
    keeps that equality, and a snapshot from before the cut still holds the uncut layer."""
    model = tiny_model("llama")
    ids, _ = left_padded([100])
    config = SnapKVConfig(budget=40, window=8)
    q = torch.tensor([[5, 6]])
    out = []
    for kw in ({}, {"method": AdaptiveHeads(SnapKV(), alpha=1.0, slack=4)}):
        with SnapKVSession(model, config, **kw) as s:
            cache = s.new_cache()
            model(input_ids=ids, **s.cache_kwargs(cache))
            snap = cache.snapshot()
            for layer in cache.layers:
                layer.drop_tail(5)
            out.append(model(input_ids=q, **s.cache_kwargs(cache)).logits)
            if not kw:
                continue
            layer = cache.layers[0]
            assert layer.seen == 97 and layer.prompt_length == 95 and layer.ragged.appended == 2
            with pytest.raises(RuntimeError, match="nothing appended"):
                layer.drop_tail(1)
            cache.restore(snap)  # the cut packed new buffers: the snapshot's layers are intact
            full = model(input_ids=q, **s.cache_kwargs(cache)).logits
            cache.restore(snap)
            tail = cache.layers[0].ragged_tail
            assert tail >= 8 and cache.layers[0].ragged.lengths.sum() == 40 * 2
            with pytest.raises(ValueError, match=f"not the prompt's last {tail + 1} positions"):
                cache.layers[0].drop_tail(tail + 1)
            for layer in cache.layers:
                layer.drop_tail(5)
            torch.testing.assert_close(model(input_ids=q, **s.cache_kwargs(cache)).logits, out[-1])
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full, out[1])  # the cut changed something


@pytest.mark.parametrize("kw, match", [({"head_budget": "per-head"}, "head_budget"), ({"alpha": 1.5}, "alpha"),
                                       ({"slack": 0}, "slack"), ({"layer_profile": "cone"}, "layer_profile")])
def test_bad_session_options(kw, match):
    with pytest.raises(ValueError, match=match):
        SnapKVSession(tiny_model("llama"), SnapKVConfig(budget=40, window=8), **kw)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_derive_adaptive_equals_an_adaptive_session(family):
    """One captured prefill derives the same ragged cache as a session compressing directly."""
    model = tiny_model(family)
    ids, mask = left_padded([120])
    config = SnapKVConfig(budget=40, window=8)
    direct, _, _ = _generate(model, ids, mask, config, n=4, head_budget="adaptive", alpha=0.3, slack=8)
    with SnapKVSession(model, config, capture=True, slack=8) as s:
        source = s.new_cache()
        logits = model(input_ids=ids, **s.cache_kwargs(source)).logits[:, -1]
        with pytest.raises(ValueError, match="head_budget must be one of"):
            s.derive(source, head_budget="per-head")
        with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
            s.derive(source, head_budget="adaptive", alpha=1.5)
        derived = s.derive(source, head_budget="adaptive", alpha=0.3)
        assert any(getattr(layer, "ragged", None) is not None for layer in derived.layers)
        assert all(getattr(layer, "ragged", None) is None for layer in source.layers)
        assert s.head_budget == "uniform"  # derive() leaves the session's own setting alone
        tokens = [int(logits.argmax(-1))]
        for step in range(3):
            pos = torch.tensor([[ids.shape[1] + step]])
            out = model(input_ids=torch.tensor([[tokens[-1]]]), position_ids=pos, **s.cache_kwargs(derived))
            tokens.append(int(out.logits[0, -1].argmax()))
    assert tokens == direct.sequences[0, -4:].tolist()
