"""transformers glue: a scoped attention function that compresses each layer after its prefill.

Nothing is monkeypatched. Entering :class:`SnapKVSession` registers an attention function
(and the matching mask function) under a name unique to the session, switches the model to
it, and leaving restores the model's own implementation and removes both registrations.

The registered function wraps the backend the model was loaded with (eager, sdpa, flash):

* prefill into an empty :class:`~snapkv.cache.CompressedLayer`: the backend attends to the
  full prompt (the first generated token sees everything), then the layer's method scores
  the prompt from the model's own post-RoPE queries and the layer keeps its selection,
  so only one layer's full KV is alive at a time;
* later calls on a compressed layer: the backend attends to the kept tokens plus the new
  ones, with a mask that SnapKV builds from each row's filler slots;
* sliding-window layers: untouched, they keep their own window.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from snapkv.cache.compressed import CompressedLayer, SnapKVCache
from snapkv.cache.ragged import RaggedLayer, ragged_attention
from snapkv.config import SnapKVConfig
from snapkv.core.adaptive import HEAD_MODES, select_adaptive
from snapkv.core.budgets import PROFILES, layer_budget
from snapkv.methods.base import Method, ScoreInputs
from snapkv.methods.snapkv import SnapKV

#: Attention implementations SnapKV can wrap, and the mask format each expects.
SUPPORTED_BACKENDS: dict[str, str] = {
    "eager": "additive",
    "sdpa": "bool",
    "flash_attention_2": "2d",
    "flash_attention_3": "2d",
}

_ids = itertools.count()


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword under which this transformers version takes a cache (``cache`` from 5.24)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _text_config(model: torch.nn.Module) -> Any:
    return model.config.get_text_config(decoder=True)


def _backend_function(name: str, module: torch.nn.Module) -> Callable[..., Any]:
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def key_valid_from_mask(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """``[B, L]`` bool (False at padding) read off the backend's prefill mask, or None."""
    if mask is None:
        return None
    if mask.dim() == 2:
        valid = mask.bool()
    elif mask.dim() == 4:
        last = mask[:, 0, -1, :]  # the last query sees every real key of its row
        valid = last if last.dtype == torch.bool else last == 0
    else:
        raise ValueError(f"unexpected attention mask of shape {tuple(mask.shape)}")
    if valid.shape[-1] != length:
        raise ValueError(f"attention mask covers {valid.shape[-1]} keys, the layer holds {length}")
    valid = valid.expand(batch, length)
    return None if bool(valid.all()) else valid


