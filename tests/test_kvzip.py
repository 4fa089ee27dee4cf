"""KVzip replay scores: the chunked scorer against dense float64 twins, scoping, selection, eval wiring."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from snapkv.cache.compressed import SnapKVCache
from snapkv.config import SnapKVConfig
from snapkv.core.replay import replay_chunk_scores, replay_chunk_scores_reference, replay_chunks, span_visible
from snapkv.core.selection import select_topk
from snapkv.eval.methods import METHODS, applies
from snapkv.integration.hf import cache_argument
from snapkv.methods import AdaptiveHeads
from snapkv.methods.kvzip import KVzip, ReplayCache, kvzip_context_cache, kvzip_scores, kvzip_scores_reference
from tiny_models import tiny_model

PROMPT = [5, 6, 7, 8]


@pytest.mark.parametrize(("hq", "hkv", "c", "length", "block", "softcap"), [
    (4, 2, 7, 23, 5, None), (6, 3, 1, 1, 4096, None), (8, 1, 13, 50, 7, 5.0), (2, 2, 5, 64, 64, None)])
def test_chunk_scores_match_dense_reference(hq, hkv, c, length, block, softcap):
    gen = torch.Generator().manual_seed(hq * 100 + length)
    q = torch.randn(2, hq, c, 16, generator=gen) * 2
    k = torch.randn(2, hkv, length + c, 16, generator=gen)
    ref = replay_chunk_scores_reference(q, k, length, scaling=0.25, softcap=softcap)
    for max_logits in (0, 1 << 26):  # two passes over key blocks; one matmul
        got = replay_chunk_scores(q, k, length, scaling=0.25, softcap=softcap, key_block=block, max_logits=max_logits)
        assert got.shape == (2, hkv, length) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, atol=2e-6, rtol=1e-5)


def test_chunk_scores_reject_bad_shapes():
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="context 6"):
        replay_chunk_scores(q, k, 6, scaling=1.0)
    with pytest.raises(ValueError, match="key_block"):
        replay_chunk_scores(q, k, 7, scaling=1.0, key_block=0)
    with pytest.raises(ValueError, match="chunk"):
        replay_chunks(10, 0)


@pytest.mark.parametrize(("family", "length", "chunk", "overlap"), [
    ("llama", 37, 10, 3), ("qwen2", 29, 29, 0), ("qwen3", 41, 16, 8), ("mistral", 20, 7, 2)])
def test_kvzip_scores_match_dense_float64_replay(family, length, chunk, overlap):
    """Chunked replay with rollback (fp64 model, sdpa) == one eager forward of all replays with a block mask."""
    fast_model = tiny_model(family, "sdpa").double()
    ref_model = tiny_model(family, "eager").double()
    ids = torch.randint(3, 256, (2, length), generator=torch.Generator().manual_seed(length))
    # max_logits=0: every chunk takes the two-pass, key-blocked path; default: one matmul.
    max_logits = 0 if family in ("llama", "qwen3") else 1 << 26
    got = kvzip_scores(fast_model, ids, PROMPT, chunk=chunk, overlap=overlap, key_block=8, max_logits=max_logits)
    ref = kvzip_scores_reference(ref_model, ids, PROMPT, chunk=chunk, overlap=overlap)
    assert len(got) == len(ref) == fast_model.config.num_hidden_layers
    for g, r in zip(got, ref, strict=True):
        assert g.shape == (2, fast_model.config.num_key_value_heads, length)
        torch.testing.assert_close(g.double(), r, atol=5e-6, rtol=1e-5)  # fp32 scoring of an fp64 model
    # The scores separate positions (not a flat row that any selection would pass).
    assert float(got[0].std()) > 1e-3


def test_kvzip_scores_float32_model_close_to_float64_reference():
    model = tiny_model("llama", "sdpa")
    ref_model = tiny_model("llama", "eager").double()
    ids = torch.randint(3, 256, (1, 33), generator=torch.Generator().manual_seed(1))
    got = kvzip_scores(model, ids, PROMPT, chunk=9)
    ref = kvzip_scores_reference(ref_model, ids, PROMPT, chunk=9)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g.double(), r, atol=1e-4, rtol=1e-3)


def test_replay_is_scoped_and_rolled_back():
    model = tiny_model("llama", "sdpa")
    before_attn = dict(AttentionInterface._global_mapping)
    before_mask = dict(AttentionMaskInterface._global_mapping)
    ids = torch.randint(3, 256, (1, 19))
    cache = ReplayCache(model.config, 19 + 20)
    kvzip_scores(model, ids, PROMPT, chunk=8, cache=cache)
    assert cache.get_seq_length() == 19  # the context prefilled here, every replay rolled back
    assert model.config._attn_implementation == "sdpa"
    assert dict(AttentionInterface._global_mapping) == before_attn
    assert dict(AttentionMaskInterface._global_mapping) == before_mask
    # An exception inside the replay restores the model too.
    with pytest.raises(ValueError, match="cache holds"):
        kvzip_scores(model, torch.randint(3, 256, (1, 5)), PROMPT, chunk=8, cache=cache)
    bad = ReplayCache(model.config, 19 + 2)  # too small for a replay forward
    with pytest.raises(RuntimeError, match="replay buffer"):
        kvzip_scores(model, ids, PROMPT, chunk=8, cache=bad)
    assert model.config._attn_implementation == "sdpa"
    assert dict(AttentionInterface._global_mapping) == before_attn


def test_bad_arguments_raise_before_model_work():
    model = tiny_model("llama", "sdpa")
    ids = torch.randint(3, 256, (1, 10))
    with pytest.raises(ValueError, match="chunk"):
        kvzip_scores(model, ids, PROMPT, chunk=0)
    with pytest.raises(ValueError, match="overlap"):
        KVzip(overlap=-1)
    with pytest.raises(ValueError, match="context_ids"):
        kvzip_scores(model, ids[0], PROMPT)
    with pytest.raises(ValueError, match="all full attention"):
        kvzip_scores(tiny_model("gemma3", "sdpa"), ids, PROMPT)
    with pytest.raises(RuntimeError, match="fit"):
        KVzip().score(None)
    with pytest.raises(ValueError, match="precision"):
        KVzip(precision="bf16")
    with pytest.raises(ValueError, match="kernel"):
        KVzip(kernel=4)
    with pytest.raises(ValueError, match="mixed"):  # CUDA half-precision inputs only
        replay_chunk_scores(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 10, 8), 7, scaling=1.0, precision="mixed")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_context_cache_keeps_the_top_replay_scores(family):
    model = tiny_model(family, "sdpa")
    length, budget, window = 45, 16, 4
    ids = torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(3))
    config = SnapKVConfig(budget=budget, window=window)
    with torch.no_grad():
        cache, method = kvzip_context_cache(model, ids, PROMPT, config, chunk=11)
        assert model.config._attn_implementation != "sdpa"  # the cache holds SnapKV's attention function
        ref = kvzip_scores(model, ids, PROMPT, chunk=11)  # the model's own backend even so
        for layer, s, r in zip(cache.layers, method.scores, ref, strict=True):
            torch.testing.assert_close(s, r)
            assert layer.compressed and layer.keys.shape[-2] == budget
            want = select_topk(s, torch.tensor([budget]), window).indices
            assert torch.equal(layer.positions.long(), want)
            assert set(range(length - window, length)) <= set(layer.positions[0, 0].tolist())
        # A question continues at position L on the compressed cache.
        q = torch.randint(3, 256, (1, 3))
        out = model(input_ids=q, position_ids=torch.arange(length, length + 3)[None],
                    **{cache_argument(model): cache})
        assert torch.isfinite(out.logits).all()
        cache.close()
    assert model.config._attn_implementation == "sdpa"


def test_kvzip_scores_drive_head_adaptive_budgets():
    """The replay scores serve AdaKV's ragged selection too (AdaptiveHeads wrapper)."""
    model = tiny_model("llama", "sdpa")
    length = 40
    ids = torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(4))
    config = SnapKVConfig(budget=12, window=4)
    with torch.no_grad(), SnapKVCache(model, config, capture=True) as source:
        model(input_ids=ids, **{cache_argument(model): source})
        method = KVzip(chunk=16).fit(model, ids, PROMPT)
        cache = source.derive(AdaptiveHeads(method), config)
        for layer in cache.layers:
            lengths = layer.ragged.lengths  # per-head kept counts; the layer's total is the uniform one
            assert int(lengths.sum()) == 12 * lengths.numel() and lengths.min() >= 4
        cache.close()


