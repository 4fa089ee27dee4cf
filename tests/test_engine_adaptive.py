"""Head-adaptive budgets (AdaptiveHeads) on the engine equal the transformers path.

Tiny random fp32 Llama and Qwen3 models with GQA (8 query over 4 KV heads), a budget below
the prompt, a batch of two prompts of different lengths padded on the left or the right:

* teacher-forced engine logits equal the transformers path's with the same ``AdaptiveHeads``
  settings (and differ from uniform SnapKV, so the heads' own counts are really used);
* each KV head of each layer and row keeps the same prompt positions on both paths;
* the ragged view the fused kernel reads (``starts``, ``lengths``) gives the same decode as
  the masked view, through the fused step's torch twins;
* ``answer()`` and ``ContextCache`` with ``method=AdaptiveHeads(...)`` run on the engine under
  ``backend="auto"`` and give the transformers path's tokens.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from transformers import LogitsProcessorList

from snapkv import AdaptiveHeads, PyramidBudgets, SnapKV, SnapKVConfig, SnapKVSession
from snapkv.api import ContextCache, answer
from snapkv.bench.api_bench import char_tokenizer, random_context
from snapkv.generation import Engine
from snapkv.generation.fused import decode_one_token_fused, ragged_twin_ops, twin_ops
from snapkv.generation.static_cache import PromptStaging, StaticKVCache
from test_engine_equality import STEPS, _Force, _forced, _max_diff, _padded, _rows, engine_logits
from tiny_models import tiny_model

CFG = SnapKVConfig(budget=40, window=8, kernel=5, pooling="avg")  # avg: no pooling ties
ADAPTIVE = AdaptiveHeads(SnapKV(kernel=5, pooling="avg"), alpha=0.2)
FAMILIES = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}


def gqa_model(family: str) -> torch.nn.Module:
    """A tiny random ``family`` decoder with 8 query heads over 4 KV heads (fp32, eval)."""
    cfg_cls, model_cls = FAMILIES[family]
    cfg = cfg_cls(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=8, num_key_value_heads=4,
                  head_dim=16, num_hidden_layers=2, max_position_embeddings=512, initializer_range=0.2,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = model_cls._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request):
    return request.param, gqa_model(request.param)


def transformers_run(model, method, forced, new_tokens: int = STEPS):
    """Per step ``[B, V]`` logits of the transformers path (left-padded batch) and its cache."""
    ids, mask = _padded(_rows(), "left")
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                  return_dict_in_generate=True,
                  logits_processor=LogitsProcessorList([_Force(forced, ids.shape[1])]))
    with SnapKVSession(model, CFG, method=method) as session, torch.no_grad():
        cache = session.new_cache()
        out = model.generate(**kwargs, **session.cache_kwargs(cache))
    return list(out.logits), cache


def test_engine_logits_equal_transformers_path(family_model):
    family, model = family_model
    forced = _forced()
    ref, _ = transformers_run(model, ADAPTIVE, forced)
    uniform, _ = transformers_run(model, SnapKV(kernel=5, pooling="avg"), forced)
    assert _max_diff(ref, uniform) > 1e-3  # the heads' own counts change the model's output
    engine = Engine(model, CFG, method=ADAPTIVE, prefill_chunk=32)
    for side in ("left", "right"):
        ids, mask = _padded(_rows(), side)
        got = engine_logits(engine, ids, mask, forced)
        assert _max_diff(got, ref) < 1e-4, (family, side)


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gemma3", "phi3"])  # mistral_sw: every layer slides
def test_own_layer_families_equal_transformers_path(family):
    """The engine's other runners (own decoder layers, sliding layers kept whole) with AdaptiveHeads."""
    model = tiny_model(family)
    forced = _forced()
    ref, _ = transformers_run(model, ADAPTIVE, forced)
    engine = Engine(model, CFG, method=ADAPTIVE)
    got = engine_logits(engine, *_padded(_rows(), "right"), forced)
    assert _max_diff(got, ref) < 1e-4
    kv, _, _ = engine.prefill(*_padded(_rows(), "left"), max_new_tokens=2)
    heads = kv.head_tokens()  # [layers, B, Hkv]
    full = [li for li in range(kv.num_layers) if int(heads[li].max()) > 16]  # sliding layers keep 15
    assert full and all(bool((heads[li] != heads[li, :, :1]).any()) for li in full)


