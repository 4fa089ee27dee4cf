"""The engine computes the transformers path's logits, teacher-forced, for every engine family.

For each family the engine runs (tiny random fp32 models): the same prompts and the same forced
tokens through :class:`~snapkv.generation.Engine` and through transformers with
:class:`~snapkv.SnapKVSession` / ``SnapKVCache`` with the same settings, at a budget above the
prompt (the full model) and below it, for a batch padded on the left and on the right. Also:
the self-check refuses a model whose forward the engine does not reproduce, and the
context-only path (extend over a compressed cache, rewind, probe cut) equals the session's.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from transformers import LogitsProcessor, LogitsProcessorList

from snapkv import SnapKVConfig, SnapKVSession
from snapkv.generation import Engine, adapter
from snapkv.generation.selfcheck import TOLERANCE, engine_errors
from tiny_models import tiny_model

#: Families the engine runs (a family runner added to adapter.RUNNERS adds its tiny model here).
ENGINE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
BELOW = SnapKVConfig(budget=40, window=8, kernel=5, pooling="avg")  # avg: no pooling ties (see test_generation)
ABOVE = SnapKVConfig(budget=500, window=8, kernel=5, pooling="avg")
STEPS = 5
LENGTHS = (100, 83)


def _rows(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g) for n in LENGTHS]


def _padded(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.numel() for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        sl = slice(width - r.numel(), width) if side == "left" else slice(0, r.numel())
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask


class _Force(LogitsProcessor):
    """Teacher forcing inside ``generate``: only ``forced[:, step]`` may be chosen."""

    def __init__(self, forced: torch.Tensor, width: int) -> None:
        self.forced, self.width = forced, width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.width
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(scores.shape[0]), self.forced[:, step]] = 0.0
        return out


def _forced(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 256, (len(LENGTHS), STEPS), generator=torch.Generator().manual_seed(seed))


def transformers_logits(model, config, forced) -> list[torch.Tensor]:
    """Per step ``[B, V]`` logits of the transformers path (left-padded batch, SnapKVSession)."""
    ids, mask = _padded(_rows(), "left")
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                  return_dict_in_generate=True, logits_processor=LogitsProcessorList([_Force(forced, ids.shape[1])]))
    with SnapKVSession(model, config) as session, torch.no_grad():
        out = model.generate(**kwargs, **session.cache_kwargs(session.new_cache()))
    assert torch.equal(out.sequences[:, ids.shape[1]:], forced)
    return list(out.logits)


def engine_logits(engine: Engine, ids, mask, forced) -> list[torch.Tensor]:
    """Per step ``[B, V]`` logits of the engine: prefill, then the forced tokens fed one by one."""
    cache, logits, _ = engine.prefill(ids, mask, max_new_tokens=STEPS)
    runner = engine.runner(cache)
    out = [logits.clone()]
    for i in range(STEPS - 1):
        runner.feed(forced[:, i])
        runner.step()
        out.append(runner.logits.clone())
    return out


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("family", ENGINE_FAMILIES)
@pytest.mark.parametrize("config", [ABOVE, BELOW], ids=["budget>prompt", "budget<prompt"])
def test_engine_logits_equal_transformers_path(family, config):
    model = tiny_model(family)
    forced = _forced()
    ref = transformers_logits(model, config, forced)
    engine = Engine(model, config, prefill_chunk=32)
    for side in ("left", "right"):
        ids, mask = _padded(_rows(), side)
        got = engine_logits(engine, ids, mask, forced)
        assert _max_diff(got, ref) < 1e-4, (family, side)


def test_budget_above_prompt_is_the_full_model():
    model = tiny_model("llama")
    forced = _forced()
    ids, mask = _padded(_rows(), "left")
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False,
                               output_logits=True, return_dict_in_generate=True,
                               logits_processor=LogitsProcessorList([_Force(forced, ids.shape[1])])).logits
    got = engine_logits(Engine(model, ABOVE), *_padded(_rows(), "right"), forced)
    assert _max_diff(got, plain) < 1e-4


def test_context_only_extend_and_rewind_equal_the_session():
    """Compressed context, then a question fed over it (teacher-forced steps), then rewind."""
    model = tiny_model("qwen2")
    ctx, question = _rows()[0], torch.randint(3, 256, (7,), generator=torch.Generator().manual_seed(5))
    with SnapKVSession(model, BELOW) as session, torch.no_grad():
        cache = session.new_cache()
        model(input_ids=ctx[None], **session.cache_kwargs(cache))
        pos = torch.arange(ctx.numel(), ctx.numel() + question.numel())[None]
        ref = model(input_ids=question[None], position_ids=pos, **session.cache_kwargs(cache)).logits[0, -1]
    engine = Engine(model, BELOW)
    kv, _, _ = engine.prefill(ctx[None], max_new_tokens=16)
    runner, state = engine.runner(kv), kv.state()
    for _ in range(2):  # the second question sees exactly what the first saw
        got = engine.extend(runner, question[None])[0]
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        kv.rewind(state)


def test_probe_cut_equals_session_drop_tail():
    """A probe votes as the window, then leaves: same cache as the transformers path's drop_tail."""
    model = tiny_model("llama")
    ctx, probe = _rows()[0], torch.randint(3, 256, (6,), generator=torch.Generator().manual_seed(9))
    question = torch.randint(3, 256, (5,), generator=torch.Generator().manual_seed(4))
    cfg = SnapKVConfig(budget=30 + probe.numel(), window=probe.numel(), kernel=5, pooling="avg")
    full = torch.cat([ctx, probe])[None]
    with SnapKVSession(model, cfg) as session, torch.no_grad():
        cache = session.new_cache()
        model(input_ids=full, **session.cache_kwargs(cache))
        for layer in cache.layers:
            layer.drop_tail(probe.numel())
        pos = torch.arange(ctx.numel(), ctx.numel() + question.numel())[None]
        ref = model(input_ids=question[None], position_ids=pos, **session.cache_kwargs(cache)).logits[0, -1]
    engine = Engine(model, cfg)
    kv, _, _ = engine.prefill(full, max_new_tokens=8)
    kv.drop_prompt_tail(0, probe.numel())
    assert kv.kept[0] == [30] and kv.prompt_lengths == [ctx.numel()]
    with pytest.raises(ValueError, match="count must be"):
        kv.drop_prompt_tail(0, 30)
    got = engine.extend(engine.runner(kv), question[None])[0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="before decoding"):
        kv.drop_prompt_tail(0, 1)
    # prefill(probe_tokens=...) cuts it itself: the same cache
    kv2, _, _ = engine.prefill(full, max_new_tokens=8, probe_tokens=probe.numel())
    assert kv2.kept[0] == [30] and kv2.prompt_lengths == [ctx.numel()]
    torch.testing.assert_close(engine.extend(engine.runner(kv2), question[None])[0], ref, atol=1e-4, rtol=1e-4)
    n = full.shape[1]
    for bad in (-1, n, True, 2.0):
        with pytest.raises(ValueError, match=rf"probe_tokens must be an integer in \[0, {n}\)"):
            engine.prefill(full, probe_tokens=bad)
    with pytest.raises(ValueError, match="probe_tokens needs compression"):
        engine.prefill(full, probe_tokens=3, compress=False)