def test_pooled_scores_keep_neighbours():
    """kernel=31 max-pools the replay scores along the sequence (the selection sees pooled scores)."""
    from snapkv.core.scoring import pool_votes
    from snapkv.methods.base import ScoreInputs

    scores = [torch.rand(1, 2, 50)]
    keys = torch.zeros(1, 2, 50, 4)
    inputs = ScoreInputs(queries=keys, keys=keys, key_valid=None, window=4, scaling=1.0)
    pooled = KVzip(kernel=31, scores=scores).score(inputs)
    assert torch.equal(pooled, pool_votes(scores[0], 31, "max"))
    assert torch.equal(KVzip(scores=scores).score(inputs), scores[0])


def test_eval_registry_runs_kvzip_in_context_mode_only():
    assert METHODS["kvzip"].replay
    assert applies("kvzip", "context")
    assert not applies("kvzip", "query") and not applies("kvzip", "probe")


def test_eval_kvzip_reuse_mode_on_one_prefill():
    """evaluate_sample fits KVzip on the context read off the whole-prompt capture; budgets share its scores."""
    from eval.helpers import byte_codec, tiny_gemma3, tiny_llama
    from snapkv.eval.engine import Setting, evaluate_sample
    from snapkv.eval.tasks import make_sample

    codec = byte_codec(chat=True)
    sample = make_sample("passkey", codec, 300, 1)
    settings = [Setting("kvzip", "context", 40), Setting("kvzip", "context", 0.5), Setting("snapkv", "context", 40),
                Setting("kvzip-k31", "context", 40)]
    outs = list(evaluate_sample(tiny_llama(), codec, sample, settings, window=8, max_new_tokens=3))
    assert [o.setting for o, _ in outs] == settings
    assert outs[0][0].kept_tokens == 40 and outs[1][0].kept_tokens == round(0.5 * len(sample.context_ids))
    assert outs[0][0].derive_s > 5 * max(outs[1][0].derive_s, outs[3][0].derive_s)  # one replay, shared
    with pytest.raises(ValueError, match="all full attention"):
        list(evaluate_sample(tiny_gemma3(), codec, sample, settings[:1], window=8, max_new_tokens=3))


