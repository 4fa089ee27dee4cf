"""SnapKVSession as a user meets it: batches, scoping, errors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

from snapkv import SnapKVCache, SnapKVConfig, SnapKVSession
from snapkv.cache.compressed import CompressedLayer
from snapkv.integration.hf import cache_argument, decode_mask, key_valid_from_mask
from snapkv.methods import H2O, RandomSelect, SnapKV, StreamingLLM
from tiny_models import greedy_generate, left_padded, tiny_model

pytestmark = pytest.mark.usefixtures("no_grad", "one_thread")


def _snapkv_keys() -> list[str]:
    return [
        k
        for mapping in (AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping)
        for k in mapping
        if "snapkv" in k
    ]


_generate = greedy_generate


# -- batches ---------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])
@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_left_padded_batch_equals_rows_alone(family, impl, pooling):
    """A compressed batch of different lengths decodes each row as if it ran alone."""
    lengths = [44, 35, 26, 14, 5]  # the last rows fit the budget; the last is shorter than the window
    ids, mask = left_padded(lengths, seed=5)
    cfg = SnapKVConfig(budget=20, window=6, kernel=5, pooling=pooling)
    steps = 5
    model = tiny_model(family, impl)
    with SnapKVSession(model, cfg) as session:
        cache = session.new_cache()
        batch = _generate(model, ids, mask, steps, **session.cache_kwargs(cache))
        full = [i for i, layer in enumerate(cache.layers) if not layer.is_sliding]
        assert cache.compressed_layers() == full and full
        for i in full:  # each row keeps min(length, budget) prompt tokens plus the generated ones
            kept = cache.layers[i].slot_valid().sum(-1)
            assert kept.tolist() == [min(n, cfg.budget) + steps - 1 for n in lengths]
        batch_logits = torch.stack(batch.logits, 1)  # [B, steps, V]
        for row, n in enumerate(lengths):
            alone_ids, alone_mask = ids[row : row + 1, -n:], mask[row : row + 1, -n:]
            alone = _generate(model, alone_ids, alone_mask, steps, **session.cache_kwargs(session.new_cache()))
            assert torch.equal(alone.sequences[0, n:], batch.sequences[row, ids.shape[1] :]), f"row {row}"
            torch.testing.assert_close(torch.stack(alone.logits, 1)[0], batch_logits[row], rtol=1e-5, atol=5e-5)


def test_fraction_budget_keeps_a_share_of_each_row():
    model = tiny_model("llama")
    lengths = [40, 30]
    ids, mask = left_padded(lengths, seed=6)
    with SnapKVSession(model, SnapKVConfig(budget=0.5, window=4)) as session:
        cache = session.new_cache()
        model(input_ids=ids, attention_mask=mask, **session.cache_kwargs(cache))
        for layer in cache.layers:
            assert layer.slot_valid().sum(-1).tolist() == [math.ceil(0.5 * n) for n in lengths]
        assert [s.kept_tokens for s in session.stats] == [[20, 15]] * 2
        assert [s.prompt_tokens for s in session.stats] == [lengths] * 2
        assert all(s.bytes_after < s.bytes_before for s in session.stats)


@pytest.mark.parametrize(
    "method", [StreamingLLM(sinks=2), RandomSelect(seed=3), H2O(chunk_size=7)], ids=lambda m: m.name
)
def test_other_methods_through_the_session(method):
    model = tiny_model("qwen2")
    lengths = [33, 24]
    ids, mask = left_padded(lengths, seed=11)
    with SnapKVSession(model, SnapKVConfig(budget=16, window=4), method=method) as session:
        cache = session.new_cache()
        gen = _generate(model, ids, mask, 3, **session.cache_kwargs(cache))
    assert gen.sequences.shape == (2, 36)
    for layer in cache.layers:
        assert layer.slot_valid().sum(-1).tolist() == [16 + 2, 16 + 2]
        pos = layer.positions.long()
        assert pos[:, :, -4:].tolist() == [[list(range(29, 33))] * 2] * 2  # the window, whole
        assert (pos[1] >= 9).all()  # row 1's padding is never kept
    if isinstance(method, StreamingLLM):
        assert cache.layers[0].positions[:, 0, :2].tolist() == [[0, 1], [9, 10]]


def test_pyramid_profile_through_the_session():
    model = tiny_model("llama")
    ids, mask = left_padded([60], seed=12)
    with SnapKVSession(model, SnapKVConfig(budget=24, window=4), layer_profile="pyramid") as session:
        cache = session.new_cache()
        model(input_ids=ids, attention_mask=mask, **session.cache_kwargs(cache))
    kept = [int(layer.slot_valid().sum()) for layer in cache.layers]
    assert kept[0] > 24 > kept[1] > 4
    assert sum(kept) == 2 * 24


def test_cache_kwargs_uses_the_installed_keyword():
    model = tiny_model("llama")
    with SnapKVSession(model, SnapKVConfig(budget=20, window=4)) as session:
        cache = session.new_cache()
        assert session.cache_kwargs(cache) == {cache_argument(model): cache}
        assert isinstance(cache, SnapKVCache)


def test_key_valid_from_mask_formats():
    valid = torch.tensor([[True] * 5, [False, False, True, True, True]])
    assert key_valid_from_mask(None, 2, 5) is None
    assert torch.equal(key_valid_from_mask(valid.long(), 2, 5), valid)
    causal = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    bool4d = causal[None, None] & valid[:, None, None, :]
    assert torch.equal(key_valid_from_mask(bool4d, 2, 5), valid)
    additive = torch.zeros(2, 1, 5, 5).masked_fill(~bool4d, torch.finfo(torch.float32).min)
    assert torch.equal(key_valid_from_mask(additive, 2, 5), valid)
    assert key_valid_from_mask(torch.ones(2, 5), 2, 5) is None  # nothing padded
    with pytest.raises(ValueError, match="covers"):
        key_valid_from_mask(valid.long(), 2, 6)


def test_decode_mask_formats():
    layer = CompressedLayer()
    layer.lazy_initialization(torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1, 4))
    keys = torch.randn(2, 1, 6, 4)  # 4 kept slots (row 1: 1 filler) + 2 appended
    layer.replace(keys, keys.clone(), torch.tensor([0, 1]), torch.zeros(2, 1, 4, dtype=torch.int32))
    valid = torch.tensor([[True] * 6, [False] + [True] * 5])
    assert torch.equal(decode_mask(layer, 2, "2d", torch.float32), valid.long())
    b = decode_mask(layer, 2, "bool", torch.float32)
    assert b.shape == (2, 1, 2, 6)
    assert torch.equal(b[:, 0, 1], valid)  # the last query sees every valid slot
    assert torch.equal(b[:, 0, 0], valid & (torch.arange(6) < 5))  # the first not the last slot
    a = decode_mask(layer, 2, "additive", torch.float16)
    assert a.dtype == torch.float16 and torch.equal(a == 0, b)


# -- no global state left behind ----------------------------------------------------------------


def test_session_leaves_no_global_state():
    model = tiny_model("gemma3")
    ids, mask = left_padded([30, 21], seed=7)
    before_keys = _snapkv_keys()
    attn_before = dict(AttentionInterface._global_mapping)
    mask_before = dict(AttentionMaskInterface._global_mapping)
    ref = model(input_ids=ids, attention_mask=mask).logits
    with SnapKVSession(model, SnapKVConfig(budget=12, window=4)) as session:
        assert model.config._attn_implementation != "sdpa"
        assert len(_snapkv_keys()) == len(before_keys) + 2
        cache = session.new_cache()
        inside = model(input_ids=ids, attention_mask=mask, **session.cache_kwargs(cache)).logits
        torch.testing.assert_close(inside, ref, rtol=0, atol=1e-6)  # the prefill sees the full prompt
    assert _snapkv_keys() == before_keys == []
    assert dict(AttentionInterface._global_mapping) == attn_before
    assert dict(AttentionMaskInterface._global_mapping) == mask_before
    assert model.config._attn_implementation == "sdpa"
    after = model(input_ids=ids, attention_mask=mask)
    assert torch.equal(after.logits, ref)
    assert type(after.past_key_values) is DynamicCache
    # decoding outside the session after a compressed run is the plain model again
    gen_after = _generate(model, ids, mask, 3)
    gen_fresh = _generate(tiny_model("gemma3"), ids, mask, 3)
    assert torch.equal(gen_after.sequences, gen_fresh.sequences)


def test_exception_inside_session_restores():
    model = tiny_model("llama", "eager")
    ids, mask = left_padded([25], seed=8)
    ref = model(input_ids=ids, attention_mask=mask).logits
    with pytest.raises(KeyError, match="boom"):
        with SnapKVSession(model, SnapKVConfig(budget=10, window=4)) as session:
            model(input_ids=ids, attention_mask=mask, **session.cache_kwargs(session.new_cache()))
            raise KeyError("boom")
    assert _snapkv_keys() == []
    assert model.config._attn_implementation == "eager"
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)


def test_sessions_can_be_reentered_and_stacked_in_sequence():
    model = tiny_model("qwen3")
    ids, mask = left_padded([30], seed=9)
    outs = []
    for _ in range(2):
        with SnapKVSession(model, SnapKVConfig(budget=12, window=4)) as session:
            outs.append(_generate(model, ids, mask, 4, **session.cache_kwargs(session.new_cache())))
        assert _snapkv_keys() == []
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    torch.testing.assert_close(torch.stack(outs[0].logits), torch.stack(outs[1].logits), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_plain_cache_inside_session_raises(family):
    """Inside a session every forward must use the session's cache: no silent fallback."""
    model = tiny_model(family)
    ids, mask = left_padded([24], seed=10)
    no_cache = "no SnapKV cache"
    with SnapKVSession(model, SnapKVConfig(budget=12, window=4)) as session:
        with pytest.raises(RuntimeError, match=no_cache):
            model(input_ids=ids, attention_mask=mask, **{cache_argument(model): DynamicCache(config=model.config)})
        with pytest.raises(RuntimeError, match=no_cache):
            model(input_ids=ids, attention_mask=mask)  # the model builds its own DynamicCache
        with pytest.raises(RuntimeError, match=no_cache):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        with pytest.raises(RuntimeError, match=no_cache):
            _generate(model, ids, mask, 2)
        # a compressed session cache exists, but these forwards do not use it
        used = session.new_cache()
        _generate(model, ids, mask, 2, **session.cache_kwargs(used))
        assert used.compressed_layers()
        with pytest.raises(RuntimeError, match=no_cache):
            model(input_ids=ids, attention_mask=mask, **{cache_argument(model): DynamicCache(config=model.config)})
        with pytest.raises(RuntimeError, match=no_cache):
            _generate(model, ids, mask, 2)
        session.new_cache()  # a fresh session cache, not passed
        with pytest.raises(RuntimeError, match=no_cache):
            model(input_ids=ids, attention_mask=mask, **{cache_argument(model): DynamicCache(config=model.config)})
    assert _snapkv_keys() == []


