"""KVzip replay scores: the chunked scorer against dense float64 twins, scoping, selection, eval wiring."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from snapkv.cache.compressed import SnapKVCache
from snapkv.config import SnapKVConfig
from snapkv.core.replay import replay_chunk_scores, replay_chunk_scores_reference, replay_chunks
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