def _positions(full_keys: torch.Tensor, kept: torch.Tensor) -> list[int]:
    """Prompt position of each kept key ``[k, D]`` among one head's full keys ``[n, D]`` (exact match)."""
    dist = torch.cdist(kept, full_keys, compute_mode="donot_use_mm_for_euclid_dist")  # [k, n]
    best = dist.min(-1)
    assert float(best.values.max()) < 1e-4  # every kept key is one of the prompt's keys
    return best.indices.tolist()


def test_kept_positions_per_head_equal(family_model):
    _, model = family_model
    rows = _rows()
    _, hf = transformers_run(model, ADAPTIVE, _forced(), new_tokens=1)  # prefill only: nothing appended
    kv, _, _ = Engine(model, CFG, method=ADAPTIVE).prefill(*_padded(rows, "right"), max_new_tokens=4)
    hkv, spread = kv.keys.shape[2], 0
    for b, ids in enumerate(rows):
        with torch.no_grad():
            full = model(input_ids=ids[None], use_cache=True).past_key_values
        for li in range(kv.num_layers):
            ragged = hf.layers[li].ragged
            counts = kv.lengths[li, b].tolist()
            assert counts == ragged.lengths[b].tolist()
            assert sum(counts) == CFG.budget * hkv and kv.kept[li][b] == CFG.budget
            spread = max(spread, max(counts) - min(counts))
            for h in range(hkv):
                n = counts[h]
                mine = kv.keys[li, b, h, kv.prompt_slots - n : kv.prompt_slots]
                start = int(ragged.starts[b, h])
                theirs = ragged.keys[start : start + n]
                keys = full.layers[li].keys[0, h]
                pos = _positions(keys, mine)
                assert pos == _positions(keys, theirs) and pos == sorted(pos) and len(set(pos)) == n
    assert spread > 0  # heads really keep different counts
    assert kv.prompt_slots == int(kv.lengths.max())  # sized by the fullest head, no more


def test_ragged_view_decodes_like_the_mask():
    """The fused step's attention reading ``starts``/``lengths`` (the kernel's view) equals the masked one.

    Llama only: the fused step does not run q_norm/k_norm models (Qwen3).
    """
    model = gqa_model("llama")
    engine = Engine(model, CFG, method=ADAPTIVE)
    ids, mask = _padded(_rows(), "left")
    forced = _forced()
    out = {}
    for name, ops in (("mask", twin_ops()), ("ragged", ragged_twin_ops())):
        kv, _, _ = engine.prefill(ids, mask, max_new_tokens=STEPS)
        with torch.inference_mode():
            out[name] = [decode_one_token_fused(engine.parts, kv, forced[:, i], ops).clone() for i in range(STEPS - 1)]
    assert _max_diff(out["mask"], out["ragged"]) < 1e-5
    ref, _ = transformers_run(model, ADAPTIVE, forced)
    assert _max_diff(out["ragged"], ref[1:]) < 1e-4


def test_pyramid_layer_budgets_on_the_engine():
    """A method's own layer budgets (PyramidBudgets, here around AdaptiveHeads) apply on the engine too."""
    model = gqa_model("llama")
    method = PyramidBudgets(ADAPTIVE, beta=2)
    forced = _forced()
    ref, hf = transformers_run(model, method, forced)
    engine = Engine(model, CFG, method=method)
    got = engine_logits(engine, *_padded(_rows(), "left"), forced)
    assert _max_diff(got, ref) < 1e-4
    kv, _, stats = engine.prefill(*_padded(_rows(), "left"), max_new_tokens=2)
    assert stats.kept[0] != stats.kept[1]  # the layers keep different totals
    assert [kv.lengths[li].sum(-1).tolist() for li in range(2)] == [
        [k * 4 for k in stats.kept[li]] for li in range(2)]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_answer_runs_adaptive_heads_on_the_engine(tok):
    model = gqa_model("llama")
    ctx, question = random_context(150), "\nWhat is the key? "
    out = {b: answer(model, tok, ctx, question, CFG, chat=False, max_new_tokens=6, backend=b, method=ADAPTIVE)
           for b in ("auto", "transformers")}
    assert out["auto"].backend == "engine" and out["transformers"].backend == "transformers"
    assert out["auto"].tokens == out["transformers"].tokens
    assert out["auto"].kept_tokens == out["transformers"].kept_tokens == CFG.budget