def test_new_cache_outside_session_raises():
    session = SnapKVSession(tiny_model("llama"), SnapKVConfig(budget=12, window=4))
    with pytest.raises(RuntimeError, match="inside"):
        session.new_cache()


# -- unsupported models -----------------------------------------------------------------------


def test_unsupported_attention_implementation_raises():
    model = tiny_model("llama")
    name = "snapkv_test_unsupported"
    AttentionInterface.register(name, AttentionInterface._global_mapping["sdpa"])
    AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping["sdpa"])
    try:
        model.set_attn_implementation(name)
        with pytest.raises(ValueError, match="attention implementation"):
            SnapKVSession(model, SnapKVConfig(budget=12, window=4))
    finally:
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)
    assert model.config._attn_implementation == name  # construction changed nothing


def test_flex_attention_model_raises():
    try:
        model = tiny_model("llama", "flex_attention")
    except (ImportError, ValueError, RuntimeError) as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"flex_attention not constructible here: {exc}")
    with pytest.raises(ValueError, match="flex_attention"):
        SnapKVSession(model, SnapKVConfig(budget=12, window=4))
    assert _snapkv_keys() == []


def test_bad_layer_profile_raises():
    with pytest.raises(ValueError, match="layer_profile"):
        SnapKVSession(tiny_model("llama"), SnapKVConfig(budget=12, window=4), layer_profile="flat")


