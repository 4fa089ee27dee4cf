"""Document-cache prefills: compress a context alone (query-agnostic), then feed a question after it.

:func:`compress_context` keeps the budget of context tokens per layer and head, scored by the
document method (:func:`doc_method`, ``snapkv serve --doc-method``):

* ``probe`` (default, :class:`~snapkv.methods.Probe`): the engine's layer-bounded
  :func:`~snapkv.generation.prefill` runs on the context followed by a probe question
  (:data:`snapkv.methods.DEFAULT_PROBE`); the probe is the observation window of the probe's
  SnapKV scorer (kernel 31 by default), so it votes for the context tokens any question is
  likely to need; then the probe's own tokens are cut.
* ``kvzip`` (:class:`~snapkv.methods.kvzip.KVzip`): the context is prefilled and replayed
  after "Repeat the previous context:" through the model's transformers forward
  (:func:`~snapkv.methods.kvzip.kvzip_context_cache`); the replay's attention scores select.

:func:`extend` feeds the tokens after the context (the question, chat suffix) through every
layer against the kept context K/V (bottom-right causal attention), at their original
positions, and returns a 1-row static cache holding the kept context plus all of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from snapkv.config import SnapKVConfig
from snapkv.generation.adapter import DecoderParts
from snapkv.generation.attention import causal_chunk_attention
from snapkv.generation.prefill import kept_per_layer, prefill
from snapkv.generation.static_cache import StaticKVCache
from snapkv.methods.base import Method
from snapkv.methods.kvzip import DEFAULT_REPLAY_PROMPT, KVzip, kvzip_context_cache
from snapkv.methods.probe import REUSE_KERNEL, Probe, probe_config, probe_selector
from snapkv.methods.snapkv import SnapKV
from snapkv.serve.doc_cache import DocEntry

#: Document methods by name (``snapkv serve --doc-method``).
DOC_METHODS: tuple[str, ...] = ("probe", "kvzip")

DocMethod = Probe | KVzip


def method_for(config: SnapKVConfig) -> SnapKV:
    """The SnapKV scorer of a config."""
    return SnapKV(kernel=config.kernel, pooling=config.pooling, gqa_reduce=config.gqa_reduce,
                  chunk_size=config.chunk_size)


def doc_method(name: str = "probe", kernel: int = REUSE_KERNEL) -> DocMethod:
    """The document method ``name`` with pooling ``kernel`` (``ValueError`` naming the bad one).

    ``probe``: ``Probe(SnapKV(kernel=kernel))``; ``kvzip``: ``KVzip(kernel=kernel)`` (replay
    scores max-pooled over ``kernel`` positions; 1 leaves them as they are).
    """
    if name not in DOC_METHODS:
        raise ValueError(f"doc_method (--doc-method) must be one of {DOC_METHODS}, got {name!r}")
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"doc_kernel (--doc-kernel) must be a positive odd integer (1, 3, 5, ...), got {kernel!r}")
    return Probe(SnapKV(kernel=kernel)) if name == "probe" else KVzip(kernel=kernel)


def doc_token_ids(method: DocMethod, tokenizer: Any) -> list[int]:
    """What the document method reads after the context: the probe question, or the replay instruction."""
    text = method.text if isinstance(method, Probe) else DEFAULT_REPLAY_PROMPT
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_doc_method(method: object, profile: str) -> None:
    """``ValueError`` unless ``method`` is a document method the layer ``profile`` allows."""
    if not isinstance(method, (Probe, KVzip)):
        raise ValueError(f"doc_method must be a Probe or a KVzip, got {type(method).__name__}")
    if isinstance(method, Probe) and type(method.method) is not SnapKV:
        raise ValueError(f"doc_method: the document cache stores dense K/V, so a Probe's method must be a plain "
                         f"SnapKV, got {type(method.method).__name__}")
    if isinstance(method, KVzip) and profile != "uniform":
        raise ValueError(f"the kvzip document method selects with uniform layer budgets; got layer profile "
                         f"{profile!r} (use --layer-profile uniform or --doc-method probe)")


def _tail(method: DocMethod | None) -> int | None:
    """The probe's tail (``Probe.tail``; None: the config's window, also for KVzip's kept window)."""
    return method.tail if isinstance(method, Probe) else None


