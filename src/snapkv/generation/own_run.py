"""Prefill and decode through the model's own decoder layers (see :mod:`.own_layers`).

Prefill, one row at a time and one layer at a time (one layer's full KV alive at a time):
the layer's own forward runs on row chunks of the residual stream; our cache object
(:class:`_PrefillKV`) collects the chunk's post-RoPE keys and values, and our attention
function attends the chunk's queries to the keys so far (bottom-right causal, the layer's
window and soft-cap) and keeps the observation window's queries as they pass. After the last
chunk the layer is scored and selected with the project's method (full layers; a sliding
layer keeps its last ``window - 1`` tokens, all that its next query can see), written into the
static cache, and its full KV freed.

Decode: each layer's own forward on one token per row; our cache object
(:class:`_StaticLayer`) writes the new K/V into slot ``write_pos`` with ``index_copy_`` and
returns the layer's whole buffers; our attention (:class:`DecodeAttention`) attends over them
with the cache's bias. A sliding layer attends to the ``W`` slots ending at ``write_pos`` only,
gathered on the device: a row's slot minus its position is the same for every token of the row
(its kept prompt tokens are right-aligned and contiguous), so the window is the same slot range
for all rows. Fixed shapes, no host sync: the engine's
:class:`~snapkv.generation.decode.DecodeRunner` captures :meth:`OwnLayers.decode_step` as a CUDA
graph; :meth:`OwnLayers.compile_decode` compiles it first (opt-in).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from snapkv.generation.attention import decode_attention
from snapkv.generation.own_attention import (
    AttentionSettings,
    attention_settings,
    chunk_attention,
    decode_attention_capped,
)
from snapkv.generation.own_layers import OwnLayers, own_attention
from snapkv.generation.prefill import PhaseTimer, select_layer, store_layer
from snapkv.generation.static_cache import PromptStaging, StaticKVCache
from snapkv.methods.base import Method, ScoreInputs


def _check_kind(parts: OwnLayers, li: int, settings: AttentionSettings) -> None:
    """The layer's own sliding window must be the one the engine planned the cache for."""
    want = parts.sliding_window if parts.kinds[li] == "sliding" else None
    if settings.sliding_window != want:
        raise RuntimeError(
            f"layer {li} attends with sliding_window={settings.sliding_window}, the engine planned {want}"
        )


# -- prefill ------------------------------------------------------------------------------------


class _PrefillKV:
    """The layer's cache during one row's prefill: collects K/V chunk by chunk.

    Also the state our attention function reads: the observation window's queries and the
    settings the layer attended with.
    """

    def __init__(self, parts: OwnLayers, li: int, n: int, window: int, ref: torch.Tensor, backend: str) -> None:
        hkv, d = parts.num_kv_heads, parts.head_dim
        self.parts, self.li, self.n, self.window, self.backend = parts, li, n, window, backend
        self.keys = torch.empty((1, hkv, n, d), dtype=ref.dtype, device=ref.device)
        self.values = torch.empty_like(self.keys)
        self.filled = 0
        self.q_win = (torch.empty((1, parts.num_heads, window, d), dtype=ref.dtype, device=ref.device)
                      if window else None)
        self.settings: AttentionSettings | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the chunk's ``[1, Hkv, c, D]`` K/V; return every key and value so far."""
        if layer_idx != self.li:
            raise RuntimeError(f"layer {layer_idx} updated the cache of layer {self.li}")
        s, c = self.filled, key_states.shape[-2]
        self.keys[:, :, s : s + c] = key_states
        self.values[:, :, s : s + c] = value_states
        self.filled = s + c
        return self.keys[:, :, : s + c], self.values[:, :, : s + c]

    def attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               kwargs: dict[str, Any]) -> torch.Tensor:
        settings = attention_settings(module, kwargs)
        _check_kind(self.parts, self.li, settings)
        self.settings = settings
        e, c, n, w = key.shape[-2], query.shape[-2], self.n, self.window
        if self.q_win is not None and e > n - w:  # keep the window's queries as they pass
            lo = max(e - c, n - w)
            self.q_win[:, :, lo - (n - w) : e - (n - w)] = query[:, :, lo - (e - c) :]
        out = chunk_attention(query, key, value, settings, self.backend)  # [1, Hq, c, D]
        return out.transpose(1, 2)