def decode_mask(layer: CompressedLayer, q_len: int, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """Mask for ``q_len`` new queries against a compressed layer, in the backend's format."""
    total = layer.physical_length
    valid = layer.slot_valid(total)  # [B, K]
    if kind == "2d":
        return valid.long()
    device = valid.device
    q_slot = total - q_len + torch.arange(q_len, device=device)  # physical slot of each query
    causal = torch.arange(total, device=device)[None, :] <= q_slot[:, None]  # [q, K]
    allowed = valid[:, None, None, :] & causal[None, None]  # [B, 1, q, K]
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def _prefix(inputs: ScoreInputs, n: int) -> ScoreInputs:
    """Scoring inputs of the first ``n`` prompt tokens (a causal prefix of a capture)."""
    valid = inputs.key_valid[:, :n] if inputs.key_valid is not None else None
    if valid is not None and not bool(valid.any(-1).all()):
        raise ValueError(f"prefix {n} leaves a row with no real token (left padding is longer)")
    return dataclasses.replace(inputs, queries=inputs.queries[:, :, :n], keys=inputs.keys[:, :, :n],
                               key_valid=valid)


def _method_key(method: Method) -> Any:
    """Methods with equal settings score alike: a dataclass method is keyed by its fields."""
    if dataclasses.is_dataclass(method):
        return (type(method), repr(method))
    return id(method)


class _Memoized(Method):
    """A method whose scores for one layer of a capture are computed once (derive())."""

    def __init__(self, inner: Method, memo: dict[tuple[int, int, int], Any], key: tuple[int, int, int]) -> None:
        self.inner, self.memo, self.key = inner, memo, key
        self.name = inner.name

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        keys, hit = inputs.keys, self.memo.get(self.key)
        # The memo holds the scored keys, so an equal address and layout is the same capture.
        if hit is not None and (hit[0].data_ptr(), hit[0].shape, hit[0].stride()) == (
                keys.data_ptr(), keys.shape, keys.stride()):
            return hit[1]
        scores = self.inner.score(inputs)
        self.memo[self.key] = (keys, scores)
        return scores


def _snapkv_from(config: SnapKVConfig) -> SnapKV:
    return SnapKV(kernel=config.kernel, pooling=config.pooling, gqa_reduce=config.gqa_reduce,
                  chunk_size=config.chunk_size)


@dataclass
class LayerStats:
    """What compression did to one layer."""

    layer: int
    prompt_tokens: list[int]
    kept_tokens: list[int]
    bytes_before: int
    bytes_after: int


@dataclass
class SnapKVSession:
    """Compress a model's prompt KV cache inside a ``with`` block.

    Example::

        with SnapKVSession(model, SnapKVConfig(budget=1024)) as session:
            cache = session.new_cache()
            out = model.generate(**inputs, past_key_values=cache, max_new_tokens=32)

    Args:
        model: a transformers decoder (``*ForCausalLM``) on any device map.
        config: window and budget.
        method: how positions are scored (default :class:`~snapkv.methods.SnapKV` with the
            config's kernel, pooling and GQA reduction).
        layer_profile: ``"uniform"`` or ``"pyramid"`` budgets across compressed layers.
        head_budget: ``"uniform"`` (every KV head keeps the same count) or ``"adaptive"``
            (AdaKV: one top-k across the layer's heads with a per-head floor), stored in a
            ragged per-head cache that frees what it does not keep.
        alpha: share of each head's uniform prefix budget guaranteed to it (adaptive).
        slack: slots per head reserved for new tokens in the ragged cache (adaptive);
            appending more raises.
        capture: keep the full prompt KV and record each full layer's scoring inputs
            instead of compressing, so :meth:`derive` can build compressed caches for many
            methods and budgets from one prefill (evaluation).
    """

    model: torch.nn.Module
    config: SnapKVConfig = field(default_factory=SnapKVConfig)
    method: Method | None = None
    layer_profile: str = "uniform"
    head_budget: str = "uniform"
    alpha: float = 0.2
    slack: int = 256
    capture: bool = False
    stats: list[LayerStats] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.layer_profile not in PROFILES:
            raise ValueError(f"layer_profile must be one of {PROFILES}, got {self.layer_profile!r}")
        if self.head_budget not in HEAD_MODES:
            raise ValueError(f"head_budget must be one of {HEAD_MODES}, got {self.head_budget!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha!r}")
        if isinstance(self.slack, bool) or not isinstance(self.slack, int) or self.slack < 1:
            raise ValueError(f"slack must be an integer >= 1 (new tokens per head), got {self.slack!r}")
        self._default_method = self.method is None
        if self.method is None:
            self.method = _snapkv_from(self.config)
        text = _text_config(self.model)
        self.backend = text._attn_implementation or "eager"
        if self.backend not in SUPPORTED_BACKENDS:
            raise ValueError(
                f"attention implementation {self.backend!r} cannot be wrapped by SnapKV; "
                f"load the model with attn_implementation in {sorted(SUPPORTED_BACKENDS)}"
            )
        self.layer_types = list(getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers)
        self.full_layers = [i for i, t in enumerate(self.layer_types) if t == "full_attention"]
        self.window = self.config.window
        self._name = f"snapkv_{self.backend}_{next(_ids)}"
        self._cache: SnapKVCache | None = None
        self._active = False
        self.captured: dict[int, tuple[ScoreInputs, torch.Tensor]] = {}
        # derive()'s scores: method key -> (method, {(layer, window, length): (keys scored, scores)})
        self._scores: dict[Any, tuple[Method, dict[tuple[int, int, int], Any]]] = {}

    # -- context -------------------------------------------------------------------------
    def __enter__(self) -> SnapKVSession:
        AttentionInterface.register(self._name, self._attention)
        AttentionMaskInterface.register(self._name, AttentionMaskInterface._global_mapping[self.backend])
        try:
            self.model.set_attn_implementation(self._name)
        except Exception:
            self._unregister()
            raise
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.model.set_attn_implementation(self.backend)
        finally:
            self._unregister()
            self._active = False
            self._cache = None

    def _unregister(self) -> None:
        AttentionInterface._global_mapping.pop(self._name, None)
        AttentionMaskInterface._global_mapping.pop(self._name, None)

    # -- caches --------------------------------------------------------------------------
    def new_cache(self) -> SnapKVCache:
        """A fresh cache for one prompt (or one batch of prompts)."""
        if not self._active:
            raise RuntimeError("create caches inside `with SnapKVSession(...)`")
        self._cache = SnapKVCache(config=self.model.config)
        self.stats = []
        self.captured = {}
        self._scores = {}
        return self._cache

    def activate(self, cache: SnapKVCache) -> None:
        """Make ``cache`` the one the next forwards use (e.g. a cache from :meth:`derive`)."""
        self._cache = cache

    def derive(
        self,
        source: SnapKVCache,
        method: Method | None = None,
        config: SnapKVConfig | None = None,
        layer_profile: str | None = None,
        window: int | None = None,
        head_budget: str | None = None,
        alpha: float | None = None,
        prefix: int | None = None,
    ) -> SnapKVCache:
        """A compressed copy of a captured prefill (``capture=True``), for another method or budget.

        The prompt's full KV in ``source`` is shared, not copied; the new cache holds the
        kept tokens of each full-attention layer and shares the sliding layers' tensors.
        The new cache becomes the active one. Arguments left as None take the session's.

        Scores are computed once per method (equal settings share them), layer and window of
        a capture: deriving the same method at other budgets reuses them (until :meth:`new_cache`).

        ``prefix=n`` compresses only the first ``n`` prompt tokens, as if the prompt had
        ended there (causal attention makes their queries, keys and values a prefix of the
        capture): one prefill of context + question serves context-only compression too.
        It needs every layer to be full attention (sliding layers keep only their window).
        """
        if not self.captured:
            raise RuntimeError("derive() needs a prefill run with SnapKVSession(..., capture=True)")
        head_budget = head_budget or self.head_budget
        if head_budget not in HEAD_MODES:
            raise ValueError(f"head_budget must be one of {HEAD_MODES}, got {head_budget!r}")
        alpha = self.alpha if alpha is None else alpha
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
        if method is None:  # a config of its own brings its own SnapKV settings
            use_config = config is not None and self._default_method
            method = _snapkv_from(config) if use_config else self.method
        config = config or self.config
        profile = layer_profile or self.layer_profile
        window = window or config.window
        if prefix is not None:
            if not all(isinstance(layer, CompressedLayer) for layer in source.layers):
                raise ValueError("derive(prefix=...) needs every layer to be full attention; "
                                 "this model has sliding-window layers")
            length = next(iter(self.captured.values()))[0].keys.shape[-2]
            if isinstance(prefix, bool) or not isinstance(prefix, int) or not window < prefix <= length:
                raise ValueError(f"prefix must be an integer in ({window}, {length}] (window, captured "
                                 f"tokens], got {prefix!r}")
        memo = self._scores.setdefault(_method_key(method), (method, {}))[1]
        new = SnapKVCache(config=self.model.config)
        stats = []
        for i, (src, dst) in enumerate(zip(source.layers, new.layers, strict=True)):
            if not isinstance(src, CompressedLayer):
                new.layers[i] = copy.copy(src)
                continue
            inputs, values = self.captured[i]
            if src.seen != inputs.keys.shape[-2]:
                raise RuntimeError("derive() takes a cache holding only the captured prompt, nothing appended")
            if prefix is not None and prefix < inputs.keys.shape[-2]:
                inputs, values = _prefix(inputs, prefix), values[:, :, :prefix]
            inputs = dataclasses.replace(inputs, window=window)
            dst.lazy_initialization(inputs.keys, values)
            dst.keys, dst.values = inputs.keys, values
            dst.seen = inputs.keys.shape[-2]
            scorer = _Memoized(method, memo, (i, window, inputs.keys.shape[-2]))
            stats.append(self._select(dst, inputs, values, scorer, config, profile, head_budget, alpha))
        self.stats = stats
        self._cache = new
        return new

    def cache_kwargs(self, cache: SnapKVCache) -> dict[str, SnapKVCache]:
        """``{name: cache}`` with the cache keyword of the installed transformers."""
        return {cache_argument(self.model): cache}

    def _layer(self, layer_idx: int, key: torch.Tensor) -> Any:
        cache = self._cache
        layer = cache.layers[layer_idx] if cache is not None and layer_idx < len(cache.layers) else None
        if isinstance(layer, CompressedLayer) and layer.keys is key:  # a ragged layer holds the new keys
            return layer
        if layer is not None and not isinstance(layer, CompressedLayer) and layer.is_sliding:
            return layer
        raise RuntimeError(
            "SnapKV found no SnapKV cache in this forward: pass the cache from "
            "`session.new_cache()` as the model's cache (use_cache must stay on)"
        )

    # -- the attention function ----------------------------------------------------------
    def _attention(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        backend = _backend_function(self.backend, module)
        layer = self._layer(module.layer_idx, key)
        if not isinstance(layer, CompressedLayer):  # sliding window: its own cache
            return backend(module, query, key, value, attention_mask, **kwargs)
        if layer.ragged is not None:  # per-head lengths: SnapKV's own decode attention
            scaling = kwargs.get("scaling", module.scaling)
            out = ragged_attention(query, layer.ragged, key, value, scaling=scaling, softcap=kwargs.get("softcap"))
            return out, None
        if layer.compressed:
            kind = SUPPORTED_BACKENDS[self.backend]
            mask = decode_mask(layer, query.shape[-2], kind, query.dtype)
            return backend(module, query, key, value, mask, **kwargs)
        if layer.prefilled:  # the prompt fit the budget: nothing was removed
            return backend(module, query, key, value, attention_mask, **kwargs)
        out = backend(module, query, key, value, attention_mask, **kwargs)
        if layer.seen != key.shape[-2] or query.shape[-2] != key.shape[-2]:
            raise RuntimeError(
                "SnapKV compresses a layer in one prefill forward; this forward appended "
                f"{query.shape[-2]} tokens to a layer holding {key.shape[-2] - query.shape[-2]}"
            )
        self._compress(module, layer, query, key, value, attention_mask, kwargs)
        return out

    def _compress(
        self,
        module: torch.nn.Module,
        layer: CompressedLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        kwargs: dict[str, Any],
    ) -> None:
        b, _, length, _ = key.shape
        inputs = ScoreInputs(
            queries=query,
            keys=key,
            key_valid=key_valid_from_mask(attention_mask, b, length),
            window=self.window,
            scaling=kwargs.get("scaling", module.scaling),
            softcap=kwargs.get("softcap"),
            layer_idx=module.layer_idx,
        )
        if self.capture:
            layer.prefilled = True
            self.captured[module.layer_idx] = (inputs, value)
            return
        self.stats.append(self._select(layer, inputs, value, self.method, self.config, self.layer_profile,
                                       self.head_budget, self.alpha))

    def _select(
        self,
        layer: CompressedLayer,
        inputs: ScoreInputs,
        values: torch.Tensor,
        method: Method,
        config: SnapKVConfig,
        profile: str,
        head_budget: str,
        alpha: float,
    ) -> LayerStats:
        """Compress one layer's prompt in place of its full KV; returns what was done."""
        key, window = inputs.keys, inputs.window
        b, _, length, _ = key.shape
        real = inputs.key_valid.sum(-1).tolist() if inputs.key_valid is not None else [length] * b
        rank = self.full_layers.index(inputs.layer_idx)
        kept = []
        for n in real:
            k = config.kept_tokens(n, window)
            if k < n:
                k = min(n, layer_budget(profile, k, window, rank, len(self.full_layers)))
            kept.append(k)
        layer.prefilled = True
        full_bytes = 2 * key.numel() * key.element_size()
        if kept == real:  # every row fits its budget: the layer stays as it is
            return LayerStats(inputs.layer_idx, real, kept, full_bytes, full_bytes)
        n_keep = torch.tensor(kept, device=key.device)
        if head_budget == "adaptive":
            ragged = select_adaptive(method.score(inputs), n_keep, window, inputs.key_valid, alpha=alpha)
            layer.replace_ragged(RaggedLayer.from_selection(key, values, ragged, self.slack))
            return LayerStats(inputs.layer_idx, real, kept, full_bytes, layer.ragged.kv_bytes())
        new_k, new_v, sel = method.compress(inputs, values, n_keep)
        layer.replace(new_k, new_v, sel.pad, sel.indices.to(torch.int32))
        return LayerStats(inputs.layer_idx, real, kept, full_bytes, 2 * new_k.numel() * new_k.element_size())