# ---------------------------------------------------------------------------------------------
# Span-limited replay (KVzip(span=...)): each chunk sees the sink and span tokens either side.


@pytest.mark.parametrize(("family", "length", "chunk", "overlap", "span", "sink", "backend"), [
    ("llama", 53, 9, 2, 5, 3, "sdpa"), ("qwen3", 41, 8, 0, 0, 0, "sdpa"), ("mistral", 37, 10, 3, 12, 40, "sdpa"),
    ("llama", 40, 9, 2, 5, 3, "eager")])
def test_span_scores_match_dense_float64_replay(family, length, chunk, overlap, span, sink, backend):
    """Sliced-key replay (its mask sliced too; fp64) == one eager forward whose block mask hides the far context."""
    fast_model = tiny_model(family, backend).double()
    ref_model = tiny_model(family, "eager").double()
    ids = torch.randint(3, 256, (2, length), generator=torch.Generator().manual_seed(length))
    kw = dict(chunk=chunk, overlap=overlap, span=span, sink=sink)
    got = kvzip_scores(fast_model, ids, PROMPT, key_block=8, max_logits=0, **kw)
    ref = kvzip_scores_reference(ref_model, ids, PROMPT, **kw)
    exact = kvzip_scores(fast_model, ids, PROMPT, chunk=chunk, overlap=overlap)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g.double(), r, atol=5e-6, rtol=1e-5)
    # Hiding keys changes the scores (the test would pass vacuously if span were ignored).
    assert max(float((g - e).abs().max()) for g, e in zip(got, exact, strict=True)) > 1e-2


def test_span_at_least_context_is_exact_kvzip():
    model = tiny_model("llama", "sdpa")
    ids = torch.randint(3, 256, (1, 45), generator=torch.Generator().manual_seed(7))
    exact = KVzip(chunk=10).fit(model, ids, PROMPT).scores
    for span in (45, 1000):
        got = KVzip(chunk=10, span=span, sink=4).fit(model, ids, PROMPT).scores
        for g, e in zip(got, exact, strict=True):
            assert torch.equal(g, e)
    # One token short of the context: the first chunk no longer sees the last key.
    short = KVzip(chunk=10, span=34, sink=0).fit(model, ids, PROMPT).scores
    assert not all(torch.equal(g, e) for g, e in zip(short, exact, strict=True))