def own_prefill_row(
    parts: OwnLayers,
    ids: torch.Tensor,
    cache: StaticKVCache | PromptStaging,
    row: int,
    *,
    kept: Sequence[int],
    method: Method,
    window: int,
    chunk: int,
    backend: str,
    timer: PhaseTimer,
    num_layers: int | None = None,
) -> torch.Tensor:
    """Prefill one prompt ``ids [n]`` into ``cache`` row ``row``; returns its last logits ``[V]``.

    ``kept`` holds the prompt tokens each layer keeps (:meth:`OwnLayers.kept_per_layer`);
    ``window`` is the observation window; only the first ``num_layers`` layers run (benchmarks).
    """
    n = ids.numel()
    depth = parts.num_layers if num_layers is None else num_layers
    positions = torch.arange(n, device=ids.device)[None]  # [1, n]
    spans = [(s, min(n, s + chunk)) for s in range(0, n, chunk)]
    active: list[_PrefillKV | None] = [None]

    def attention(module, query, key, value, attention_mask, **kwargs):
        if active[0] is None:
            raise RuntimeError("the engine's prefill attention ran outside a prefill")
        return active[0].attend(module, query, key, value, kwargs), None

    with own_attention(parts.model, attention):
        timer.start("embed")
        x = parts.embed(ids[None])  # [1, n, H]: the residual stream, overwritten chunk by chunk
        for li in range(depth):
            compress = parts.kinds[li] == "full" and kept[li] < n
            w = min(window, n) if compress else 0
            kv = _PrefillKV(parts, li, n, w, x, backend)
            active[0] = kv
            timer.start("layers")
            for s, e in spans:
                pe = parts.rope(x[:, s:e], positions[:, s:e])
                x[:, s:e] = parts.run_layer(li, x[:, s:e], pe, positions[:, s:e], kv)
            active[0] = None
            keys, values = kv.keys, kv.values
            if compress:
                timer.start("score")
                st = kv.settings
                inputs = ScoreInputs(kv.q_win, keys, None, w, st.scaling, st.softcap, li)
                keys, values, counts = select_layer(method, inputs, values, kept[li])
            else:  # a sliding layer's last window - 1 tokens, or a full layer's whole prompt
                keys, values, counts = keys[:, :, n - kept[li] :], values[:, :, n - kept[li] :], None
            timer.start("cache")
            store_layer(cache, li, row, keys, values, counts)
            del kv, keys, values  # this layer's full KV is gone before the next layer starts
    timer.start("logits")
    logits = parts.logits(x[:, -1:])[0, -1]  # [V]
    timer.stop()
    return logits


# -- decode -------------------------------------------------------------------------------------


class _StaticLayer:
    """One layer's view of the static cache as the layer's cache: writes at ``write_pos``."""

    def __init__(self, cache: StaticKVCache, li: int) -> None:
        self.cache, self.li = cache, li

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[B, Hkv, 1, D]`` into slot ``write_pos`` (in place); return the layer's buffers."""
        if layer_idx != self.li:
            raise RuntimeError(f"layer {layer_idx} updated the cache of layer {self.li}")
        self.cache.append(self.li, key_states, value_states)
        return self.cache.keys[self.li], self.cache.values[self.li]


class DecodeAttention:
    """Our attention for decode steps: one query per row against the static cache's buffers.

    One object per :class:`OwnLayers` (registered under one name), so a compiled decode body's
    guards stay valid from step to step; :func:`decode_body` points it at the step's cache and
    sets the step's window: sliding layers attend to the ``W`` slots ending at ``write_pos``
    only (gathered, when the cache holds more slots than the window), masked where a slot
    precedes slot 0.
    """

    def __init__(self, parts: OwnLayers) -> None:
        self.parts = parts
        self.cache: StaticKVCache | None = None
        self.window_slots: torch.Tensor | None = None  # [W] slots of the window (None: every slot is in it)
        self.window_bias: torch.Tensor | None = None  # [W] fp32: -inf where a window slot precedes slot 0

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        parts, cache = self.parts, self.cache
        li = module.layer_idx
        settings = attention_settings(module, kwargs)
        _check_kind(parts, li, settings)
        bias = cache.bias[li]  # [B, Hkv, cap]
        if settings.sliding_window is not None and self.window_slots is not None:  # [B, Hkv, W(, D)]
            key, value = key.index_select(2, self.window_slots), value.index_select(2, self.window_slots)
            bias = bias.index_select(2, self.window_slots) + self.window_bias
        if settings.softcap is None:
            out = decode_attention(query, key, value, bias, settings.scaling)
        else:
            out = decode_attention_capped(query, key, value, bias, settings.scaling, settings.softcap)
        return out.view(query.shape[0], 1, parts.num_heads, parts.head_dim), None


def decode_body(parts: OwnLayers, cache: StaticKVCache, tokens: torch.Tensor, attn: DecodeAttention) -> torch.Tensor:
    """The decode step's work, with ``attn`` already registered as the model's attention."""
    cache.open_slot()
    x = parts.embed(tokens[:, None])  # [B, 1, H]
    positions = cache.positions[:, None]  # [B, 1]
    pe = parts.rope(x, positions)
    attn.cache = cache
    w = parts.sliding_window
    attn.window_slots = None  # a cache of at most W slots: no slot can leave the window
    if w is not None and cache.capacity > w:  # slots write_pos - W + 1 .. write_pos (all rows)
        slots = cache.write_pos - (w - 1) + torch.arange(w, device=x.device)
        attn.window_slots = slots.clamp(min=0)
        attn.window_bias = torch.zeros(w, device=x.device).masked_fill(slots < 0, float("-inf"))
    for li in range(parts.num_layers):
        x = parts.run_layer(li, x, pe, positions, _StaticLayer(cache, li))
    logits = parts.logits(x)[:, -1]  # [B, V]
    cache.advance()
    return logits


def decode_step(parts: OwnLayers, cache: StaticKVCache, tokens: torch.Tensor) -> torch.Tensor:
    """One token per row through the model's own layers; returns logits ``[B, V]``.

    Capturable: fixed shapes, device counters only, no host sync. Runs the compiled body when
    :meth:`OwnLayers.compile_decode` was called.
    """
    b = tokens.shape[0]
    if b != cache.batch:
        raise ValueError(f"decode got {b} tokens for a cache of {cache.batch} rows")
    attn = parts.decode_attention()
    with own_attention(parts.model, attn, name=parts.attention_name):
        return (parts.compiled_body or decode_body)(parts, cache, tokens, attn)
