"""The engine (bounded prefill, static cache, captured decode) against transformers' own paths."""

from __future__ import annotations

import pytest
import torch

from snapkv import SnapKVConfig, SnapKVSession
from snapkv.generation import DecodeRunner, Engine, NotEnoughMemoryError, StaticKVCache
from snapkv.generation import memory as mem
from snapkv.generation.adapter import DecoderParts
from snapkv.generation.attention import (
    causal_chunk_attention,
    causal_chunk_attention_ref,
    decode_attention,
    decode_attention_ref,
)
from snapkv.generation.prefill import kept_per_layer
from tiny_models import tiny_model

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
# Average pooling: max pooling makes exact ties between neighbours, which a padded and an
# unpadded prompt may break differently (both are valid SnapKV selections).
CFG = SnapKVConfig(budget=40, window=8, kernel=5, pooling="avg")
STEPS = 5


def _batch(n: int = 100, pad: int = 17, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (2, n), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0  # left padding: row 1 is shorter
    return ids, mask


def _hf(model, ids, mask, config=None, steps=STEPS, profile="uniform"):
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                  output_logits=True, return_dict_in_generate=True)
    if config is None:
        out = model.generate(**kwargs)
    else:
        with SnapKVSession(model, config, layer_profile=profile) as session:
            out = model.generate(**kwargs, **session.cache_kwargs(session.new_cache()))
    return out.sequences[:, ids.shape[1]:], out.logits


