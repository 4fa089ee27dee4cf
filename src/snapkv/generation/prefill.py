"""Layer-bounded prefill: one row at a time, one layer's full KV alive at a time.

For each row and layer:

1. keys and values of the whole prompt, computed in chunks of ``chunk`` rows;
2. queries chunk by chunk, attending bottom-right-causally to the keys so far; the attention
   output and then the MLP update the residual stream in place (so activations never exceed
   one chunk); the observation window's queries are kept as they pass. Where one layer's
   queries and attention output fit a byte allowance, they are computed with the keys and a
   single causal attention call covers the layer (faster; the MLP still runs by chunks);
3. the layer is scored and selected with the project's :class:`~snapkv.methods.Method`
   (the fused Triton votes when available), its kept K/V are written into the static cache,
   and its full K/V are freed before the next layer. A head-adaptive method
   (:class:`~snapkv.methods.AdaptiveHeads`) shares the layer's total between its KV heads;
   each head's kept tokens then go to its own segment of the cache (per-head lengths).

Only the last position's logits are computed. The model's own modules are called with their
own weights; nothing is copied or patched.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from snapkv.config import SnapKVConfig
from snapkv.core.adaptive import RaggedSelection
from snapkv.core.budgets import layer_budget
from snapkv.core.scoring import pool_votes
from snapkv.core.selection import Selection, gather_positions, select_topk
from snapkv.generation.adapter import DecoderParts
from snapkv.generation.attention import causal_chunk_attention, whole_layer_attention
from snapkv.generation.static_cache import PromptStaging, StaticKVCache
from snapkv.methods.base import Method, ScoreInputs
from snapkv.methods.snapkv import SnapKV

try:  # the fused scoring kernel (Triton on CUDA, torch twin elsewhere), when it is installed
    from snapkv.kernels.dispatch import reduced_window_votes
except ImportError:  # pragma: no cover - exercised only without the kernels package
    reduced_window_votes = None


_PROGRESS = os.environ.get("SNAPKV_PREFILL_PROGRESS") == "1"
_T0 = [time.perf_counter()]


class PhaseTimer:
    """Sums the time of named phases: CUDA events on a GPU (no sync until :meth:`totals`)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.events: dict[str, list[tuple[object, object]]] = {}
        self._open: tuple[str, object] | None = None

    def _mark(self) -> object:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self, name: str) -> None:
        """Close the open phase (if any) and open ``name``."""
        mark = self._mark()
        if self._open is not None:
            self.events.setdefault(self._open[0], []).append((self._open[1], mark))
        self._open = (name, mark)

    def stop(self) -> None:
        """Close the open phase."""
        if self._open is not None:
            self.start("_")
            self._open = None

    def totals(self) -> dict[str, float]:
        """Milliseconds per phase (synchronizes once)."""
        self.stop()
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for name, spans in self.events.items():
            if name == "_":
                continue
            if self.cuda:
                out[name] = sum(a.elapsed_time(b) for a, b in spans)
            else:
                out[name] = 1000.0 * sum(b - a for a, b in spans)
        return out


@dataclass
class PrefillStats:
    """What one prefill did: lengths, kept tokens per layer and row, and time per phase."""

    prompt_lengths: list[int]
    kept: list[list[int]]
    phase_ms: dict[str, float] = field(default_factory=dict)


def kept_per_layer(
    config: SnapKVConfig | None,
    length: int,
    num_layers: int,
    profile: str = "uniform",
    method: Method | None = None,
) -> list[int]:
    """Tokens each layer keeps (per KV head, on average) of a ``length``-token prompt.

    All of them without a config. ``method``'s own layer budget
    (:meth:`~snapkv.methods.Method.layer_budget`, e.g. :class:`~snapkv.methods.PyramidBudgets`)
    applies on top of ``profile``, as on the transformers path.
    """
    if config is None:
        return [length] * num_layers
    base = config.kept_tokens(length, config.window)
    if base >= length:
        return [length] * num_layers
    kept = [min(length, layer_budget(profile, base, config.window, r, num_layers)) for r in range(num_layers)]
    if method is not None:
        kept = [min(length, method.layer_budget(k, config.window, r, num_layers)) for r, k in enumerate(kept)]
    return kept


