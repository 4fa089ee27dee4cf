"""SnapKVCache on its own: per-cache state, many caches, sessions and threads on one model (issue 10)."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch
import transformers as tf
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import snapkv
from snapkv import (
    H2O,
    AdaptiveHeads,
    PyramidBudgets,
    SnapKV,
    SnapKVCache,
    SnapKVConfig,
    SnapKVSession,
)
from snapkv.integration.hf import cache_argument, enabled_models
from tiny_models import greedy_generate, left_padded, tiny_model

pytestmark = pytest.mark.usefixtures("no_grad", "one_thread")


def _snapkv_keys() -> list[str]:
    return [k for m in (AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping)
            for k in m if "snapkv" in k]


def _assert_no_state(model: torch.nn.Module, impl: str = "sdpa") -> None:
    assert _snapkv_keys() == []
    assert enabled_models() == []
    assert model.config._attn_implementation == impl
    assert all(m.config._attn_implementation == impl for m in model.modules() if hasattr(m, "layer_idx"))


def _kw(model, cache):
    return {cache_argument(model): cache}


def _run(model, cache, ids, mask, tokens):
    """Prefill then teacher-forced decode of ``tokens``: ``[B, 1 + steps, V]`` logits."""
    out = [model(input_ids=ids, attention_mask=mask, **_kw(model, cache)).logits[:, -1:]]
    for t in range(tokens.shape[1]):
        mask = torch.cat([mask, torch.ones_like(tokens[:, :1])], dim=1)
        out.append(model(input_ids=tokens[:, t : t + 1], attention_mask=mask, **_kw(model, cache)).logits)
    return torch.cat(out, 1)


def _alone(model, config, ids, mask, tokens, method=None):
    with SnapKVCache(model, config, method) as cache:
        return _run(model, cache, ids, mask, tokens)


# -- a cache that works on its own ----------------------------------------------------------------


def test_cache_alone_equals_a_session_and_leaves_no_state():
    model = tiny_model("llama")
    ids, mask = left_padded([44, 30], seed=1)
    cfg = SnapKVConfig(budget=16, window=4)
    with SnapKVSession(model, cfg) as s:
        want = greedy_generate(model, ids, mask, 4, **s.cache_kwargs(s.new_cache()))
    _assert_no_state(model)
    cache = SnapKVCache(model, cfg)
    assert enabled_models() == [model] and model.config._attn_implementation.startswith("snapkv_")
    got = greedy_generate(model, ids, mask, 4, past_key_values=cache)  # the transformers spelling
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=0, atol=0)
    assert cache.compressed_layers() == [0, 1] and [s.kept_tokens for s in cache.stats] == [[16, 16]] * 2
    cache.close()
    _assert_no_state(model)
    with pytest.raises(RuntimeError, match="closed"):
        model(input_ids=ids, attention_mask=mask, **_kw(model, cache))
    cache.close()  # idempotent
    _assert_no_state(model)


def test_cache_released_by_with_and_by_garbage_collection():
    model = tiny_model("qwen2", "eager")
    ids, mask = left_padded([30], seed=2)
    with SnapKVCache(model, SnapKVConfig(budget=12, window=4)) as cache:
        model(input_ids=ids, attention_mask=mask, **_kw(model, cache))
    _assert_no_state(model, "eager")
    caches = [SnapKVCache(model, SnapKVConfig(budget=12, window=4)) for _ in range(3)]
    out = greedy_generate(model, ids, mask, 2, **_kw(model, caches[0]))
    assert len(enabled_models()) == 1  # one function per model, however many caches
    probe = weakref.ref(caches[0])
    del caches, out
    gc.collect()
    assert probe() is None
    _assert_no_state(model, "eager")


def test_plain_forwards_pass_through_while_a_cache_exists_but_not_in_a_session():
    model = tiny_model("gemma3")
    ids, mask = left_padded([30, 21], seed=3)
    ref = model(input_ids=ids, attention_mask=mask).logits
    with SnapKVCache(model, SnapKVConfig(budget=12, window=4)):
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
        with SnapKVSession(model, SnapKVConfig(budget=12, window=4)):
            with pytest.raises(RuntimeError, match="no SnapKV cache"):
                model(input_ids=ids, attention_mask=mask)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
    _assert_no_state(model)


def test_cache_on_a_model_without_snapkv_raises():
    model, other = tiny_model("llama"), tiny_model("llama")
    ids, mask = left_padded([30], seed=4)
    with SnapKVCache(model, SnapKVConfig(budget=12, window=4)) as cache:
        with pytest.raises(RuntimeError, match="another attention function"):
            other(input_ids=ids, attention_mask=mask, **_kw(other, cache))


def test_bad_arguments_raise_before_any_model_change():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="config must be a SnapKVConfig"):
        SnapKVCache(model, {"budget": 12})
    with pytest.raises(ValueError, match="method must be"):
        SnapKVCache(model, SnapKVConfig(budget=12, window=4), method="snapkv")
    with pytest.raises(ValueError, match="alpha"):
        AdaptiveHeads(SnapKV(), alpha=2.0)
    with pytest.raises(ValueError, match="slack"):
        AdaptiveHeads(SnapKV(), slack=0)
    with pytest.raises(ValueError, match="beta"):
        PyramidBudgets(SnapKV(), beta=0)
    with pytest.raises(ValueError, match="method must be"):
        PyramidBudgets("snapkv")
    _assert_no_state(model)


# -- item 1: a model whose attention cannot be switched ----------------------------------------------


@pytest.mark.parametrize("how", ["legacy_class", "noop_switch"])
def test_model_that_ignores_set_attn_implementation_raises(monkeypatch, how):
    """transformers only logs a warning when a (legacy, remote-code) model cannot switch: SnapKV raises."""
    model = tiny_model("llama")
    if how == "legacy_class":
        monkeypatch.setattr(tf.LlamaForCausalLM, "_can_set_attn_implementation", classmethod(lambda cls: False))
    else:
        monkeypatch.setattr(model, "set_attn_implementation", lambda *args, **kwargs: None)
    with pytest.raises(ValueError, match="did not switch"):
        SnapKVCache(model, SnapKVConfig(budget=12, window=4))
    with pytest.raises(ValueError, match="did not switch"):
        SnapKVSession(model, SnapKVConfig(budget=12, window=4)).__enter__()
    _assert_no_state(model)


# -- item 2: caches, sessions and threads interleave on one model -----------------------------------


def test_two_interleaved_conversations_equal_each_alone():
    model = tiny_model("llama")
    (a_ids, a_mask), (b_ids, b_mask) = left_padded([50, 41], seed=5), left_padded([38], seed=6)
    a_cfg, b_cfg = SnapKVConfig(budget=16, window=4), SnapKVConfig(budget=0.5, window=6, kernel=3)
    a_tok, b_tok = torch.randint(3, 256, (2, 4)), torch.randint(3, 256, (1, 4))
    want_a = _alone(model, a_cfg, a_ids, a_mask, a_tok)
    want_b = _alone(model, b_cfg, b_ids, b_mask, b_tok, method=PyramidBudgets(SnapKV(kernel=3)))
    a = SnapKVCache(model, a_cfg)
    b = SnapKVCache(model, b_cfg, method=PyramidBudgets(SnapKV(kernel=3)))
    got_a = [model(input_ids=a_ids, attention_mask=a_mask, **_kw(model, a)).logits[:, -1:]]
    got_b = [model(input_ids=b_ids, attention_mask=b_mask, **_kw(model, b)).logits[:, -1:]]
    for t in range(4):  # alternate one token each
        a_mask = torch.cat([a_mask, torch.ones(2, 1, dtype=a_mask.dtype)], 1)
        got_a.append(model(input_ids=a_tok[:, t : t + 1], attention_mask=a_mask, **_kw(model, a)).logits)
        b_mask = torch.cat([b_mask, torch.ones(1, 1, dtype=b_mask.dtype)], 1)
        got_b.append(model(input_ids=b_tok[:, t : t + 1], attention_mask=b_mask, **_kw(model, b)).logits)
    torch.testing.assert_close(torch.cat(got_a, 1), want_a, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(got_b, 1), want_b, rtol=0, atol=0)
    assert [s.kept_tokens for s in a.stats] == [[16, 16]] * 2  # each cache keeps its own statistics
    assert [s.kept_tokens[0] for s in b.stats] == [32, 6]  # pyramid over 19 kept tokens, window 6
    a.close(), b.close()
    _assert_no_state(model)


def test_sessions_entered_and_left_out_of_order():
    model = tiny_model("llama")
    ids, mask = left_padded([60], seed=7)
    tokens = torch.randint(3, 256, (1, 3))
    cfgs = [SnapKVConfig(budget=b, window=4) for b in (12, 16, 20)]
    want = [_alone(model, c, ids, mask, tokens) for c in cfgs]
    s1, s2 = SnapKVSession(model, cfgs[0]).__enter__(), SnapKVSession(model, cfgs[1]).__enter__()
    c1 = s1.new_cache()
    model(input_ids=ids, attention_mask=mask, **_kw(model, c1))
    s1.__exit__(None, None, None)  # the first one leaves first: the second keeps compressing
    with pytest.raises(RuntimeError, match="closed"):
        model(input_ids=tokens[:, :1], **_kw(model, c1))
    torch.testing.assert_close(_run(model, s2.new_cache(), ids, mask, tokens), want[1], rtol=0, atol=0)
    s3 = SnapKVSession(model, cfgs[2]).__enter__()
    s2.__exit__(None, None, None)
    torch.testing.assert_close(_run(model, s3.new_cache(), ids, mask, tokens), want[2], rtol=0, atol=0)
    assert s3.stats[0].kept_tokens == [20]
    s3.__exit__(None, None, None)
    _assert_no_state(model)


def test_eight_threads_on_one_model_each_equal_to_its_run_alone():
    model = tiny_model("llama")
    jobs = [(left_padded([40 + 3 * i, 25 + i], seed=20 + i), SnapKVConfig(budget=10 + 2 * i, window=4))
            for i in range(8)]
    alone = []
    for (ids, mask), cfg in jobs:
        with SnapKVCache(model, cfg) as cache:
            alone.append(greedy_generate(model, ids, mask, 4, **_kw(model, cache)))
    barrier, results, errors = threading.Barrier(8), [None] * 8, []

    def work(i: int) -> None:
        try:
            (ids, mask), cfg = jobs[i]
            if i % 2:  # half the threads use their own cache, half a session of their own
                with torch.no_grad(), SnapKVCache(model, cfg) as cache:
                    barrier.wait()
                    results[i] = greedy_generate(model, ids, mask, 4, **_kw(model, cache))
            else:
                with torch.no_grad(), SnapKVSession(model, cfg) as session:
                    barrier.wait()
                    results[i] = greedy_generate(model, ids, mask, 4, **session.cache_kwargs(session.new_cache()))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, (got, want) in enumerate(zip(results, alone, strict=True)):
        assert torch.equal(got.sequences, want.sequences), f"thread {i}"
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), rtol=0, atol=0)
    _assert_no_state(model)


# -- wrappers replace the string flags ----------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_wrappers_equal_the_deprecated_flags(family):
    model = tiny_model(family)
    ids, mask = left_padded([70, 52], seed=8)
    tokens = torch.randint(3, 256, (2, 3))
    cfg = SnapKVConfig(budget=20, window=4, kernel=5)
    for flags, method in (({"layer_profile": "pyramid"}, PyramidBudgets(SnapKV(kernel=5))),
                          ({"head_budget": "adaptive", "alpha": 0.3, "slack": 8},
                           AdaptiveHeads(SnapKV(kernel=5), alpha=0.3, slack=8))):
        with pytest.warns(DeprecationWarning, match="deprecated"):
            session = SnapKVSession(model, cfg, **flags)
        with session:
            want = _run(model, session.new_cache(), ids, mask, tokens)
        torch.testing.assert_close(_alone(model, cfg, ids, mask, tokens, method), want, rtol=0, atol=0)
    both = PyramidBudgets(AdaptiveHeads(SnapKV(kernel=5), slack=8))
    swapped = AdaptiveHeads(PyramidBudgets(SnapKV(kernel=5)), slack=8)
    torch.testing.assert_close(_alone(model, cfg, ids, mask, tokens, both),
                               _alone(model, cfg, ids, mask, tokens, swapped), rtol=0, atol=0)


def test_legacy_cache_constructor_warns_and_refuses_to_run_unbound():
    model = tiny_model("llama")
    with pytest.warns(DeprecationWarning, match=r"SnapKVCache\(config=model.config\)"):
        cache = SnapKVCache(config=model.config)
    ids, mask = left_padded([30], seed=9)
    with SnapKVSession(model, SnapKVConfig(budget=12, window=4)) as s:
        with pytest.raises(RuntimeError, match="has no model"):
            model(input_ids=ids, attention_mask=mask, **s.cache_kwargs(cache))


def test_public_names():
    for name in snapkv.__all__:
        assert getattr(snapkv, name) is not None
    with pytest.warns(DeprecationWarning, match="deprecated"):  # moved names still import, with a warning
        from snapkv.integration.hf import LayerStats
        from snapkv.integration.hf import SnapKVSession as Legacy

    assert Legacy is SnapKVSession and LayerStats is snapkv.LayerStats


# -- item 4: right-padded batches ---------------------------------------------------------------------


@pytest.mark.parametrize("impl, method", [("sdpa", None), ("eager", None), ("sdpa", "adaptive"), ("sdpa", "h2o")])
def test_right_padded_batch_equals_rows_alone(impl, method):
    """The window is each row's last real tokens: a right-padded row keeps what it keeps alone."""
    model = tiny_model("llama", impl)
    method = {None: None, "adaptive": AdaptiveHeads(SnapKV(), alpha=0.5, slack=4), "h2o": H2O()}[method]
    lengths = [60, 40, 33]
    gen = torch.Generator().manual_seed(10)
    ids = torch.randint(3, 256, (3, 60), generator=gen)
    mask = torch.ones_like(ids)
    for row, n in enumerate(lengths):
        ids[row, n:], mask[row, n:] = 0, 0
    cfg = SnapKVConfig(budget=16, window=4)
    tokens = torch.randint(3, 256, (3, 3))
    with SnapKVCache(model, cfg, method) as cache:
        logits = model(input_ids=ids, attention_mask=mask, **_kw(model, cache)).logits
        steps = []
        for t in range(3):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
            pos = torch.tensor(lengths)[:, None] + t
            steps.append(model(input_ids=tokens[:, t : t + 1], attention_mask=mask, position_ids=pos,
                               **_kw(model, cache)).logits)
        positions = [layer.positions for layer in cache.layers]
    for row, n in enumerate(lengths):
        with SnapKVCache(model, cfg, method) as alone:
            want = _run(model, alone, ids[row : row + 1, :n], torch.ones(1, n, dtype=torch.long), tokens[row : row + 1])
            for layer, pos in zip(alone.layers, positions, strict=True):
                if pos is not None:  # dense layers record the kept positions (ragged ones do not)
                    assert torch.equal(pos[row], layer.positions[0]), f"row {row}"
        got = torch.cat([logits[row : row + 1, n - 1 : n]] + [s[row : row + 1] for s in steps], 1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, row=row: f"row {row}: {m}")