def _max_diff(a, b) -> float:
    return max(float((x.cpu() - y.cpu()).abs().max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_matches_session_on_padded_batch(family):
    model = tiny_model(family)
    ids, mask = _batch()
    ref_tokens, ref_logits = _hf(model, ids, mask, CFG)
    out = Engine(model, CFG, prefill_chunk=32).generate(ids, mask, max_new_tokens=STEPS, return_logits=True)
    assert torch.equal(out.tokens, ref_tokens)
    assert _max_diff(out.logits, ref_logits) < 1e-4
    assert out.cache.kept[0] == [40, 40]
    assert out.cache.prompt_lengths == [100, 83]


def test_pyramid_profile_matches_session():
    model = tiny_model("llama")
    ids, mask = _batch(pad=50)
    ref_tokens, ref_logits = _hf(model, ids, mask, CFG, profile="pyramid")
    out = Engine(model, CFG, layer_profile="pyramid", prefill_chunk=16).generate(
        ids, mask, max_new_tokens=STEPS, return_logits=True)
    assert torch.equal(out.tokens, ref_tokens)
    assert _max_diff(out.logits, ref_logits) < 1e-4
    assert out.cache.kept[0] != out.cache.kept[1]  # layers keep different counts, masked filler in front


@pytest.mark.parametrize("config", [None, SnapKVConfig(budget=500, window=8)], ids=["no-config", "budget>prompt"])
def test_uncompressed_equals_model(config):
    model = tiny_model("qwen2")
    ids, mask = _batch()
    ref_tokens, ref_logits = _hf(model, ids, mask)
    out = Engine(model, config, prefill_chunk=24).generate(ids, mask, max_new_tokens=STEPS, return_logits=True)
    assert torch.equal(out.tokens, ref_tokens)
    assert _max_diff(out.logits, ref_logits) < 1e-4


def test_prompt_shorter_than_budget_in_one_row_only():
    model = tiny_model("llama")
    ids, mask = _batch(n=60, pad=30)  # row 0: 60 tokens > 40 kept; row 1: 30 tokens, all kept
    ref_tokens, ref_logits = _hf(model, ids, mask, CFG)
    out = Engine(model, CFG).generate(ids, mask, max_new_tokens=STEPS, return_logits=True)
    assert out.cache.kept[0] == [40, 30]
    assert torch.equal(out.tokens, ref_tokens)
    assert _max_diff(out.logits, ref_logits) < 1e-4


@pytest.mark.parametrize("chunk", [7, 33, 4096])
def test_prefill_chunk_does_not_change_results(chunk):
    model = tiny_model("llama")
    ids, mask = _batch(n=90, pad=0)
    base = Engine(model, CFG, prefill_chunk=90).generate(ids, mask, max_new_tokens=3, return_logits=True)
    out = Engine(model, CFG, prefill_chunk=chunk).generate(ids, mask, max_new_tokens=3, return_logits=True)
    assert torch.equal(out.tokens, base.tokens)
    assert _max_diff(out.logits, base.logits) < 1e-4


def test_whole_layer_attention_equals_query_chunks():
    model = tiny_model("qwen2")
    ids, mask = _batch()
    outs = [Engine(model, CFG, prefill_chunk=16, whole_layer_bytes=b).generate(ids, mask, max_new_tokens=3,
                                                                              return_logits=True)
            for b in (0, 1 << 30)]
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    assert _max_diff(outs[0].logits, outs[1].logits) < 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_fused_decode_step_equals_eager_step(family):
    model = tiny_model(family)
    ids, mask = _batch()
    outs = [Engine(model, CFG, fused=f).generate(ids, mask, max_new_tokens=STEPS, return_logits=True)
            for f in (False, True)]  # fused on CPU: the step's structure with the torch twins
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    assert _max_diff(outs[0].logits, outs[1].logits) < 1e-5


def test_fused_refuses_a_model_it_cannot_run():
    with pytest.raises(ValueError, match="q_norm"):
        Engine(tiny_model("qwen3"), CFG, fused=True).generate(torch.ones(1, 50, dtype=torch.long), max_new_tokens=2)


def test_static_cache_appends_in_place():
    model = tiny_model("llama")
    engine = Engine(model, CFG)
    ids, mask = _batch()
    cache, logits, _ = engine.prefill(ids, mask, max_new_tokens=6)
    ptrs = (cache.keys.data_ptr(), cache.values.data_ptr(), cache.bias.data_ptr())
    runner = DecodeRunner(engine.parts, cache)
    runner.feed(logits.argmax(-1))
    for _ in range(4):
        runner.step()
    assert (cache.keys.data_ptr(), cache.values.data_ptr(), cache.bias.data_ptr()) == ptrs
    assert int(cache.write_pos) == cache.prompt_slots + 4 == cache.host_pos
    assert cache.positions.tolist() == [104, 87]
    assert bool((cache.bias[..., : cache.host_pos] == 0).all())
    assert bool(torch.isinf(cache.bias[..., cache.host_pos:]).all())
    assert cache.keys[:, :, :, cache.host_pos - 1].abs().sum() > 0  # the last step wrote its K
    runner.step()
    runner.step()
    with pytest.raises(RuntimeError, match="static cache full"):
        runner.step()


def _skewed_cache(parts, lengths, prompt_slots=48, new=4, seed=3):
    """A static cache whose heads keep ``lengths[layer][row][head]`` random prompt tokens."""
    g = torch.Generator().manual_seed(seed)
    L, B, H = len(lengths), len(lengths[0]), len(lengths[0][0])
    cache = StaticKVCache(L, B, H, parts.head_dim, prompt_slots, new, dtype=parts.dtype, device="cpu")
    for li in range(L):
        for b in range(B):
            n = max(lengths[li][b])
            k, v = (torch.randn(H, n, parts.head_dim, generator=g) for _ in range(2))
            cache.load(li, b, k, v, head_lengths=lengths[li][b])
    for b in range(B):
        cache.set_prompt_length(b, 200 + b)
    return cache


def test_per_head_lengths_decode_equals_dense_masked_reference():
    """Head-adaptive budgets in the static cache: eager, fused twins and the Triton kernel's twin
    attend to exactly each head's kept tokens (checked against one reference per head)."""
    model = tiny_model("llama")  # 2 layers, 2 KV heads
    engine = Engine(model, CFG)
    parts = engine.parts
    lengths = [[[5, 31], [17, 17]], [[40, 1], [9, 26]]]  # [layer][row][head], rows of equal totals
    tokens = torch.tensor([7, 99])
    logits = {}
    for fused in (False, True):
        cache = _skewed_cache(parts, lengths)
        assert cache.lengths.tolist() == lengths
        assert cache.kept[1][0] == 20.5 and cache.kept_bytes() == 2 * parts.head_dim * 4 * sum(
            sum(sum(r) for r in layer) for layer in lengths)
        runner = DecodeRunner(parts, cache, fused=fused)
        runner.feed(tokens)
        runner.step()
        logits[fused] = runner.logits.clone()
        assert cache.lengths.tolist() == [[[n + 1 for n in r] for r in layer] for layer in lengths]
    torch.testing.assert_close(logits[False], logits[True], atol=1e-5, rtol=1e-5)
    # Reference: the same step where each head's filler slots hold garbage that must stay unseen.
    cache = _skewed_cache(parts, lengths)
    cache.keys[cache.bias.isinf()] = 1e4
    runner = DecodeRunner(parts, cache, fused=False)
    runner.feed(tokens)
    runner.step()
    torch.testing.assert_close(runner.logits, logits[False], atol=1e-5, rtol=1e-5)
    # The decode kernel's own view (starts, lengths) selects the same slots as the bias.
    cache = _skewed_cache(parts, lengths)
    d = parts.head_dim
    for li in range(2):
        for b in range(2):
            for h in range(2):
                start, n = int(cache.starts[li, b, h]), int(cache.lengths[li, b, h])
                flat = cache.keys[li].reshape(-1, d)[start : start + n]
                dense = cache.keys[li, b, h][cache.bias[li, b, h] == 0]
                assert torch.equal(flat, dense)


def test_per_head_lengths_are_validated():
    cache = StaticKVCache(1, 1, 2, 4, 8, 2, dtype=torch.float32, device="cpu")
    k = torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match=r"head_lengths must hold 2 counts in \[1, 6\]"):
        cache.load(0, 0, k, k, head_lengths=[0, 6])
    with pytest.raises(ValueError, match="head_lengths must hold 2 counts"):
        cache.load(0, 0, k, k, head_lengths=[3, 3, 3])


def test_rewind_restores_the_decode_state():
    model = tiny_model("llama")
    engine = Engine(model, CFG)
    ids, mask = _batch()
    cache, logits, _ = engine.prefill(ids, mask, max_new_tokens=4)
    runner = DecodeRunner(engine.parts, cache)
    state = cache.state()
    runner.feed(logits.argmax(-1))
    first = runner.step().clone()
    cache.rewind(state)
    runner.feed(logits.argmax(-1))
    assert torch.equal(runner.step(), first)


def test_decode_attention_matches_float64_twin():
    g = torch.Generator().manual_seed(1)
    for b, hq, hkv, d, cap in ((1, 4, 2, 16, 37), (3, 6, 3, 8, 5), (2, 8, 8, 32, 64)):
        q = torch.randn(b, hq, 1, d, generator=g)
        k, v = torch.randn(b, hkv, cap, d, generator=g), torch.randn(b, hkv, cap, d, generator=g)
        bias = torch.zeros(b, cap)
        bias[:, : cap // 3] = float("-inf")
        out = decode_attention(q, k, v, bias, d**-0.5)
        torch.testing.assert_close(out, decode_attention_ref(q, k, v, bias, d**-0.5), atol=1e-5, rtol=1e-5)
        # per-head masks (head-adaptive budgets): each KV head its own filler
        first = torch.randint(0, cap, (b, hkv), generator=g)
        head_bias = torch.where(torch.arange(cap) >= first[..., None], 0.0, float("-inf"))
        out = decode_attention(q, k, v, head_bias, d**-0.5)
        torch.testing.assert_close(out, decode_attention_ref(q, k, v, head_bias, d**-0.5), atol=1e-5, rtol=1e-5)


def test_chunk_attention_equals_rows_of_full_causal_attention():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 6, 53, 16, generator=g)
    k, v = torch.randn(1, 2, 53, 16, generator=g), torch.randn(1, 2, 53, 16, generator=g)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for start in (0, 1, 20, 52):
        part = causal_chunk_attention_ref(q[:, :, start:], k, v, 16**-0.5)
        torch.testing.assert_close(part, full[:, :, start:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,match", [("mistral_sw", "sliding"), ("mixtral", "model type 'mixtral'.*supported")])
def test_unsupported_models_are_refused(family, match):
    """Mixtral has no runner; a sliding window is refused by the hand-wired path (the engine runs
    it on the model's own layers: tests/test_own_layers.py)."""
    with pytest.raises(ValueError, match=match):
        (DecoderParts.from_model if family == "mistral_sw" else Engine)(tiny_model(family))


def test_bad_settings_raise_value_error():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(model, CFG, prefill_chunk=0)
    with pytest.raises(ValueError, match="attention_backend"):
        Engine(model, CFG, attention_backend="magic")
    with pytest.raises(ValueError, match="max_new_tokens"):
        Engine(model, CFG).generate(torch.ones(1, 10, dtype=torch.long), max_new_tokens=0)


def test_eos_rows_stop_and_repeat_eos():
    model = tiny_model("llama")
    ids, mask = _batch()
    free = Engine(model, CFG).generate(ids, mask, max_new_tokens=6)
    eos = int(free.tokens[0, 2])
    out = Engine(model, CFG).generate(ids, mask, max_new_tokens=6, eos_token_id=eos)
    row = out.tokens[0].tolist()
    assert row[: row.index(eos) + 1] == free.tokens[0, : row.index(eos) + 1].tolist()
    assert all(t == eos for t in row[row.index(eos):])


def test_kept_per_layer():
    assert kept_per_layer(None, 100, 3) == [100, 100, 100]
    assert kept_per_layer(SnapKVConfig(budget=64, window=8), 50, 2) == [50, 50]
    assert kept_per_layer(SnapKVConfig(budget=64, window=8), 500, 2) == [64, 64]
    pyr = kept_per_layer(SnapKVConfig(budget=64, window=8), 500, 4, "pyramid")
    assert pyr[0] > pyr[-1] and abs(sum(pyr) / 4 - 64) <= 1


def test_memory_check_names_a_setting_that_fits(monkeypatch):
    model = tiny_model("llama")
    engine = Engine(model, None)
    need = mem.plan(engine.parts, [4000], 4000 + 8, engine.prefill_chunk).total
    monkeypatch.setattr(mem, "available_bytes", lambda device: need - 1)
    with pytest.raises(NotEnoughMemoryError, match="Would fit") as info:
        engine.prefill(torch.randint(3, 256, (1, 4000)), max_new_tokens=8)
    assert "budget=2048" in info.value.suggestion and "prompts of at most" in info.value.suggestion
    assert info.value.need_bytes > info.value.free_bytes
    Engine(model, CFG).prefill(torch.randint(3, 256, (1, 4000)), max_new_tokens=8)  # compressed: fits


def test_static_cache_validates_sizes():
    with pytest.raises(ValueError, match="max_new_tokens"):
        StaticKVCache(1, 1, 1, 4, 8, 0, dtype=torch.float32, device="cpu")
    cache = StaticKVCache(2, 1, 2, 4, 8, 2, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="prompt slots"):
        cache.load(0, 0, torch.zeros(2, 9, 4), torch.zeros(2, 9, 4))


# -- GPU ---------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["flash", "cudnn"])
def test_gpu_chunk_attention_backends_match_reference(backend):
    for hq, hkv, d, c, s in ((8, 2, 64, 37, 101), (32, 8, 128, 300, 1000), (4, 4, 128, 64, 64)):
        q = torch.randn(1, hq, c, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, hkv, s, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        out = causal_chunk_attention(q, k, v, d**-0.5, backend).float()
        ref = causal_chunk_attention_ref(q.float(), k.float(), v.float(), d**-0.5)
        assert float((out - ref).norm() / ref.norm()) < 2e-2


@pytest.mark.gpu
@gpu
def test_gpu_graph_replay_equals_eager_and_session():
    model = tiny_model("llama").cuda()
    ids, mask = (t.cuda() for t in _batch())
    ref_tokens, ref_logits = _hf(model, ids, mask, CFG)
    outs = [Engine(model, CFG, use_graph=g).generate(ids, mask, max_new_tokens=STEPS, return_logits=True)
            for g in (False, True)]
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    assert torch.equal(outs[1].tokens.cpu(), ref_tokens.cpu())  # generate() returns host tokens
    assert _max_diff(outs[1].logits, ref_logits) < 1e-3