def test_context_cache_runs_adaptive_heads_on_the_engine(tok):
    model = gqa_model("qwen3")
    ctx = random_context(160, seed=3)
    questions = ("\nWhat is the key? ", "\nAnd the name?", "\nWhat is the key? ")
    with ContextCache(model, tok, ctx, CFG, chat=False, method=ADAPTIVE) as doc:
        assert doc.backend == "engine"
        got = [doc.ask(q, max_new_tokens=5) for q in questions]
        heads = doc._engine.cache.lengths[:, 0]  # [layers, Hkv] (rewound: the context's kept tokens)
    assert all(a.backend == "engine" for a in got) and got[0].tokens == got[2].tokens
    assert bool((heads != heads[:, :1]).any()) and heads.sum(-1).tolist() == [CFG.budget * 4] * 2
    # the reference: the same compressed context on the transformers path, one question at a time
    with ContextCache(model, tok, ctx, CFG, chat=False, method=ADAPTIVE, backend="transformers") as doc:
        ref = [doc.ask(q, max_new_tokens=5) for q in questions[:2]]
    assert [a.tokens for a in got[:2]] == [a.tokens for a in ref]


def test_probe_cut_with_adaptive_heads_on_the_engine(tok):
    """A probe votes as every head's window, then leaves each head's segment; the transformers
    path (ragged layers, ``drop_tail``) is the reference."""
    model = gqa_model("llama")
    ctx, probe = random_context(160, seed=4), "\nList the keys."
    with ContextCache(model, tok, ctx, CFG, chat=False, probe=probe, method=ADAPTIVE, backend="engine") as doc:
        heads = doc._engine.cache.head_tokens()[:, 0]  # [layers, Hkv]
        got = doc.ask("\nWhat is the key? ", max_new_tokens=4)
    assert got.backend == "engine" and len(got.tokens) == 4
    assert heads.sum(-1).tolist() == [CFG.budget * 4] * 2 and bool((heads != heads[:, :1]).any())
    with ContextCache(model, tok, ctx, CFG, chat=False, probe=probe, method=ADAPTIVE, backend="transformers") as doc:
        ragged = [layer.ragged.lengths[0] for layer in doc.cache.layers]
        ref = doc.ask("\nWhat is the key? ", max_new_tokens=4)
    assert torch.equal(torch.stack(ragged), heads.to(ragged[0]))  # the same heads keep the same counts
    assert ref.tokens == got.tokens


def test_room_grows_by_copying_the_per_head_prompt():
    """ContextCache's larger cache (copy_prompt_from) keeps every head's own segment."""
    model = gqa_model("llama")
    engine = Engine(model, CFG, method=ADAPTIVE)
    row = _rows()[0][None]
    kv, _, _ = engine.prefill(row, max_new_tokens=2)
    bigger = engine.parts.make_cache(1, kv.prompt_slots, 9)
    bigger.copy_prompt_from(kv)
    assert torch.equal(bigger.head_tokens(), kv.head_tokens())
    q = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    kv2, _, _ = engine.prefill(row, max_new_tokens=9)
    torch.testing.assert_close(engine.extend(engine.runner(bigger), q), engine.extend(engine.runner(kv2), q))


# -- the cache pieces ---------------------------------------------------------------------------


def _cache(slots: int = 6) -> StaticKVCache:
    return StaticKVCache(1, 1, 3, 2, slots, 2, dtype=torch.float32, device="cpu")