# -- item 6: crop -------------------------------------------------------------------------------------


def test_crop_past_the_appended_tokens_raises_and_changes_nothing():
    model = tiny_model("llama")
    ids, mask = left_padded([60], seed=11)
    with SnapKVCache(model, SnapKVConfig(budget=16, window=4)) as cache:
        model(input_ids=ids, attention_mask=mask, **_kw(model, cache))
        model(input_ids=torch.tensor([[5, 6]]), **_kw(model, cache))
        before = [(layer.seen, layer.physical_length) for layer in cache.layers]
        assert before == [(62, 18)] * 2
        with pytest.raises(ValueError, match="at most the 2 tokens appended"):
            cache.crop(-10)
        assert [(layer.seen, layer.physical_length) for layer in cache.layers] == before
        cache.crop(-2)
        assert [(layer.seen, layer.physical_length) for layer in cache.layers] == [(60, 16)] * 2
        assert all(layer.appended == 0 for layer in cache.layers)


# -- item 7: a fractional budget too small for a short row -----------------------------------------------


def test_fraction_too_small_for_a_row_raises_before_any_layer_is_compressed():
    model = tiny_model("llama")
    ids, mask = left_padded([40, 6], seed=12)
    with SnapKVCache(model, SnapKVConfig(budget=0.5, window=4)) as cache:
        with pytest.raises(ValueError, match=r"row 1 \(6 real tokens\).*not above the window"):
            model(input_ids=ids, attention_mask=mask, **_kw(model, cache))
        assert [(layer.seen, layer.compressed) for layer in cache.layers] == [(0, False)] * 2
        assert cache.stats == []
        ids, mask = left_padded([40, 12], seed=12)  # the same cache then serves a batch that fits
        model(input_ids=ids, attention_mask=mask, **_kw(model, cache))
        assert [s.kept_tokens for s in cache.stats] == [[20, 6]] * 2