# -- cache life cycle: beams, crop, snapshots, capture ---------------------------------------------


def _decode(model, cache, tokens, mask):
    """Teacher-forced one-token forwards after a prefill; ``[B, steps, V]`` logits."""
    out = []
    for t in range(tokens.shape[1]):
        mask = torch.cat([mask, torch.ones_like(tokens[:, :1])], dim=1)
        out.append(model(input_ids=tokens[:, t : t + 1], attention_mask=mask, **{cache_argument(model): cache}).logits)
    return torch.cat(out, 1)


def _compressed(model, cfg, ids, mask, tokens, method=None):
    """Decode logits of ``tokens`` after a compressed prefill, in a fresh session."""
    with SnapKVSession(model, cfg, method=method) as session:
        cache = session.new_cache()
        model(input_ids=ids, attention_mask=mask, **session.cache_kwargs(cache))
        return _decode(model, cache, tokens, mask)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_beam_search_batch_equals_rows_alone(family):
    """Beam search reorders the cache rows: kept positions and filler must follow them."""
    model = tiny_model(family)
    lengths = [40, 31, 12]
    ids, mask = left_padded(lengths, seed=13)
    with SnapKVSession(model, SnapKVConfig(budget=20, window=6, kernel=5)) as session:
        cache = session.new_cache()
        batch = _generate(model, ids, mask, 5, num_beams=3, **session.cache_kwargs(cache))
        assert cache.compressed_layers()
        for row, n in enumerate(lengths):
            alone = _generate(
                model, ids[row : row + 1, -n:], mask[row : row + 1, -n:], 5, num_beams=3,
                **session.cache_kwargs(session.new_cache()),
            )
            assert torch.equal(alone.sequences[0, n:], batch.sequences[row, ids.shape[1] :]), f"row {row}"