def new_row_cache(parts: DecoderParts, kept: list[int]) -> StaticKVCache:
    """A 1-row static cache with room for ``max(kept)`` prompt tokens (and one more slot)."""
    return StaticKVCache(parts.num_layers, 1, parts.num_kv_heads, parts.head_dim, max(kept), 1,
                         dtype=parts.dtype, device=parts.device)


def context_slots(config: SnapKVConfig, context_tokens: int, probe_tokens: int, num_layers: int,
                  profile: str, method: DocMethod | None = None) -> int:
    """Kept context tokens of the largest layer (what :func:`compress_context` stores)."""
    if isinstance(method, KVzip):  # the context's own last window tokens are kept, uniform budgets
        return min(config.kept_tokens(context_tokens), context_tokens)
    probed = probe_config(config, context_tokens, probe_tokens, _tail(method))
    if probed is None:
        return context_tokens
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
    method: DocMethod | None = None,
) -> DocEntry:
    """The context's kept K/V per layer, scored context-only by ``method``.

    Args:
        parts: the engine's view of the model.
        context: the context's token ids.
        probe: what ``method`` reads after the context (:func:`doc_token_ids`): the probe
            question's ids (``Probe``: the observation window, then cut) or the replay
            instruction's (``KVzip``).
        config: the budget and window; with ``method=None`` also the probe's SnapKV scoring.
        method: :class:`~snapkv.methods.Probe` or :class:`~snapkv.methods.kvzip.KVzip`
            (:func:`doc_method`); None: a probe scored with ``config``'s settings.
        profile, chunk, backend, whole_layer_bytes: the engine prefill's (``Probe``).
    """
    if not probe:
        raise ValueError("probe must hold at least one token")
    if method is not None:
        check_doc_method(method, profile)
    if isinstance(method, Probe):
        s = method.method
        config = dataclasses.replace(config, kernel=s.kernel, pooling=s.pooling, gqa_reduce=s.gqa_reduce,
                                     chunk_size=s.chunk_size)
    n, g = len(context), len(probe)
    probed = probe_config(config, n, g, _tail(method))  # the probe votes, the tail stays, the probe is cut
    selector: Method = method_for(config)
    if probed is None:  # the whole context fits its budget: nothing to select, no probe needed
        ids, drop = context, 0
    elif isinstance(method, KVzip):
        return _compress_replay(parts, context, probe, config, method)
    else:  # the probe's votes, the context's last tail tokens kept
        ids, drop, selector = context + probe, g, probe_selector(selector, config, _tail(method))
    kept = kept_per_layer(probed, len(ids), parts.num_layers, profile)
    cache = new_row_cache(parts, kept)
    row = torch.tensor(ids, dtype=torch.long, device=parts.device)
    prefill(parts, [row], cache, config=probed, method=selector, layer_profile=profile,
            chunk=chunk, backend=backend, whole_layer_bytes=whole_layer_bytes)
    p = cache.prompt_slots
    keys = tuple(cache.keys[li, 0, :, p - kept[li] : p - drop].clone() for li in range(parts.num_layers))
    values = tuple(cache.values[li, 0, :, p - kept[li] : p - drop].clone() for li in range(parts.num_layers))
    return DocEntry(keys, values, n)


def _compress_replay(parts: DecoderParts, context: list[int], prompt: list[int], config: SnapKVConfig,
                     method: KVzip) -> DocEntry:
    """KVzip: the context's kept K/V by its replay scores (the model's transformers forward)."""
    ids = torch.tensor([context], dtype=torch.long, device=parts.device)
    cache, _ = kvzip_context_cache(parts.model, ids, prompt, config, method=method)
    try:
        keys = tuple(layer.keys[0].contiguous().clone() for layer in cache.layers)  # [Hkv, kept, D]
        values = tuple(layer.values[0].contiguous().clone() for layer in cache.layers)
    finally:
        cache.close()
    return DocEntry(keys, values, len(context))


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