# -- item 9: captures do not outlive their session or cache ---------------------------------------------


def test_capture_is_dropped_when_the_session_ends_or_the_cache_closes():
    model = tiny_model("llama")
    ids, mask = left_padded([40, 31], seed=13)
    with SnapKVSession(model, SnapKVConfig(budget=16, window=4), capture=True) as s:
        source = s.new_cache()
        model(input_ids=ids, attention_mask=mask, **s.cache_kwargs(source))
        queries = weakref.ref(source.captured[0].inputs.queries)
        derived = s.derive(source, config=SnapKVConfig(budget=12, window=4))
        assert derived.stats[0].kept_tokens == [12, 12]
    gc.collect()
    assert source.captured == {} and queries() is None  # session, source and derived cache still alive
    with pytest.raises(RuntimeError, match="capture=True"):
        source.derive()
    with SnapKVCache(model, SnapKVConfig(budget=16, window=4), capture=True) as source:
        model(input_ids=ids, attention_mask=mask, **_kw(model, source))
        derived = source.derive(AdaptiveHeads(SnapKV(), slack=4))
        assert derived.compressed_layers() == [0, 1] and len(enabled_models()) == 1
        queries = weakref.ref(source.captured[0].inputs.queries)
    gc.collect()
    assert queries() is None
    del derived
    gc.collect()
    _assert_no_state(model)


