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
from snapkv.methods import DEFAULT_PROBE, H2O, AdaptiveHeads, Probe, PyramidBudgets, SnapKV
from snapkv.methods.base import ScoreInputs
from snapkv.methods.kvzip import DEFAULT_REPLAY_PROMPT, KVzip, kvzip_context_cache
from snapkv.methods.probe import probe_config, probe_selector
from tiny_models import tiny_model

#: The budget lies above the default probe's 117 characters (its window) with the character tokenizer.
CFG = SnapKVConfig(budget=128, window=8, kernel=5, pooling="avg")
QUESTION = "\nWhat is the key? "


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _positions(cache) -> list[list[list[int]]]:
    return [layer.positions[0].tolist() for layer in cache.layers]


def _probe_reference(model, ids: list[int], g: int, budget: int, tail: int, kernel: int) -> dict[int, list[list[int]]]:
    """Positions a probe keeps per full layer and head, from first principles.

    The prompt ``ids`` ends with a ``g``-token probe: SnapKV(kernel) votes with the probe as its
    window, the context's last ``tail`` tokens are kept whatever their votes, the top of the rest
    fill ``budget`` context slots (earlier positions first among equal votes); the probe is cut.
    """
    n = len(ids) - g
    with SnapKVSession(model, SnapKVConfig(budget=len(ids), window=g), capture=True) as s, torch.no_grad():
        cache = s.new_cache()
        model(input_ids=torch.tensor([ids]), **s.cache_kwargs(cache))
        out = {}
        for i, cap in s.captured.items():
            votes = SnapKV(kernel=kernel).score(dataclasses.replace(cap.inputs, window=g))[0]  # [Hkv, L]
            votes[:, n - tail :] = float("inf")
            top = votes.sort(dim=-1, descending=True, stable=True).indices[:, : budget + g]
            out[i] = [sorted(p for p in head.tolist() if p < n) for head in top]
    return out


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
        got = _positions(doc.cache)
        default = doc.ask(QUESTION, max_new_tokens=4)
    # From first principles: the probe votes as SnapKV(31)'s window, the context's last window kept, probe cut.
    ctx_ids, _ = split_prompt(tok, ctx, "?", chat=False)
    probe_ids = list(tok(DEFAULT_PROBE, add_special_tokens=False)["input_ids"])
    g, n = len(probe_ids), len(ctx_ids)
    want = _probe_reference(model, ctx_ids + probe_ids, g, 128, CFG.window, 31)
    assert got == [want[i] for i in range(len(got))]
    assert all(set(range(n - CFG.window, n)) <= set(h) for layer in got for h in layer)  # the tail stays
    # tail=0: only what the probe votes for (the tail is not forced in)
    with ContextCache(model, tok, ctx, CFG, chat=False, method=Probe(tail=0), backend="transformers") as doc:
        want0 = _probe_reference(model, ctx_ids + probe_ids, g, 128, 0, 31)
        assert _positions(doc.cache) == [want0[i] for i in range(len(got))]
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