def test_load_heads_right_aligns_each_head():
    cache = _cache()
    keys = torch.arange(12.0).view(6, 2)  # heads of 1, 2 and 3 tokens
    cache.load_heads(0, 0, keys, -keys, torch.tensor([1, 2, 3]))
    assert cache.first[0, 0].tolist() == [5, 4, 3] and cache.lengths[0, 0].tolist() == [1, 2, 3]
    assert torch.equal(cache.keys[0, 0, 1, 4:6], keys[1:3]) and torch.equal(cache.values[0, 0, 2, 3:6], -keys[3:6])
    assert torch.isinf(cache.bias[0, 0, 0, :5]).all() and cache.bias[0, 0, 0, 5] == 0
    assert cache.kept[0][0] == 2.0
    assert cache.starts[0, 0].tolist() == [5, 8 + 4, 16 + 3]  # capacity 8 per head


@pytest.mark.parametrize("counts,n,match", [([1, 2], 3, "3 counts"), ([0, 3, 3], 6, "counts >= 1"),
                                            ([1, 2, 2], 6, "summing"), ([2, 2, 7], 11, "more than the 6 prompt")])
def test_load_heads_refuses_bad_counts(counts, n, match):
    with pytest.raises(ValueError, match=match):
        _cache().load_heads(0, 0, torch.zeros(n, 2), torch.zeros(n, 2), torch.tensor(counts))


def test_staging_builds_the_cache_of_the_fullest_head():
    staging = PromptStaging(2, 1)
    staging.load_heads(0, 0, torch.ones(9, 2), torch.ones(9, 2), torch.tensor([2, 3, 4]))
    staging.load(1, 0, torch.ones(3, 3, 2), torch.ones(3, 3, 2))
    staging.set_prompt_length(0, 50)
    assert staging.prompt_slots() == 4 and staging.kept_bytes() == 2 * 4 * (18 + 18)

    def make(batch, slots, new):
        return StaticKVCache(2, batch, 3, 2, slots, new, dtype=torch.float32, device="cpu")

    cache = staging.build(make, 5)
    assert cache.prompt_slots == 4 and cache.capacity == 9 and cache.prompt_lengths == [50]
    assert cache.lengths[:, 0].tolist() == [[2, 3, 4], [3, 3, 3]] and staging.kept_bytes() == 0


def test_gpu_bench_script_runs_tiny_on_cpu(tmp_path):
    """scripts/bench_engine_adaptive.py (the gpu_suite stage adaptive_engine), tiny shape on CPU."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import snapkv

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "a.json"
    env = {**os.environ, "PYTHONPATH": str(Path(snapkv.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(root / "scripts" / "bench_engine_adaptive.py"), "--shape", "tiny",
                           "--prompts", "200", "--budget", "40", "--window", "8", "--steps", "2", "--device", "cpu",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())["rows"][0]
    uni, ada = row["uniform"], row["adaptive"]
    assert uni["head_tokens_min"] == uni["head_tokens_max"] == uni["prompt_slots"] == 40
    assert ada["head_tokens_max"] == ada["prompt_slots"] > 40 > ada["head_tokens_min"]
    assert ada["head_tokens_mean"] == 40 and ada["kv_bytes_kept"] == uni["kv_bytes_kept"]
    assert ada["fused_graph_vs_eager_rel_err"] < 1e-5


def test_cli_generate_with_adaptive_heads_runs_on_the_engine(tmp_path, capsys):
    """``snapkv generate --head-budget adaptive`` (SmolLM2: Llama, 3 KV heads) runs on the engine."""
    import json

    from snapkv.cli import main

    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"The code of room {i} is {i * 37 % 1000}." for i in range(60)))
    argv = ["generate", str(doc), "--question", "What is the code of room 7?", "--budget", "96",
            "--head-budget", "adaptive", "--alpha", "0.3", "--max-new-tokens", "4", "--json", "--no-progress"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["backend"] == "engine" and got["head_budget"] == "adaptive"
    assert got["kept_tokens"] == 96 < got["prompt_tokens"]