def test_span_far_key_gets_no_vote_and_the_rest_renormalise():
    """A far key the query cannot see scores 0; visible keys get their exact probability / visible mass."""
    d, length = 8, 30
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, d, generator=gen)
    k = torch.randn(1, 1, length + 1, d, generator=gen) * 0.3
    k[0, 0, 2] = q[0, 0, 0] * 3  # a far key the query attends to strongly
    visible = span_visible(length, 20, 24, 3, sink=0)  # chunk [20, 24): sees [17, 27) only
    assert visible == (0, 17, 27)
    assert span_visible(length, 5, 9, 3, sink=4) == (0, 0, 12)  # a sink reaching the window: one range
    exact = replay_chunk_scores(q, k, length, scaling=1.0)
    span = replay_chunk_scores(q, k, length, scaling=1.0, visible=visible)
    assert exact[0, 0, 2] > 0.5 and span[0, 0, 2] == 0  # no vote from a query that cannot see it
    assert torch.count_nonzero(span[0, 0, :17]) == 0 and torch.count_nonzero(span[0, 0, 27:]) == 0
    p = torch.softmax(torch.einsum("d,nd->n", q[0, 0, 0].double(), k[0, 0].double()), 0)
    mass = p[17:27].sum() + p[length]  # visible context keys and the chunk's own key
    torch.testing.assert_close(span[0, 0, 17:27].double(), p[17:27] / mass, rtol=1e-5, atol=1e-7)
    # With a sink the front keys are visible again: key 2 gets its (renormalised) vote back.
    with_sink = replay_chunk_scores(q, k, length, scaling=1.0, visible=span_visible(length, 20, 24, 3, sink=4))
    mass = p[:4].sum() + p[17:27].sum() + p[length]
    torch.testing.assert_close(with_sink[0, 0, 2].double(), p[2] / mass, rtol=1e-5, atol=1e-7)
    # The dense twin agrees; a running max keeps what earlier chunks gave the hidden keys.
    torch.testing.assert_close(span.double(), replay_chunk_scores_reference(q, k, length, scaling=1.0,
                                                                            visible=visible))
    prior = torch.full((1, 1, length), 0.01)
    acc = replay_chunk_scores(q, k, length, scaling=1.0, visible=visible, out=prior.clone())
    assert torch.equal(acc[0, 0, :17], prior[0, 0, :17])
    torch.testing.assert_close(acc, torch.maximum(span, prior))


def test_span_arguments_raise_before_model_work():
    model = tiny_model("llama", "sdpa")
    ids = torch.randint(3, 256, (1, 10))
    for kw, name in ((dict(span=-1), "span"), (dict(span=True), "span"), (dict(span=2.0), "span"),
                     (dict(sink=-1), "sink"), (dict(span=4, sink=None), "sink")):
        with pytest.raises(ValueError, match=f"{name} must be"):
            KVzip(**kw)
        with pytest.raises(ValueError, match=f"{name} must be"):
            kvzip_scores(model, ids, PROMPT, **kw)
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 13, 8)
    for bad in ((0, 5, 4), (3, 2, 6), (0, 0, 11), (0, 1)):
        with pytest.raises(ValueError, match="visible must"):
            replay_chunk_scores(q, k, 10, scaling=1.0, visible=bad)
    with pytest.raises(ValueError, match="chunk"):
        span_visible(10, 4, 12, 2)


def test_eval_kvzip_span_does_not_share_the_exact_replay():
    """fit_replay shares one replay between variants of the same replay only: span is part of it."""
    from snapkv.eval.methods import fit_replay

    assert METHODS["kvzip-span"].replay and METHODS["kvzip-span"].make().span is not None
    model = tiny_model("llama", "sdpa")
    length = 40
    ids = torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(5))

    class Codec:
        tail: tuple[int, ...] = (9,)

        def encode(self, text: str) -> list[int]:
            return [5, 6, 7]

    with torch.no_grad(), SnapKVCache(model, SnapKVConfig(budget=8, window=2), capture=True) as source:
        model(input_ids=ids, **{cache_argument(model): source})
        methods: dict = {}
        fit_replay(model, methods, "kvzip", source.captured, ids[0].tolist(), Codec())
        fit_replay(model, methods, "kvzip-span", source.captured, ids[0].tolist(), Codec())
        assert methods["kvzip-span"].scores is not methods["kvzip"].scores
