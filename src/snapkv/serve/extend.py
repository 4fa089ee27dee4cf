"""Document-cache prefills: compress a context alone (with a probe), then feed a question after it.

:func:`compress_context` runs the engine's layer-bounded :func:`~snapkv.generation.prefill`
on the context followed by a probe question (:data:`snapkv.api.DEFAULT_PROBE`): the probe is
the observation window, so it votes for the context tokens any question is likely to need;
then the probe's own tokens are cut, leaving the budget of context tokens per layer and head.

:func:`extend` feeds the tokens after the context (the question, chat suffix) through every
layer against the kept context K/V (bottom-right causal attention), at their original
positions, and returns a 1-row static cache holding the kept context plus all of them.
"""

from __future__ import annotations

import dataclasses

import torch

from snapkv.config import SnapKVConfig
from snapkv.generation.adapter import DecoderParts
from snapkv.generation.attention import causal_chunk_attention
from snapkv.generation.prefill import kept_per_layer, prefill
from snapkv.generation.static_cache import StaticKVCache
from snapkv.methods.snapkv import SnapKV
from snapkv.serve.doc_cache import DocEntry


def method_for(config: SnapKVConfig) -> SnapKV:
    """The SnapKV scorer of a config."""
    return SnapKV(kernel=config.kernel, pooling=config.pooling, gqa_reduce=config.gqa_reduce,
                  chunk_size=config.chunk_size)


def new_row_cache(parts: DecoderParts, kept: list[int]) -> StaticKVCache:
    """A 1-row static cache with room for ``max(kept)`` prompt tokens (and one more slot)."""
    return StaticKVCache(parts.num_layers, 1, parts.num_kv_heads, parts.head_dim, max(kept), 1,
                         dtype=parts.dtype, device=parts.device)


def context_slots(config: SnapKVConfig, context_tokens: int, probe_tokens: int, num_layers: int,
                  profile: str) -> int:
    """Kept context tokens of the largest layer (what :func:`compress_context` stores)."""
    keep = config.kept_tokens(context_tokens, window=probe_tokens)
    if keep >= context_tokens:
        return context_tokens
    probed = dataclasses.replace(config, budget=keep + probe_tokens, window=probe_tokens)
    return max(kept_per_layer(probed, context_tokens + probe_tokens, num_layers, profile)) - probe_tokens


@torch.inference_mode()
def compress_context(
    parts: DecoderParts,
    context: list[int],
    probe: list[int],
    config: SnapKVConfig,
    *,
    profile: str = "uniform",
    chunk: int = 8192,
    backend: str = "ref",
    whole_layer_bytes: int = 0,
) -> DocEntry:
    """The context's kept K/V per layer, scored with ``probe`` as the window (context-only)."""
    if not probe:
        raise ValueError("probe must hold at least one token")
    n, g = len(context), len(probe)
    keep = config.kept_tokens(n, window=g)
    if keep >= n:  # the whole context fits its budget: nothing to select, no probe needed
        probed, ids, drop = None, context, 0
    else:
        probed, ids, drop = dataclasses.replace(config, budget=keep + g, window=g), context + probe, g
    kept = kept_per_layer(probed, len(ids), parts.num_layers, profile)
    cache = new_row_cache(parts, kept)
    row = torch.tensor(ids, dtype=torch.long, device=parts.device)
    prefill(parts, [row], cache, config=probed, method=method_for(config), layer_profile=profile,
            chunk=chunk, backend=backend, whole_layer_bytes=whole_layer_bytes)
    p = cache.prompt_slots
    keys = tuple(cache.keys[li, 0, :, p - kept[li] : p - drop].clone() for li in range(parts.num_layers))
    values = tuple(cache.values[li, 0, :, p - kept[li] : p - drop].clone() for li in range(parts.num_layers))
    return DocEntry(keys, values, n)


@torch.inference_mode()
def extend(
    parts: DecoderParts, entry: DocEntry, suffix: list[int], backend: str = "ref"
) -> tuple[StaticKVCache, torch.Tensor]:
    """Feed ``suffix`` after a compressed context: ``(1-row cache of kept context + suffix, logits [V])``."""
    if not suffix:
        raise ValueError("the prompt must have at least one token after the cached context")
    s, start = len(suffix), entry.context_tokens
    cache = new_row_cache(parts, [k.shape[-2] + s for k in entry.keys])
    ids = torch.tensor([suffix], dtype=torch.long, device=parts.device)
    positions = torch.arange(start, start + s, device=parts.device)[None]  # [1, s]
    x = parts.embed(ids)  # [1, s, H]
    for li, layer in enumerate(parts.layers):
        h = layer.input_layernorm(x)
        cos, sin = parts.rope(h, positions)
        q = parts.queries(li, h, cos, sin)  # [1, Hq, s, D]
        k, v = parts.keys_values(li, h, cos, sin)  # [1, Hkv, s, D]
        keys = torch.cat([entry.keys[li][None], k], dim=2)  # [1, Hkv, kept + s, D]
        values = torch.cat([entry.values[li][None], v], dim=2)
        o = causal_chunk_attention(q, keys, values, parts.scaling, backend)  # [1, Hq, s, D]
        x = x + layer.self_attn.o_proj(o.transpose(1, 2).reshape(1, s, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        cache.load(li, 0, keys[0], values[0])
    cache.set_prompt_length(0, start + s)
    logits = parts.lm_head(parts.norm(x[:, -1:]))[0, -1]  # [V]
    return cache, logits