def test_room_grows_by_copying_the_prompt():
    model = tiny_model("llama")
    engine = Engine(model, BELOW)
    kv, logits, _ = engine.prefill(_rows()[0][None], max_new_tokens=2)
    bigger = engine.parts.make_cache(1, kv.prompt_slots, 9)
    bigger.copy_prompt_from(kv)
    q = torch.randint(3, 256, (1, 8))
    with pytest.raises(RuntimeError, match="static cache full"):
        engine.extend(engine.runner(kv), q)
    kv2, _, _ = engine.prefill(_rows()[0][None], max_new_tokens=9)
    torch.testing.assert_close(engine.extend(engine.runner(bigger), q), engine.extend(engine.runner(kv2), q))


# -- one forward: the allowlist and the self-check -------------------------------------------------
_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=2, max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=False,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
#: Llama module names, other forwards (../shared/repro/engine_silent_families.py).
LOOKALIKES = {
    "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, dict(embedding_multiplier=12.0, residual_multiplier=0.22,
                                                             logits_scaling=8.0, attention_multiplier=0.0156)),
    "smollm3": (tf.SmolLM3Config, tf.SmolLM3ForCausalLM, dict(no_rope_layers=[1, 0], use_sliding_window=False)),
    "olmo": (tf.OlmoConfig, tf.OlmoForCausalLM, dict(clip_qkv=0.5)),
}


def _lookalike(name: str) -> torch.nn.Module:
    cfg_cls, model_cls, extra = LOOKALIKES[name]
    torch.manual_seed(0)
    return model_cls._from_config(cfg_cls(**{**_COMMON, **extra}), attn_implementation="sdpa",
                                  dtype=torch.float32).eval()


@pytest.mark.parametrize("name", sorted(LOOKALIKES))
def test_lookalike_families_are_refused_by_model_type(name):
    supported = "gemma2, gemma3_text, llama, mistral, phi3, qwen2, qwen3"
    with pytest.raises(ValueError, match=f"model type '{name}'.*supported model types: {supported}"):
        Engine(_lookalike(name))


@pytest.mark.parametrize("name", sorted(LOOKALIKES))
def test_self_check_catches_them_even_when_admitted(name, monkeypatch):
    """Second line of defence: were a lookalike admitted by mistake, the self-check refuses it."""
    monkeypatch.setitem(adapter.RUNNERS, name, adapter.RUNNERS["llama"])
    monkeypatch.setattr(adapter, "LLAMA_TYPES", (*adapter.LLAMA_TYPES, name))
    with pytest.raises(ValueError, match=f"does not compute model type '{name}'"):
        Engine(_lookalike(name))
    Engine(_lookalike(name), self_check=False)  # the explicit, documented-unsafe opt-out


class _ScaledLlama(tf.LlamaForCausalLM):
    """A Llama whose own forward differs from the layers the engine runs (logits x 2)."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_self_check_refuses_an_allowed_type_that_computes_something_else():
    torch.manual_seed(0)
    model = _ScaledLlama._from_config(tf.LlamaConfig(**_COMMON, head_dim=16), attn_implementation="sdpa",
                                      dtype=torch.float32).eval()
    with pytest.raises(ValueError, match="does not compute model type 'llama'.*relative logit error"):
        Engine(model)


@pytest.mark.parametrize("family", ENGINE_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_self_check_errors_are_far_below_tolerance(family, dtype):
    model = tiny_model(family).to(dtype)
    engine = Engine(model, None)
    errors = engine_errors(engine)
    assert max(errors) <= TOLERANCE[dtype] / 3  # measured fp32 ~1e-6, fp16 ~2e-3, bf16 ~1.5e-2
    assert engine.self_check_error == pytest.approx(max(errors))