def test_crop_removes_appended_tokens():
    model = tiny_model("llama")
    ids, mask = left_padded([40, 31], seed=14)
    tokens = torch.randint(3, 256, (2, 4))
    cfg = SnapKVConfig(budget=20, window=6)
    full = _compressed(model, cfg, ids, mask, tokens)
    with SnapKVSession(model, cfg) as session:
        cache = session.new_cache()
        model(input_ids=ids, attention_mask=mask, **session.cache_kwargs(cache))
        _decode(model, cache, tokens, mask)
        cache.crop(-2)
        assert cache.get_seq_length() == 40 + 2
        assert [layer.physical_length for layer in cache.layers] == [20 + 2] * 2
        redo = _decode(model, cache, tokens[:, 2:], torch.cat([mask, torch.ones(2, 2, dtype=mask.dtype)], 1))
    torch.testing.assert_close(redo, full[:, 2:], rtol=0, atol=1e-6)


def test_crop_legacy_positive_length():
    model = tiny_model("llama")
    ids, mask = left_padded([40], seed=14)
    with SnapKVSession(model, SnapKVConfig(budget=20, window=6)) as session:
        cache = session.new_cache()
        model(input_ids=ids, attention_mask=mask, **session.cache_kwargs(cache))
        _decode(model, cache, torch.randint(3, 256, (1, 4)), mask)
        try:
            cache.crop(42)  # legacy form: keep the first 42 (logical) tokens
        except ValueError:
            pytest.skip("this transformers accepts only negative crop counts")
        assert cache.get_seq_length() == 42
        assert [layer.physical_length for layer in cache.layers] == [22, 22]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_snapshot_restore_answers_several_questions(family):
    model = tiny_model(family)
    ids, mask = left_padded([40, 31], seed=15)
    q1, q2 = torch.randint(3, 256, (2, 3)), torch.randint(3, 256, (2, 3))
    cfg = SnapKVConfig(budget=20, window=6)
    want1, want2 = _compressed(model, cfg, ids, mask, q1), _compressed(model, cfg, ids, mask, q2)
    with SnapKVSession(model, cfg) as session:
        cache = session.new_cache()
        model(input_ids=ids, attention_mask=mask, **session.cache_kwargs(cache))
        snap = cache.snapshot()
        got1 = _decode(model, cache, q1, mask)
        cache.restore(snap)
        got2 = _decode(model, cache, q2, mask)
        cache.restore(snap)
        again1 = _decode(model, cache, q1, mask)
    torch.testing.assert_close(got1, want1, rtol=0, atol=1e-6)
    torch.testing.assert_close(got2, want2, rtol=0, atol=1e-6)
    torch.testing.assert_close(again1, want1, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_capture_then_derive_equals_direct_compression(family):
    model = tiny_model(family)
    ids, mask = left_padded([40, 31], seed=16)
    tokens = torch.randint(3, 256, (2, 3))
    cfg_a = SnapKVConfig(budget=20, window=6, kernel=5)
    cfg_b = SnapKVConfig(budget=12, window=4, kernel=5)  # same scoring, other budget and window
    plain = model(input_ids=ids, attention_mask=mask).logits
    with SnapKVSession(model, cfg_a, capture=True) as session:
        source = session.new_cache()
        prefill = model(input_ids=ids, attention_mask=mask, **session.cache_kwargs(source)).logits
        torch.testing.assert_close(prefill, plain, rtol=0, atol=1e-6)
        assert source.compressed_layers() == []
        derived = {
            "a": _decode(model, session.derive(source), tokens, mask),
            "b": _decode(model, session.derive(source, config=cfg_b), tokens, mask),
            "streaming": _decode(model, session.derive(source, method=StreamingLLM()), tokens, mask),
            "a again": _decode(model, session.derive(source), tokens, mask),
        }
    want = {
        "a": _compressed(model, cfg_a, ids, mask, tokens),
        "b": _compressed(model, cfg_b, ids, mask, tokens),
        "streaming": _compressed(model, cfg_a, ids, mask, tokens, method=StreamingLLM()),
    }
    want["a again"] = want["a"]
    for name, got in derived.items():
        torch.testing.assert_close(got, want[name], rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert not torch.allclose(want["a"], want["b"], atol=1e-4)


def test_derive_with_a_config_uses_its_scoring_settings():
    model = tiny_model("llama")
    ids, mask = left_padded([40, 31], seed=17)
    tokens = torch.randint(3, 256, (2, 3))
    cfg_a = SnapKVConfig(budget=20, window=6, kernel=5, pooling="max")
    cfg_b = SnapKVConfig(budget=20, window=6, kernel=3, pooling="avg", gqa_reduce="max")
    with SnapKVSession(model, cfg_a, capture=True) as session:
        source = session.new_cache()
        model(input_ids=ids, attention_mask=mask, **session.cache_kwargs(source))
        got = _decode(model, session.derive(source, config=cfg_b), tokens, mask)
    torch.testing.assert_close(got, _compressed(model, cfg_b, ids, mask, tokens), rtol=0, atol=1e-6)


def test_derive_scores_each_layer_once_per_method(monkeypatch):
    model = tiny_model("llama")
    ids, mask = left_padded([40, 31], seed=18)
    calls = []
    original = SnapKV.score
    monkeypatch.setattr(SnapKV, "score", lambda self, inputs: calls.append(inputs.layer_idx) or original(self, inputs))
    with SnapKVSession(model, SnapKVConfig(budget=20, window=6), capture=True) as session:
        source = session.new_cache()
        model(input_ids=ids, attention_mask=mask, **session.cache_kwargs(source))
        for budget in (10, 20, 30):  # other budgets reuse the scores; an equal method config too
            session.derive(source, config=SnapKVConfig(budget=budget, window=6))
        assert sorted(calls) == [0, 1]
        session.derive(source, config=SnapKVConfig(budget=20, window=6, kernel=3))  # other scoring
        session.derive(source, config=SnapKVConfig(budget=20, window=4))  # other window
        assert len(calls) == 6
        source = session.new_cache()  # a new capture scores afresh
        model(input_ids=ids, attention_mask=mask, **session.cache_kwargs(source))
        session.derive(source, config=SnapKVConfig(budget=10, window=6))
    assert len(calls) == 8


def test_derive_prefix_equals_a_capture_of_the_prefix():
    model = tiny_model("llama")
    ids, mask = left_padded([40, 31], seed=19)
    n, cfg = 30, SnapKVConfig(budget=14, window=6)
    tokens = torch.randint(3, 256, (2, 3))
    with SnapKVSession(model, cfg, capture=True) as session:
        source = session.new_cache()
        model(input_ids=ids, attention_mask=mask, **session.cache_kwargs(source))
        got = _decode(model, session.derive(source, prefix=n), tokens, mask[:, :n])
        with pytest.raises(ValueError, match=r"prefix must be an integer in \(6, 40\]"):
            session.derive(source, prefix=41)
        with pytest.raises(ValueError, match="no real token"):
            session.derive(source, prefix=8)  # row 1 has 9 pad tokens in front
    want = _compressed(model, cfg, ids[:, :n], mask[:, :n], tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # a 30- vs 40-token prefill: rounding only


def test_derive_prefix_refuses_sliding_layers():
    model = tiny_model("gemma3")
    ids, mask = left_padded([40], seed=20)
    with SnapKVSession(model, SnapKVConfig(budget=14, window=6), capture=True) as session:
        source = session.new_cache()
        model(input_ids=ids, attention_mask=mask, **session.cache_kwargs(source))
        with pytest.raises(ValueError, match="sliding-window layers"):
            session.derive(source, prefix=30)


def test_drop_tail_forgets_the_last_prompt_tokens():
    model = tiny_model("llama")
    ids, mask = left_padded([40, 31], seed=21)
    with SnapKVSession(model, SnapKVConfig(budget=14, window=6)) as session:
        cache = session.new_cache()
        model(input_ids=ids, attention_mask=mask, **session.cache_kwargs(cache))
        snap = cache.snapshot()
        layer = cache.layers[0]
        keys = layer.keys
        with pytest.raises(ValueError, match=r"n must be an integer in \[1, 14\]"):
            layer.drop_tail(15)
        if not bool((layer.positions[:, :, -7] == 33).all()):  # position 33 is outside the window
            with pytest.raises(ValueError, match="not the prompt's last 7 positions"):
                layer.drop_tail(7)
        layer.positions = layer.positions.clone()
        layer.positions[0, 0, -6] = 0  # as if the window had not been kept
        with pytest.raises(ValueError, match="not the prompt's last 6 positions"):
            layer.drop_tail(6)
        cache.restore(snap)
        layer.drop_tail(4)
        assert layer.seen == 36 and layer.physical_length == 10
        torch.testing.assert_close(layer.keys, keys[:, :, :10])
        assert int(layer.positions.max()) == 35
        cache.restore(snap)
        _decode(model, cache, torch.randint(3, 256, (2, 1)), mask)  # one token appended
        with pytest.raises(RuntimeError, match="nothing appended"):
            cache.layers[0].drop_tail(2)


def test_two_caches_of_one_session_alternate_and_keep_their_own_stats():
    model = tiny_model("llama")
    (a_ids, a_mask), (b_ids, b_mask) = left_padded([50], seed=22), left_padded([44], seed=23)
    tokens = torch.randint(3, 256, (1, 3))
    cfg = SnapKVConfig(budget=16, window=4)
    want_a = _compressed(model, cfg, a_ids, a_mask, tokens)
    want_b = _compressed(model, cfg, b_ids, b_mask, tokens)
    with SnapKVSession(model, cfg) as session:
        a, b = session.new_cache(), session.new_cache()
        model(input_ids=a_ids, attention_mask=a_mask, **session.cache_kwargs(a))
        model(input_ids=b_ids, attention_mask=b_mask, **session.cache_kwargs(b))
        got_a, got_b = [], []
        for t in range(3):  # one token each, in turn
            a_mask = torch.cat([a_mask, torch.ones(1, 1, dtype=a_mask.dtype)], 1)
            got_a.append(model(input_ids=tokens[:, t : t + 1], attention_mask=a_mask, **session.cache_kwargs(a)).logits)
            b_mask = torch.cat([b_mask, torch.ones(1, 1, dtype=b_mask.dtype)], 1)
            got_b.append(model(input_ids=tokens[:, t : t + 1], attention_mask=b_mask, **session.cache_kwargs(b)).logits)
        assert [s.prompt_tokens for s in a.stats] == [[50]] * 2 and [s.prompt_tokens for s in b.stats] == [[44]] * 2
        assert session.stats is b.stats  # the session reports its latest cache's
    torch.testing.assert_close(torch.cat(got_a, 1), want_a, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat(got_b, 1), want_b, rtol=0, atol=0)