def test_context_cache_probe_on_sliding_layers_takes_them_from_the_context_alone(tok):
    """Gemma 3 (sliding-window layers): full layers from context + probe, sliding layers from the context alone."""
    model = tiny_model("gemma3")
    ctx = random_context(300, seed=4)
    with ContextCache(model, tok, ctx, CFG, chat=False, backend="transformers") as doc:  # the default probe
        assert isinstance(doc.method, Probe)
        first = doc.ask(QUESTION, max_new_tokens=4)
        again = doc.ask(QUESTION, max_new_tokens=4)
        layers = list(doc.cache.layers)
    assert first.tokens == again.tokens and first.kept_tokens == 128
    ctx_ids, _ = split_prompt(tok, ctx, "?", chat=False)
    probe_ids = list(tok(DEFAULT_PROBE, add_special_tokens=False)["input_ids"])
    g = len(probe_ids)
    want = _probe_reference(model, ctx_ids + probe_ids, g, 128, CFG.window, 31)
    with SnapKVSession(model, CFG) as s, torch.no_grad():
        alone = s.new_cache()
        model(input_ids=torch.tensor([ctx_ids]), **s.cache_kwargs(alone))
        full = s.full_layers
        sliding = [i for i in range(len(layers)) if i not in full]
        assert full and sliding and sorted(want) == full
        for i in full:
            assert layers[i].positions[0].tolist() == want[i]
        for i in sliding:
            assert torch.equal(layers[i].keys, alone.layers[i].keys)
    # The engine keeps window - 1 + probe tokens in the sliding layers and cuts the probe everywhere:
    # the same cache, so the same answers (both questions, after a rewind between them).
    questions = (QUESTION, "\nWhat is the name? ")
    with ContextCache(model, tok, ctx, CFG, chat=False, backend="transformers") as doc:
        ref = [doc.ask(q, max_new_tokens=6) for q in questions]
    with ContextCache(model, tok, ctx, CFG, chat=False, backend="engine") as doc:
        got = [doc.ask(q, max_new_tokens=6) for q in questions]
        cache, kinds = doc._engine.cache, doc._engine.engine.parts.kinds
        w = model.config.sliding_window
    assert [a.tokens for a in got] == [a.tokens for a in ref] and got[0].backend == "engine"
    assert [a.kept_tokens for a in got] == [a.kept_tokens for a in ref]
    n = len(ctx_ids)
    assert all(cache.kept[li][0] == (w - 1 if kinds[li] == "sliding" else 128) for li in range(len(kinds)))
    assert cache.prompt_lengths[0] == n  # the next position is the context's end
    with ContextCache(model, tok, ctx, CFG, chat=False, probe=False, backend="engine") as doc:
        assert doc.method == SnapKV(kernel=5, pooling="avg") and doc.probe is None  # plain: the engine runs it


def test_context_cache_method_bad_input(tok):
    llama = tiny_model("llama")
    with pytest.raises(ValueError, match=r"method must be a snapkv Method \(Probe\(\.\.\.\), KVzip.*got str"):
        ContextCache(llama, tok, "text", method="kvzip")
    with pytest.raises(ValueError, match="give probe or method=Probe"):
        ContextCache(llama, tok, "text", probe=True, method=Probe())
    with pytest.raises(ValueError, match="give probe or method=Probe"):
        ContextCache(llama, tok, "text", probe="\nKeys?", method=KVzip())
    with pytest.raises(ValueError, match="method must be a SnapKV scorer or a wrapper of one.*H2O"):
        ContextCache(llama, tok, "text", probe=True, method=H2O())  # the probe votes through H2O: refused
    with pytest.raises(ValueError, match="backend='engine' cannot run method=KVzip"):
        ContextCache(llama, tok, "text", method=KVzip(), backend="engine")
    with pytest.raises(ValueError, match="KVzip.*all full attention"):
        ContextCache(tiny_model("gemma3"), tok, "text", method=KVzip())


def test_probe_method_bad_input():
    with pytest.raises(ValueError, match="method must be a SnapKV scorer or a wrapper of one.*H2O"):
        Probe(H2O())
    assert Probe(PyramidBudgets(SnapKV(kernel=5))).scorer == SnapKV(kernel=5)
    with pytest.raises(ValueError, match="method.kernel must be a positive odd integer"):
        Probe(SnapKV(kernel=4))
    with pytest.raises(ValueError, match="text must be a non-empty probe question"):
        Probe(text="  ")
    with pytest.raises(ValueError, match="method must be a KVzip"):
        kvzip_context_cache(tiny_model("llama"), torch.tensor([[5, 6, 7]]), [5], method=SnapKV())
    p = Probe()
    assert p.scorer == SnapKV(kernel=31) and dataclasses.replace(p, text="x").text == "x"
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="tail must be None .* or an integer >= 0"):
            Probe(tail=bad)