def test_derive_from_a_right_padded_capture_equals_direct_compression():
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (2, 50), generator=torch.Generator().manual_seed(14))
    mask = torch.ones_like(ids)
    ids[1, 35:], mask[1, 35:] = 0, 0
    tokens = torch.randint(3, 256, (2, 3))
    cfg = SnapKVConfig(budget=14, window=4)

    def decode(cache):
        m, out = mask, []
        for t in range(3):
            m = torch.cat([m, torch.ones(2, 1, dtype=m.dtype)], 1)
            pos = torch.tensor([[50 + t], [35 + t]])
            out.append(model(input_ids=tokens[:, t : t + 1], attention_mask=m, position_ids=pos,
                             **_kw(model, cache)).logits)
        return torch.cat(out, 1)

    with SnapKVCache(model, cfg) as direct:
        model(input_ids=ids, attention_mask=mask, **_kw(model, direct))
        want = decode(direct)
    with SnapKVCache(model, SnapKVConfig(budget=40, window=4), capture=True) as source:
        model(input_ids=ids, attention_mask=mask, **_kw(model, source))
        with pytest.raises(ValueError, match="right-padded"):
            source.derive(prefix=30)
        with source.derive(config=cfg) as derived:
            torch.testing.assert_close(decode(derived), want, rtol=0, atol=0)


# -- item 3: gpt-oss attention sinks in the head-adaptive (ragged) path ---------------------------------


@pytest.mark.parametrize("sink", [0.0, 3.0])
def test_gptoss_sinks_in_the_ragged_path(sink):
    cfg = tf.GptOssConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, sliding_window=16, max_position_embeddings=512,
                          layer_types=["sliding_attention", "full_attention"], initializer_range=0.2, pad_token_id=0)
    torch.manual_seed(0)
    model = tf.GptOssForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    for layer in model.model.layers:
        layer.self_attn.sinks.fill_(sink)
    ids, mask = left_padded([60], seed=15)
    tokens = torch.randint(3, 256, (1, 4))
    config = SnapKVConfig(budget=24, window=4)
    dense = _alone(model, config, ids, mask, tokens)
    ragged = _alone(model, config, ids, mask, tokens, AdaptiveHeads(SnapKV(), alpha=1.0, slack=8))
    torch.testing.assert_close(ragged, dense, rtol=1e-5, atol=1e-5)  # alpha=1 keeps what uniform SnapKV keeps
    _assert_no_state(model, "eager")