def select_layer(
    method: Method, inputs: ScoreInputs, values: torch.Tensor, keep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Kept K/V of one layer of one row: ``(keys, values, head_lengths)``.

    A method whose heads keep equal counts gives ``keys, values [1, Hkv, keep, D]`` and None
    (the fused votes for plain SnapKV). A method that shares the layer's ``keep * Hkv`` tokens
    between its heads (:class:`~snapkv.methods.AdaptiveHeads`) gives flat per-head segments
    ``[N, D]`` in head order, positions increasing inside each, and their ``[Hkv]`` int64
    lengths (see :meth:`StaticKVCache.load_heads`).
    """
    n_keep = torch.tensor([keep])
    if type(method) is SnapKV and reduced_window_votes is not None:
        # Same steps as SnapKV.score, with the votes from the fused kernel when on CUDA.
        w = inputs.window
        votes = reduced_window_votes(  # [1, Hkv, L] fp32
            inputs.queries[:, :, -w:],
            inputs.keys,
            None,
            scaling=inputs.scaling,
            softcap=inputs.softcap,
            gqa_reduce=method.gqa_reduce,
            chunk_size=method.chunk_size,
        )
        prefix = votes.shape[-1] - w
        votes[..., :prefix] = pool_votes(votes[..., :prefix].contiguous(), method.kernel, method.pooling)
        sel = select_topk(votes, n_keep, w, None)
        return gather_positions(inputs.keys, sel.indices), gather_positions(values, sel.indices), None
    sel = method.select(inputs, n_keep)
    if isinstance(sel, RaggedSelection):  # head-adaptive: each head its own count
        return sel.gather(inputs.keys), sel.gather(values), sel.lengths[0].to(torch.long)
    if not isinstance(sel, Selection):
        raise TypeError(f"{type(method).__name__}.select() returned {type(sel).__name__}, not a selection")
    return gather_positions(inputs.keys, sel.indices), gather_positions(values, sel.indices), None


def store_layer(
    cache: StaticKVCache | PromptStaging,
    layer: int,
    row: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    head_lengths: torch.Tensor | None = None,
) -> None:
    """Write :func:`select_layer`'s result (or a layer's uncompressed ``[1, Hkv, n, D]``) into ``cache``."""
    if head_lengths is None:
        cache.load(layer, row, keys[0], values[0])
    else:
        cache.load_heads(layer, row, keys, values, head_lengths)


def prefill_row(
    parts: DecoderParts,
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
    num_layers: int,
    whole_layer_bytes: int,
) -> torch.Tensor:
    """Prefill one prompt ``ids [n]``; write its kept K/V into ``cache`` row ``row``; last logits ``[V]``."""
    n = ids.numel()
    hq, hkv, d = parts.num_heads, parts.num_kv_heads, parts.head_dim
    positions = torch.arange(n, device=ids.device)[None]  # [1, n]
    timer.start("embed")
    x = parts.embed(ids[None])  # [1, n, H]: the residual stream, updated in place
    spans = [(s, min(n, s + chunk)) for s in range(0, n, chunk)]
    whole = 2 * n * hq * d * x.element_size() <= whole_layer_bytes  # all queries at once fit
    for li in range(num_layers):
        layer = parts.layers[li]
        attn = layer.self_attn
        keys = torch.empty((1, hkv, n, d), dtype=x.dtype, device=x.device)
        values = torch.empty_like(keys)
        queries = torch.empty((1, hq, n, d), dtype=x.dtype, device=x.device) if whole else None
        timer.start("kv")
        for s, e in spans:
            h = layer.input_layernorm(x[:, s:e])
            cos, sin = parts.rope(h, positions[:, s:e])
            keys[:, :, s:e], values[:, :, s:e] = parts.keys_values(li, h, cos, sin)
            if queries is not None:
                queries[:, :, s:e] = parts.queries(li, h, cos, sin)
        compress = kept[li] < n
        w = min(window, n)
        q_win = torch.empty((1, hq, w, d), dtype=x.dtype, device=x.device) if compress else None
        out = None
        if queries is not None:  # one exact causal attention over the whole layer
            timer.start("attention")
            out = whole_layer_attention(queries, keys, values, parts.scaling)
            if q_win is not None:
                q_win.copy_(queries[:, :, n - w :])
            del queries
        for s, e in spans:
            timer.start("attention")
            if out is not None:
                o = out[:, :, s:e]
            else:  # this chunk's queries against the keys so far
                h = layer.input_layernorm(x[:, s:e])
                cos, sin = parts.rope(h, positions[:, s:e])
                q = parts.queries(li, h, cos, sin)  # [1, Hq, c, D]
                if q_win is not None and e > n - w:  # keep the window's queries as they pass
                    lo = max(s, n - w)
                    q_win[:, :, lo - (n - w) : e - (n - w)] = q[:, :, lo - s :]
                o = causal_chunk_attention(q, keys[:, :, :e], values[:, :, :e], parts.scaling, backend)
            x[:, s:e] += attn.o_proj(o.transpose(1, 2).reshape(1, e - s, -1))
            timer.start("mlp")
            x[:, s:e] += layer.mlp(layer.post_attention_layernorm(x[:, s:e]))
        del out
        timer.start("score")
        if q_win is not None:
            inputs = ScoreInputs(q_win, keys, None, w, parts.scaling, None, li)
            keys, values, counts = select_layer(method, inputs, values, kept[li])
        else:
            counts = None
        timer.start("cache")
        store_layer(cache, li, row, keys, values, counts)
        del keys, values  # this layer's full KV is gone before the next layer starts
        if _PROGRESS:  # long prompts: one line per layer (synchronizes; off by default)
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            print(f"prefill row {row} layer {li + 1}/{num_layers}: {time.perf_counter() - _T0[0]:.1f} s", flush=True)
    timer.start("logits")
    logits = parts.lm_head(parts.norm(x[:, -1:]))[0, -1]  # [V]
    timer.stop()
    return logits


def prefill(
    parts: DecoderParts,
    rows: Sequence[torch.Tensor],
    cache: StaticKVCache | PromptStaging,
    *,
    config: SnapKVConfig | None,
    method: Method,
    layer_profile: str = "uniform",
    chunk: int = 8192,
    backend: str = "ref",
    num_layers: int | None = None,
    whole_layer_bytes: int = 0,
    probe_tokens: int = 0,
) -> tuple[torch.Tensor, PrefillStats]:
    """Prefill every row into ``cache`` (sized by the caller) and return the last logits ``[B, V]``.

    Args:
        parts: the model's modules.
        rows: one 1-D tensor of token ids per row (no padding).
        cache: a static cache with ``len(rows)`` rows and enough prompt slots, or a
            :class:`~snapkv.generation.static_cache.PromptStaging` that holds the kept tokens
            until the cache can be sized (head-adaptive methods: per-head counts are known only
            after the selection).
        config: window and budget, or None to keep every prompt token.
        method: how each layer scores and selects its prompt positions; a head-adaptive one
            (:class:`~snapkv.methods.AdaptiveHeads`) keeps a different count per KV head.
        layer_profile: ``"uniform"`` or ``"pyramid"`` budgets across layers.
        chunk: rows of queries (and MLP rows) processed at once.
        backend: prefill attention backend (see :mod:`snapkv.generation.attention`).
        num_layers: run only the first layers (benchmarks of peak memory at full shape); the
            remaining layers' cache slots stay empty and the logits are not meaningful.
        whole_layer_bytes: when a layer's queries and attention output fit in this many bytes,
            attend over the whole layer in one call (torch's fastest exact kernel) instead of
            by query chunks.
        probe_tokens: each row ends with a probe of that many tokens that the caller cuts
            afterwards (sliding-window layers keep that many more: ``kept_per_layer``).
    """
    depth = parts.num_layers if num_layers is None else num_layers
    window = config.window if config is not None else 1
    _T0[0] = time.perf_counter()
    timer = PhaseTimer(parts.device)
    logits = []
    kept_all = []
    for row, ids in enumerate(rows):
        n = ids.numel()
        kept = parts.kept_per_layer(config, n, layer_profile, method, probe_tokens)
        kept_all.append(kept)
        logits.append(
            parts.prefill_row(ids, cache, row, kept=kept, method=method, window=window, chunk=chunk, backend=backend,
                              timer=timer, num_layers=depth, whole_layer_bytes=whole_layer_bytes)
        )
        cache.set_prompt_length(row, n)
    stats = PrefillStats([r.numel() for r in rows], [list(k) for k in zip(*kept_all, strict=True)])
    stats.phase_ms = timer.totals()
    return torch.stack(logits), stats