def test_probe_config_and_selector():
    cfg = SnapKVConfig(budget=100, window=8)
    assert probe_config(cfg, 1000, 20) == dataclasses.replace(cfg, budget=120, window=20)  # the probe votes
    assert probe_config(cfg, 1000, 20, tail=0) == dataclasses.replace(cfg, budget=120, window=20)
    assert probe_config(cfg, 100, 20) is None  # the context fits its budget: no probe
    frac = SnapKVConfig(budget=0.25, window=8)
    assert probe_config(frac, 1000, 20) == dataclasses.replace(frac, budget=270, window=20)
    with pytest.raises(ValueError, match="probe_tokens must be a positive integer"):
        probe_config(cfg, 1000, 0)
    with pytest.raises(ValueError, match=r"tail must be an integer in \[0, 1000\)"):
        probe_config(cfg, 1000, 20, tail=1000)
    with pytest.raises(ValueError, match=r"budget \(100\) must be greater than the observation window \(100\)"):
        probe_config(cfg, 1000, 20, tail=100)
    assert probe_selector(SnapKV(kernel=5), cfg) == Probe(SnapKV(kernel=5), tail=8)
    assert probe_selector(Probe(SnapKV(kernel=5), tail=3), cfg) == Probe(SnapKV(kernel=5), tail=3)
    assert probe_selector(Probe(SnapKV(kernel=5)), cfg, tail=0) == Probe(SnapKV(kernel=5), tail=0)
    # The selection: the probe's votes decide, the tail is kept whatever they say.
    g, n, tail = 4, 40, 6
    inputs = ScoreInputs(queries=torch.randn(1, 2, n + g, 8), keys=torch.randn(1, 2, n + g, 8), key_valid=None,
                         window=g, scaling=0.3)
    scores = SnapKV(kernel=3).score(inputs)
    scores[..., n - tail : n] = -1.0  # the tail's own votes are the lowest: kept anyway
    sel = Probe(SnapKV(kernel=3), tail=tail).select(inputs, torch.tensor([g + 12]), scores)
    rest = scores[..., : n - tail].float().sort(dim=-1, descending=True, stable=True).indices[..., : 12 - tail]
    for h in range(2):
        want = sorted(rest[0, h].tolist() + list(range(n - tail, n + g)))
        assert sel.indices[0, h].tolist() == want


# -- the server's document cache ---------------------------------------------------------------------

SERVE_CFG = SnapKVConfig(budget=40, window=8, kernel=5, pooling="avg")
PROBE_IDS = [5, 6, 7, 8, 9, 10, 11, 12, 13]
REPLAY_IDS = [14, 15, 16, 17]


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_doc_cache_kvzip_entry_is_what_the_method_keeps():
    from snapkv.generation.adapter import DecoderParts
    from snapkv.serve.extend import compress_context, extend

    model = tiny_model("llama")
    parts = DecoderParts.from_model(model)
    context = _ids(120, 1)
    method = KVzip(chunk=16, kernel=3)
    entry = compress_context(parts, context, REPLAY_IDS, SERVE_CFG, chunk=32, method=method)
    with torch.no_grad():
        cache, _ = kvzip_context_cache(model, torch.tensor([context]), REPLAY_IDS, SERVE_CFG, method=method)
    for li, layer in enumerate(cache.layers):
        assert torch.equal(entry.keys[li], layer.keys[0]) and torch.equal(entry.values[li], layer.values[0])
    cache.close()
    assert entry.context_tokens == 120 and entry.kept_tokens == 40
    row, logits = extend(parts, entry, _ids(5, 2))
    assert row.prompt_lengths == [125] and torch.isfinite(logits).all()


