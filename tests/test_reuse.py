"""Reuse (query-agnostic) scorers in ContextCache: the default probe, KVzip, plain SnapKV, bad input.

Tiny random models and a character tokenizer (no download): what ContextCache keeps must be
what the method, called directly, keeps.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from snapkv import SnapKVConfig, SnapKVSession
from snapkv.api import ContextCache, split_prompt
from snapkv.bench.api_bench import char_tokenizer, random_context
from snapkv.methods import H2O, DEFAULT_PROBE, Probe, PyramidBudgets, SnapKV
from snapkv.methods.kvzip import DEFAULT_REPLAY_PROMPT, KVzip, kvzip_context_cache
from tiny_models import tiny_model

#: The budget lies above the default probe's 117 characters (its window) with the character tokenizer.
CFG = SnapKVConfig(budget=128, window=8, kernel=5, pooling="avg")
QUESTION = "\nWhat is the key? "


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _positions(cache) -> list[list[list[int]]]:
    return [layer.positions[0].tolist() for layer in cache.layers]


def test_context_cache_kvzip_keeps_what_the_method_keeps(tok):
    model = tiny_model("llama", "sdpa")
    ctx = random_context(300, seed=7)
    kvzip = KVzip(chunk=16, kernel=3)
    with ContextCache(model, tok, ctx, CFG, chat=False, method=kvzip, backend="auto") as doc:
        assert doc.backend == "transformers"  # auto takes KVzip to the transformers path
        got = _positions(doc.cache)
        first = doc.ask(QUESTION, max_new_tokens=4)
        again = doc.ask(QUESTION, max_new_tokens=4)
        fitted = doc.method
    assert kvzip.scores is None and fitted.scores is not None  # the caller's method is left as it was
    ctx_ids, prompt = split_prompt(tok, ctx, DEFAULT_REPLAY_PROMPT, chat=False)
    with torch.no_grad():
        cache, direct = kvzip_context_cache(model, torch.tensor([ctx_ids]), prompt, CFG, method=kvzip)
    assert got == _positions(cache)
    for a, b in zip(fitted.scores, direct.scores, strict=True):
        torch.testing.assert_close(a, b)
    cache.close()
    assert first.tokens == again.tokens  # rolled back after each answer
    assert first.kept_tokens == 128 and all(len(h) == 128 for layer in got for h in layer)
    assert model.config._attn_implementation == "sdpa"  # the session and the replay restored it


def test_context_cache_default_is_the_probe_with_kernel_31(tok):
    model = tiny_model("llama")
    ctx = random_context(300, seed=2)
    with ContextCache(model, tok, ctx, CFG, chat=False, backend="transformers") as doc:
        assert isinstance(doc.method, Probe) and doc.method.method.kernel == 31 and doc.probe == DEFAULT_PROBE
        assert doc.config.kernel == 31 and doc.config.pooling == "max"
        got = _positions(doc.cache)
        default = doc.ask(QUESTION, max_new_tokens=4)
    # The method called directly: the context plus the probe, the probe as SnapKV(31)'s window, then cut.
    ctx_ids, _ = split_prompt(tok, ctx, "?", chat=False)
    probe_ids = list(tok(DEFAULT_PROBE, add_special_tokens=False)["input_ids"])
    g = len(probe_ids)
    with SnapKVSession(model, SnapKVConfig(budget=128 + g, window=g), method=SnapKV(kernel=31)) as s, \
            torch.no_grad():
        s.window = g
        cache = s.new_cache()
        model(input_ids=torch.tensor([ctx_ids + probe_ids]), **s.cache_kwargs(cache))
        want = [[h[:-g] for h in layer.positions[0].tolist()] for layer in cache.layers]
    assert got == want
    # The explicit method and the engine give the same answer.
    for backend in ("transformers", "engine"):
        with ContextCache(model, tok, ctx, CFG, chat=False, method=Probe(), backend=backend) as doc:
            assert doc.ask(QUESTION, max_new_tokens=4).tokens == default.tokens


def test_context_cache_probe_true_and_plain_snapkv_keep_the_config_scoring(tok):
    model = tiny_model("qwen2")
    ctx = random_context(300, seed=3)
    with ContextCache(model, tok, ctx, CFG, chat=False, probe=True, backend="transformers") as doc:
        assert doc.method == Probe(SnapKV(kernel=5, pooling="avg"), DEFAULT_PROBE)
        via_probe = doc.ask(QUESTION, max_new_tokens=4)
    with ContextCache(model, tok, ctx, CFG, chat=False, method=Probe(SnapKV(kernel=5, pooling="avg")),
                      backend="transformers") as doc:
        assert doc.ask(QUESTION, max_new_tokens=4).tokens == via_probe.tokens
    with ContextCache(model, tok, ctx, CFG, chat=False, probe=False, backend="engine") as doc:
        assert doc.method == SnapKV(kernel=5, pooling="avg") and doc.probe is None
        plain = doc.ask(QUESTION, max_new_tokens=4)
    with ContextCache(model, tok, ctx, CFG, chat=False, method=SnapKV(kernel=5, pooling="avg"),
                      backend="transformers") as doc:
        assert doc.ask(QUESTION, max_new_tokens=4).tokens == plain.tokens


def test_context_cache_default_on_sliding_layers_is_plain_snapkv(tok):
    with ContextCache(tiny_model("gemma3"), tok, random_context(200), CFG, chat=False) as doc:
        assert doc.method == SnapKV(kernel=5, pooling="avg") and doc.probe is None
        assert doc.ask(QUESTION, max_new_tokens=2).kept_tokens == 128


def test_context_cache_method_bad_input(tok):
    llama = tiny_model("llama")
    with pytest.raises(ValueError, match=r"method must be Probe\(\.\.\.\), KVzip\(\.\.\.\) or SnapKV\(\.\.\.\).*H2O"):
        ContextCache(llama, tok, "text", method=H2O())
    with pytest.raises(ValueError, match="method must be .*PyramidBudgets"):
        ContextCache(llama, tok, "text", method=PyramidBudgets(SnapKV()))
    with pytest.raises(ValueError, match="method must be .*str"):
        ContextCache(llama, tok, "text", method="kvzip")
    with pytest.raises(ValueError, match="give probe or method, not both"):
        ContextCache(llama, tok, "text", probe=True, method=Probe())
    with pytest.raises(ValueError, match="backend='engine' cannot run method=KVzip"):
        ContextCache(llama, tok, "text", method=KVzip(), backend="engine")
    with pytest.raises(ValueError, match="KVzip.*all full attention"):
        ContextCache(tiny_model("gemma3"), tok, "text", method=KVzip())
    with pytest.raises(ValueError, match="probe needs a model whose layers are all full attention"):
        ContextCache(tiny_model("gemma3"), tok, "text", method=Probe())


def test_probe_method_bad_input():
    with pytest.raises(ValueError, match="method must be a SnapKV scorer.*H2O"):
        Probe(H2O())
    with pytest.raises(ValueError, match="method.kernel must be a positive odd integer"):
        Probe(SnapKV(kernel=4))
    with pytest.raises(ValueError, match="text must be a non-empty probe question"):
        Probe(text="  ")
    with pytest.raises(ValueError, match="method must be a KVzip"):
        kvzip_context_cache(tiny_model("llama"), torch.tensor([[5, 6, 7]]), [5], method=SnapKV())
    p = Probe()
    assert p.scorer == SnapKV(kernel=31) and dataclasses.replace(p, text="x").text == "x"
