"""Every supported family, end to end: exact when nothing is removed, exact attention over the
kept keys when something is.

The compression reference is a dense attention function registered under a test-only name. It
runs the *uncompressed* model with a plain ``DynamicCache``: during the prefill it attends to the
whole prompt and records each full layer's post-RoPE queries, keys and values; during decoding
it hides, per KV head, the prompt positions that a selection dropped. The selection itself is
checked against the dense SnapKV reference of ``test_scoring``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.masking_utils import AttentionMaskInterface

from snapkv import SnapKVCache, SnapKVConfig, SnapKVSession
from snapkv.cache.compressed import CompressedLayer
from snapkv.core.selection import Selection
from snapkv.integration.hf import cache_argument
from test_scoring import check_selection, ref_scores
from tiny_models import FAMILIES, FULL_ONLY, HYBRID, SLIDING_WINDOW, greedy_generate, left_padded, tiny_model

pytestmark = pytest.mark.usefixtures("no_grad", "one_thread")

IMPLS = ("sdpa", "eager")
_ids = itertools.count()


# -- the reference -------------------------------------------------------------------------


class RefAttention:
    """Dense eager attention over the full KV that can hide dropped prompt positions per KV head.

    Attributes:
        recorded: ``{layer: (queries, keys, values, scaling, softcap)}`` of each full layer's prefill.
        keep: ``{layer: [B, Hkv, L] bool}`` prompt positions decoding may see (unset: all).
    """

    def __init__(self, model: torch.nn.Module, cache: DynamicCache) -> None:
        self.model, self.cache = model, cache
        self.recorded: dict[int, tuple] = {}
        self.keep: dict[int, torch.Tensor] = {}
        self.name = f"snapkv_test_ref_{next(_ids)}"
        self.original = model.config._attn_implementation

    def __enter__(self) -> RefAttention:
        AttentionInterface.register(self.name, self.attention)
        AttentionMaskInterface.register(self.name, AttentionMaskInterface._global_mapping["eager"])
        self.model.set_attn_implementation(self.name)
        return self

    def __exit__(self, *exc: object) -> None:
        self.model.set_attn_implementation(self.original)
        AttentionInterface._global_mapping.pop(self.name, None)
        AttentionMaskInterface._global_mapping.pop(self.name, None)

    def attention(self, module, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs):
        b, hq, q_len, d = query.shape
        hkv, k_len = key.shape[1], key.shape[2]
        scaling = module.head_dim**-0.5 if scaling is None else scaling
        layer = module.layer_idx
        full = not self.cache.layers[layer].is_sliding
        if full and q_len == k_len:  # the prefill of a full layer: record what SnapKV scores
            self.recorded[layer] = (query.clone(), key.clone(), value.clone(), scaling, softcap)
        g = hq // hkv
        logits = query @ key.repeat_interleave(g, 1).transpose(-1, -2) * scaling  # [B, Hq, q, K]
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        if attention_mask is None:
            q_pos = k_len - q_len + torch.arange(q_len)
            allowed = (torch.arange(k_len)[None, :] <= q_pos[:, None])[None, None]
        else:
            mask = attention_mask[..., :k_len]
            allowed = mask if mask.dtype == torch.bool else mask == 0
        if full and q_len < k_len and layer in self.keep:  # decoding: only the kept prompt positions
            kept = self.keep[layer]  # [B, Hkv, L]
            appended = torch.ones(b, hkv, k_len - kept.shape[-1], dtype=torch.bool)
            allowed = allowed & torch.cat([kept, appended], -1).repeat_interleave(g, 1)[:, :, None, :]
        logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
        probs = torch.softmax(logits.float(), dim=-1).to(value.dtype)
        out = probs @ value.repeat_interleave(g, 1)  # [B, Hq, q, D]
        return out.transpose(1, 2).contiguous(), probs


def _kw(model, cache):
    return {cache_argument(model): cache}


def _greedy_loop(model, ids, mask, cache, steps, tokens=None):
    """Prefill then ``steps`` one-token forwards without position ids; returns logits per step.

    With ``tokens`` ([B, steps]) the fed tokens are forced, otherwise they are the argmax.
    """
    out = model(input_ids=ids, attention_mask=mask, **_kw(model, cache))
    logits = [out.logits[:, -1]]
    fed = []
    for t in range(steps):
        nxt = tokens[:, t : t + 1] if tokens is not None else logits[-1].argmax(-1, keepdim=True)
        fed.append(nxt)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        out = model(input_ids=nxt, attention_mask=mask, **_kw(model, cache))
        logits.append(out.logits[:, -1])
    return out, torch.stack(logits, 1), torch.cat(fed, 1) if fed else None


_generate = greedy_generate


# -- nothing removed: identical logits ------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_budget_above_prompt_is_exact(family, impl):
    model = tiny_model(family, impl)
    ids, mask = left_padded([40, 27], seed=1)
    steps = 4
    ref_prefill = model(input_ids=ids, attention_mask=mask).logits
    ref_gen = _generate(model, ids, mask, steps)
    _, ref_loop, ref_tokens = _greedy_loop(model, ids, mask, DynamicCache(config=model.config), steps)

    with SnapKVSession(model, SnapKVConfig(budget=64, window=8, kernel=5)) as session:
        cache = session.new_cache()
        prefill = model(input_ids=ids, attention_mask=mask, **session.cache_kwargs(cache)).logits
        assert cache.compressed_layers() == []
        torch.testing.assert_close(prefill, ref_prefill, rtol=0, atol=1e-6)

        gen = _generate(model, ids, mask, steps, **session.cache_kwargs(session.new_cache()))
        assert torch.equal(gen.sequences, ref_gen.sequences)
        torch.testing.assert_close(torch.stack(gen.logits), torch.stack(ref_gen.logits), rtol=0, atol=1e-6)

        cache = session.new_cache()
        _, loop, tokens = _greedy_loop(model, ids, mask, cache, steps)
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(loop, ref_loop, rtol=0, atol=1e-6)
        assert cache.get_seq_length() == ids.shape[1] + steps
    assert model.config._attn_implementation == ("eager" if family == "gemma2" else impl)


# -- something removed: attention over exactly the kept keys ------------------------------------


def _check_compressed_layers(model, cache, ref, cfg, mask, appended):
    """Layer types, kept counts, positions and gathered KV of a compressed cache."""
    n_keep = mask.sum(-1).clamp(max=cfg.budget)
    for i, layer in enumerate(cache.layers):
        if ref.cache.layers[i].is_sliding:
            assert type(layer) is DynamicSlidingWindowLayer, f"sliding layer {i} is {type(layer).__name__}"
            assert layer.keys.shape[-2] <= SLIDING_WINDOW
            continue
        assert isinstance(layer, CompressedLayer) and layer.compressed, f"full layer {i} not compressed"
        q, k, v, scaling, softcap = ref.recorded[i]
        b, hkv = k.shape[:2]
        p = layer.positions.shape[-1]
        assert p == int(n_keep.max())
        assert layer.keys.shape == (b, hkv, p + appended, k.shape[-1])
        assert torch.equal(layer.slot_valid().sum(-1), n_keep + appended)  # min(L, budget) real + appended
        assert torch.equal(layer.pad, p - n_keep)
        key_valid = mask.bool() if not mask.all() else None
        want = ref_scores(
            q[:, :, -cfg.window :], k, key_valid, scaling=scaling, kernel=cfg.kernel, pooling=cfg.pooling,
            reduce=cfg.gqa_reduce, softcap=softcap,
        )
        check_selection(Selection(layer.positions.long(), layer.pad), want, n_keep, cfg.window, key_valid, tol=1e-5)
        for r in range(b):
            pad = int(layer.pad[r])
            for h in range(hkv):
                pos = layer.positions[r, h, pad:].long()
                assert torch.all(pos[1:] > pos[:-1])
                # kept KV are the prompt's post-RoPE KV at the kept positions, rotation untouched
                # (the reference ran its own attention, so deeper layers differ by rounding)
                torch.testing.assert_close(layer.keys[r, h, pad:p], k[r, h, pos], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(layer.values[r, h, pad:p], v[r, h, pos], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths", [[40], [41, 29]], ids=["single", "padded"])
def test_compressed_decode_attends_to_exactly_the_kept_keys(family, impl, lengths):
    model = tiny_model(family, impl)
    ids, mask = left_padded(lengths, seed=2)
    cfg = SnapKVConfig(budget=20, window=6, kernel=5)
    steps = 4

    with SnapKVSession(model, cfg) as session:
        cache = session.new_cache()
        _, logits, tokens = _greedy_loop(model, ids, mask, cache, steps)
        assert cache.get_seq_length() == ids.shape[1] + steps  # positions continue at the original length
        # then several tokens in one forward (a follow-up question): causal among themselves
        chunk = torch.randint(3, 256, (ids.shape[0], 3), generator=torch.Generator().manual_seed(4))
        chunk_mask = torch.ones(ids.shape[0], ids.shape[1] + steps + 3, dtype=mask.dtype)
        chunk_mask[:, : ids.shape[1]] = mask
        chunk_logits = model(input_ids=chunk, attention_mask=chunk_mask, **session.cache_kwargs(cache)).logits
        assert cache.get_seq_length() == ids.shape[1] + steps + 3
    plain_prefill = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    torch.testing.assert_close(logits[:, 0], plain_prefill, rtol=0, atol=1e-6)  # the prefill saw everything

    ref_cache = DynamicCache(config=model.config)
    with RefAttention(model, ref_cache) as ref:
        first = model(input_ids=ids, attention_mask=mask, **_kw(model, ref_cache)).logits[:, -1]
        torch.testing.assert_close(first, logits[:, 0], rtol=1e-5, atol=1e-5)
        if family in HYBRID:
            assert type(cache.layers[0]) is DynamicSlidingWindowLayer
        if family == "mistral_sw":  # every layer slides: nothing to compress
            assert cache.compressed_layers() == []
        else:
            assert cache.compressed_layers() == [i for i, lay in enumerate(ref_cache.layers) if not lay.is_sliding]
        _check_compressed_layers(model, cache, ref, cfg, mask, steps + 3)
        for i in cache.compressed_layers():
            layer = cache.layers[i]
            pos = layer.positions.long()  # [B, Hkv, P]; filler slots hold 0 and must not count
            real_slot = layer.slot_valid()[:, None, : pos.shape[-1]].expand_as(pos).long()
            hits = torch.zeros(*pos.shape[:2], ids.shape[1], dtype=torch.long).scatter_add_(2, pos, real_slot)
            ref.keep[i] = hits > 0
        m = mask
        for t in range(steps):
            m = torch.cat([m, torch.ones_like(tokens[:, :1])], dim=1)
            step = model(input_ids=tokens[:, t : t + 1], attention_mask=m, **_kw(model, ref_cache)).logits[:, -1]
            torch.testing.assert_close(step, logits[:, t + 1], rtol=1e-5, atol=1e-5)
        ref_chunk = model(input_ids=chunk, attention_mask=chunk_mask, **_kw(model, ref_cache)).logits
        torch.testing.assert_close(ref_chunk, chunk_logits, rtol=1e-5, atol=1e-5)
    assert ref_cache.get_seq_length() == cache.get_seq_length()

    if family not in ("mistral_sw",):  # removing tokens must change something, or the test proves nothing
        ref_cache = DynamicCache(config=model.config)
        _, full_logits, _ = _greedy_loop(model, ids, mask, ref_cache, steps, tokens=tokens)
        assert not torch.allclose(full_logits[:, 1:], logits[:, 1:], atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_generate_under_compression_matches_the_manual_loop(family):
    model = tiny_model(family)
    ids, mask = left_padded([37], seed=3)
    with SnapKVSession(model, SnapKVConfig(budget=18, window=5, kernel=3)) as session:
        gen = _generate(model, ids, mask, 5, **session.cache_kwargs(session.new_cache()))
        _, loop, tokens = _greedy_loop(model, ids, mask, session.new_cache(), 4)
    assert torch.equal(gen.sequences[:, ids.shape[1] :], torch.cat([tokens, loop[:, -1].argmax(-1, keepdim=True)], 1))
    torch.testing.assert_close(torch.stack(gen.logits, 1), loop, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FULL_ONLY)
def test_snapkv_cache_layer_types(family):
    model = tiny_model(family)
    cache = SnapKVCache(config=model.config)
    assert all(type(layer) is CompressedLayer for layer in cache.layers)
    assert len(cache.layers) == model.config.num_hidden_layers
