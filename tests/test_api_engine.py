"""answer() and ContextCache on both backends (tiny models, a character tokenizer), and the API benchmark.

The engine and the transformers path must give the same tokens for the same settings; the
result names the backend that ran; ``backend="engine"`` on a model it cannot run raises.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from snapkv import SnapKVConfig
from snapkv.api import ContextCache, answer
from snapkv.bench import api_bench
from snapkv.bench.api_bench import char_tokenizer, random_context
from snapkv.generation.answer import resolve_backend
from tiny_models import tiny_model

CFG = SnapKVConfig(budget=40, window=8, kernel=5, pooling="avg")
QUESTION = "\nWhat is the key? "


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: own layers, sliding layers not reported
def test_answer_is_the_same_on_both_backends(tok, family, compress):
    model = tiny_model(family)
    ctx = random_context(150)
    out = {b: answer(model, tok, ctx, QUESTION, CFG, chat=False, max_new_tokens=6, backend=b, compress=compress)
           for b in ("engine", "transformers", "auto")}
    assert out["engine"].backend == "engine" and out["transformers"].backend == "transformers"
    assert out["auto"].backend == "engine"  # auto includes CPU (measured: see generation/answer.py)
    e, t = out["engine"], out["transformers"]
    assert e.tokens == t.tokens and e.text == t.text
    assert (e.prompt_tokens, e.kept_tokens, e.kv_bytes_full, e.kv_bytes_kept) == (
        t.prompt_tokens, t.kept_tokens, t.kv_bytes_full, t.kv_bytes_kept)
    assert [s.kept_tokens for s in e.layers] == [s.kept_tokens for s in t.layers]


# probe=False pins plain context-only (the default became Probe(SnapKV(kernel=31)), whose 117-character
# probe does not fit CFG's budget of 40 with the character tokenizer, and which runs on the transformers
# path on gemma3's sliding-window layers; tests/test_reuse.py covers it).
@pytest.mark.parametrize("family,probe", [("qwen2", False), ("qwen2", "\nList the keys."), ("gemma3", False)])
def test_context_cache_is_the_same_on_both_backends(tok, family, probe):
    model = tiny_model(family)
    ctx = random_context(160, seed=3)
    answers = {}
    for backend in ("engine", "transformers"):
        with ContextCache(model, tok, ctx, CFG, chat=False, probe=probe, backend=backend) as doc:
            assert doc.backend == backend
            answers[backend] = [doc.ask(q, max_new_tokens=5) for q in (QUESTION, "\nAnd the name?", QUESTION)]
    e, t = answers["engine"], answers["transformers"]
    assert [a.tokens for a in e] == [a.tokens for a in t]
    assert e[0].tokens == e[2].tokens  # rolled back: the same question, the same answer
    assert all(a.backend == "engine" for a in e)
    assert e[0].kept_tokens == t[0].kept_tokens == 40
    assert e[0].kv_bytes_kept == t[0].kv_bytes_kept


def test_context_cache_grows_room_for_long_answers(tok):
    model = tiny_model("llama")
    ctx = random_context(120, seed=5)
    with ContextCache(model, tok, ctx, CFG, chat=False, probe=False, backend="engine") as doc:  # plain (see above)
        short = doc.ask(QUESTION, max_new_tokens=3)
        doc._engine.cache.capacity = doc._engine.cache.prompt_slots + 4  # pretend the room is small
        long = doc.ask(QUESTION, max_new_tokens=8)
    assert long.tokens[:3] == short.tokens and len(long.tokens) == 8


def test_backend_choice_is_explicit(tok):
    model = tiny_model("mixtral")
    supported = "gemma2, gemma3_text, llama, mistral, phi3, qwen2, qwen3"
    with pytest.raises(ValueError, match=f"backend='engine'.*model type 'mixtral'.*{supported}"):
        answer(model, tok, random_context(60), QUESTION, CFG, chat=False, backend="engine")
    with pytest.raises(ValueError, match="backend='engine'.*mixtral"):
        ContextCache(model, tok, random_context(60), CFG, chat=False, backend="engine")
    with pytest.raises(ValueError, match="backend must be one of"):
        answer(model, tok, random_context(60), QUESTION, CFG, chat=False, backend="fast")
    assert resolve_backend(model, "auto") == "transformers"
    res = answer(model, tok, random_context(60), QUESTION, CFG, chat=False, max_new_tokens=2)
    assert res.backend == "transformers"


def test_api_bench_cpu_smoke(tmp_path):
    parser = argparse.ArgumentParser()
    api_bench.add_arguments(parser)
    args = parser.parse_args(["--model", "tiny-llama", "--device", "cpu", "--lengths", "300", "--budget", "64",
                              "--new-tokens", "4", "--steps", "3", "--out", str(tmp_path)])
    assert api_bench.run(args) == 0
    data = json.loads((tmp_path / "api_bench.json").read_text())
    rows = {r["row"]: r for r in data["results"]}
    assert set(rows) == set(api_bench.ROWS)
    assert all(r["status"] == "ok" and r["ttft_s"] > 0 and r["decode_ms"] > 0 for r in rows.values())
    assert rows["answer/auto"]["backend"] == rows["context/auto"]["backend"] == "engine"
    assert rows["answer/transformers"]["backend"] == "transformers"
    assert rows["answer/auto"]["kept_tokens"] == 64
    assert rows["probe/auto"]["backend"] == "engine" and rows["probe/auto"]["kept_tokens"] == 64
    assert rows["probe/auto"]["context_prefill_s"] > 0
    assert "| answer/auto | engine | 300 | ok |" in (tmp_path / "api_bench.md").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_backends_agree_with_graph_and_fused_kernels(tok):
    model = tiny_model("llama").cuda()
    ctx = random_context(150)
    e, t = (answer(model, tok, ctx, QUESTION, CFG, chat=False, max_new_tokens=6, backend=b)
            for b in ("auto", "transformers"))
    assert e.backend == "engine" and e.tokens == t.tokens
    answers = {}
    for backend in ("engine", "transformers"):
        with ContextCache(model, tok, ctx, CFG, chat=False, probe="\nList the keys.", backend=backend) as doc:
            answers[backend] = [doc.ask(q, max_new_tokens=5).tokens for q in (QUESTION, "\nAnd?", QUESTION)]
    assert answers["engine"] == answers["transformers"]


def test_real_model_probe_on_the_engine():
    """SmolLM2: the probe finds the passkey through the engine's context-only cache, as on transformers."""
    from snapkv.demo import QUESTION as PASSKEY_QUESTION
    from snapkv.demo import passkey_context
    from snapkv.models import load_model

    model, tok = load_model("smollm2")
    key = 40917
    ctx = passkey_context(tok, 1500, 0.4, key)
    with ContextCache(model, tok, ctx, SnapKVConfig(budget=128), chat=False, probe=True, backend="auto") as doc:
        probed = doc.ask(PASSKEY_QUESTION, max_new_tokens=6)
        assert doc._engine.cache.kept[0] == [128] and doc._engine.cache.prompt_lengths == [doc.context_tokens]
    assert probed.backend == "engine" and probed.kept_tokens == 128
    assert str(key) in probed.text