def test_doc_cache_probe_method_scores_with_its_own_kernel():
    from snapkv.generation.adapter import DecoderParts
    from snapkv.serve.extend import compress_context

    parts = DecoderParts.from_model(tiny_model("llama"))
    context = _ids(120, 4)
    got = compress_context(parts, context, PROBE_IDS, SERVE_CFG, chunk=32, method=Probe(SnapKV(kernel=31)))
    want = compress_context(parts, context, PROBE_IDS, dataclasses.replace(SERVE_CFG, kernel=31, pooling="max"),
                            chunk=32)  # the config-driven probe path, given the same scoring
    other = compress_context(parts, context, PROBE_IDS, SERVE_CFG, chunk=32)  # kernel 5, avg
    assert all(torch.equal(a, b) for a, b in zip(got.keys, want.keys, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(got.keys, other.keys, strict=True))


@pytest.mark.usefixtures("one_thread")
def test_engine_backend_serves_documents_with_kvzip():
    from snapkv.generation.adapter import DecoderParts
    from snapkv.serve.backend import PrefillJob
    from snapkv.serve.batcher import EngineBackend
    from snapkv.serve.doc_cache import DocCache
    from snapkv.serve.extend import compress_context, extend

    model = tiny_model("llama")
    method = KVzip(chunk=16)
    backend = EngineBackend(model, rows=1, slot_tokens=64, doc_cache=DocCache(1 << 24), probe=REPLAY_IDS,
                            prefill_chunk=32, fused=False, doc_method=method)
    ids = _ids(130, 6)
    job = PrefillJob(ids, SERVE_CFG, context_tokens=120)
    first, second = backend.prefill(job), backend.prefill(job)
    assert (first.cached_tokens, second.cached_tokens) == (0, 120) and backend.doc_cache.hits == 1
    assert first.kept_tokens == backend.row_slots(130, SERVE_CFG, 120) == 50
    parts = DecoderParts.from_model(model)
    entry = compress_context(parts, ids[:120], REPLAY_IDS, SERVE_CFG, method=method)
    _, logits = extend(parts, entry, ids[120:])
    torch.testing.assert_close(first.logits, logits)
    torch.testing.assert_close(second.logits, logits)
    assert isinstance(EngineBackend(model, rows=1, slot_tokens=64, doc_cache=DocCache(0), probe=PROBE_IDS,
                                    fused=False).doc_method, Probe)  # the default document method


def test_doc_method_bad_input():
    from serve_fixture import serve_args
    from snapkv.serve.batcher import EngineBackend
    from snapkv.serve.cli import build_server
    from snapkv.serve.doc_cache import DocCache
    from snapkv.serve.extend import doc_method

    assert doc_method() == Probe(SnapKV(kernel=31)) and repr(doc_method("kvzip", 1)) == repr(KVzip(kernel=1))
    with pytest.raises(ValueError, match=r"doc_method \(--doc-method\) must be one of \('probe', 'kvzip'\)"):
        doc_method("replay")
    with pytest.raises(ValueError, match=r"doc_kernel \(--doc-kernel\) must be a positive odd integer"):
        doc_method("probe", 4)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="doc_method must be a Probe or a KVzip, got SnapKV"):
        EngineBackend(model, rows=1, slot_tokens=64, doc_cache=DocCache(0), probe=[5], doc_method=SnapKV())
    with pytest.raises(ValueError, match="a Probe's method must be a plain SnapKV, got AdaptiveHeads"):
        EngineBackend(model, rows=1, slot_tokens=64, doc_cache=DocCache(0), probe=[5],
                      doc_method=Probe(AdaptiveHeads(SnapKV())))
    with pytest.raises(ValueError, match="kvzip document method selects with uniform layer budgets"):
        EngineBackend(model, rows=1, slot_tokens=64, doc_cache=DocCache(0), probe=[5], profile="pyramid",
                      doc_method=KVzip())
    with pytest.raises(ValueError, match="--doc-kernel must be a positive odd integer"):
        build_server(model, None, serve_args("--doc-kernel", "8"))
    with pytest.raises(ValueError, match="--doc-method kvzip selects with uniform layer budgets"):
        build_server(model, None, serve_args("--doc-method", "kvzip", "--layer-profile", "pyramid"))
    with pytest.raises(SystemExit):  # argparse names the choices
        serve_args("--doc-method", "replay")


def test_probe_with_adaptive_heads_on_sliding_layers_engine_equals_transformers(tok):
    """Gemma 3 + head-adaptive budgets + the probe: per-head ragged cut (transformers) and the engine's
    staged per-head cache with the probe cut agree on every answer."""
    model = tiny_model("gemma3")
    ctx = random_context(300, seed=4)
    cfg = SnapKVConfig(budget=64, window=8)
    out = {}
    for backend in ("transformers", "engine"):
        method = Probe(AdaptiveHeads(SnapKV(), slack=64))
        with ContextCache(model, tok, ctx, cfg, chat=False, method=method, backend=backend) as doc:
            out[backend] = [doc.ask(q, max_new_tokens=6) for q in (QUESTION, "\nAnd the name?")]
    assert [a.tokens for a in out["engine"]] == [a.tokens for a in out["transformers"]]
    assert [a.backend for a in out["engine"]] == ["engine"] * 2
