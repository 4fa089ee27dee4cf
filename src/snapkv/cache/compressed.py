"""SnapKVCache: a transformers cache that compresses itself, with its own settings and statistics.

Its full-attention layers are :class:`~snapkv.cache.layer.CompressedLayer` (the kept prompt
tokens in their original order); sliding-window layers are transformers' own and keep their
window. The cache marks itself for each attention call of its forwards (see
:mod:`snapkv.integration.hf`), and :meth:`SnapKVCache.attend` attends and compresses.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
import weakref
from typing import Any

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer

from snapkv.cache.compress import (
    Capture,
    LayerStats,
    compress_layer,
    left_align,
    method_key,
    plan,
    prefix_capture,
    real_lengths,
    snapkv_from,
)
from snapkv.cache.layer import _SAVED, CompressedLayer, Snapshot, _ragged_state
from snapkv.cache.ragged import RaggedLayer, ragged_attention
from snapkv.config import SnapKVConfig
from snapkv.integration.hf import Lease, decode_mask, enable, key_valid_from_mask, layer_types, mark_route
from snapkv.methods.base import Method, ScoreInputs

#: Attention keyword arguments that change the result and that the ragged (head-adaptive) decode
#: path does not implement (it implements ``scaling``, ``softcap`` and gpt-oss's sinks ``s_aux``).
_RAGGED_REFUSED = ("sliding_window", "dropout", "head_mask", "attention_chunk_size")


class SnapKVCache(DynamicCache):
    """A transformers cache that compresses each full-attention layer right after its prefill.

    Example::

        cache = SnapKVCache(model, SnapKVConfig(budget=512))        # or method=AdaptiveHeads(SnapKV())
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=32)
        print(cache.stats)                                          # what each layer kept
        cache.close()                                               # or `with SnapKVCache(...) as cache:`

    The cache owns its settings (``config``: budget and window; ``method``: how positions
    are scored and chosen, wrappers included), its statistics (``stats``, one
    :class:`LayerStats` per compressed layer) and, with ``capture=True``, the scoring inputs
    that :meth:`derive` uses. It routes its own forwards, so any number of caches, threads
    and sessions can share one model.

    Life cycle: building the cache enables SnapKV's attention function on ``model``
    (:func:`snapkv.enable`, reference-counted); :meth:`close`, leaving ``with``, or garbage
    collection gives it back, and the last user restores the model's own attention. A closed
    cache refuses forwards. Sliding-window layers stay transformers' own.

    Args:
        model: a transformers decoder (``*ForCausalLM``) loaded with eager, sdpa or flash attention.
        config: budget, window and the default method's scoring settings.
        method: how positions are chosen (default :class:`~snapkv.methods.SnapKV` with the
            config's kernel, pooling and GQA reduction).
        capture: keep each full layer's whole prompt and scoring inputs instead of compressing,
            so :meth:`derive` can build compressed caches for many methods and budgets from one
            prefill (evaluation).
    """

    def __init__(
        self,
        model: torch.nn.Module | PretrainedConfig | None = None,
        config: SnapKVConfig | PretrainedConfig | None = None,
        method: Method | None = None,
        *,
        capture: bool = False,
        _lease: Lease | None = None,
    ) -> None:
        if isinstance(model, PretrainedConfig) or (model is None and isinstance(config, PretrainedConfig)):
            model_config = model if isinstance(model, PretrainedConfig) else config
            warnings.warn("SnapKVCache(config=model.config) is deprecated: build SnapKVCache(model, "
                          "SnapKVConfig(...)), which compresses on its own", DeprecationWarning, stacklevel=2)
            self._setup(None, model_config, SnapKVConfig(), None, False)
            return
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a transformers model, got {type(model).__name__}")
        config = SnapKVConfig() if config is None else config
        if not isinstance(config, SnapKVConfig):
            raise ValueError(f"config must be a SnapKVConfig, got {type(config).__name__}")
        if method is not None and not isinstance(method, Method):
            raise ValueError(f"method must be a snapkv Method (e.g. SnapKV()), got {type(method).__name__}")
        self._setup(model, model.config, config, method, capture)
        if _lease is None:  # its own hold on the model, given back by close() or garbage collection
            self._lease = enable(model)
            self._finalizer = weakref.finalize(self, self._lease.release)
        else:  # a session's: it ends with the session
            self._lease = _lease

    def _setup(self, model: Any, model_config: Any, config: SnapKVConfig, method: Method | None,
               capture: bool) -> None:
        super().__init__(config=model_config)
        self.layers = [CompressedLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]
        self.model = model
        self.config = config
        self.method = snapkv_from(config) if method is None else method
        self._default_method = method is None
        #: Observation window (``config.window`` unless widened, e.g. to cover a question).
        self.window = config.window
        self.capture = bool(capture)
        self.stats: list[LayerStats] = []
        self.captured: dict[int, Capture] = {}
        self._scores: dict[Any, torch.Tensor] = {}
        self._lease: Lease | None = None
        self._finalizer: weakref.finalize | None = None
        types = layer_types(model) if model is not None else []
        self.full_layers = [i for i, t in enumerate(types) if t == "full_attention"]

    # -- life cycle ---------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """Whether the cache can no longer run forwards (closed, or its session ended)."""
        return self._lease is None or not self._lease.active

    def close(self) -> None:
        """Give the model back (the last user restores its attention) and drop captured inputs."""
        self.end_capture()
        if self._finalizer is not None:
            self._finalizer()

    def end_capture(self) -> None:
        """Drop the captured scoring inputs and memoized scores (``derive()`` then refuses)."""
        self.captured = {}
        self._scores = {}

    def __enter__(self) -> SnapKVCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- routing ------------------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values of ``layer_idx`` and mark this cache for the layer's attention call."""
        if self.model is None:
            raise RuntimeError("this SnapKVCache has no model and cannot compress: build it as "
                               "SnapKVCache(model, SnapKVConfig(...)) or with session.new_cache()")
        if self.closed:
            raise RuntimeError("this SnapKVCache is closed (close() was called or its session ended): "
                               "SnapKV's attention is no longer on the model for it")
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        mark_route(self, layer_idx, keys)
        return keys, values

    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        backend: Any,
        mask_kind: str,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, Any]:
        """One attention call of this cache's forward (called by SnapKV's attention function)."""
        layer = self.layers[module.layer_idx]
        if not isinstance(layer, CompressedLayer):  # sliding window: its own cache
            return backend(module, query, key, value, attention_mask, **kwargs)
        if layer.ragged is not None:  # per-head lengths: SnapKV's own decode attention
            return self._ragged(module, query, key, value, layer.ragged, kwargs), None
        if layer.compressed:
            mask = decode_mask(layer, query.shape[-2], mask_kind, query.dtype)
            return backend(module, query, key, value, mask, **kwargs)
        if layer.prefilled:  # the prompt fit the budget: nothing was removed
            return backend(module, query, key, value, attention_mask, **kwargs)
        out = backend(module, query, key, value, attention_mask, **kwargs)
        if layer.seen != key.shape[-2] or query.shape[-2] != key.shape[-2]:
            raise RuntimeError(
                "SnapKV compresses a layer in one prefill forward; this forward appended "
                f"{query.shape[-2]} tokens to a layer holding {key.shape[-2] - query.shape[-2]}"
            )
        self._after_prefill(module, layer, query, key, value, attention_mask, kwargs)
        return out

    @staticmethod
    def _ragged(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                ragged: RaggedLayer, kwargs: dict[str, Any]) -> torch.Tensor:
        refused = sorted(k for k in _RAGGED_REFUSED if kwargs.get(k))  # None, 0 and 0.0 change nothing
        if refused:
            raise NotImplementedError(f"head-adaptive (ragged) attention does not implement {refused} "
                                      "(run the model in eval mode, without dropout)")
        return ragged_attention(query, ragged, key, value, scaling=kwargs.get("scaling", module.scaling),
                                softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"))

    def _after_prefill(self, module: torch.nn.Module, layer: CompressedLayer, query: torch.Tensor,
                       key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                       kwargs: dict[str, Any]) -> None:
        b, _, length, _ = key.shape
        valid = key_valid_from_mask(attention_mask, b, length)
        query, key, value, valid, order = left_align(query, key, value, valid)
        inputs = ScoreInputs(queries=query, keys=key, key_valid=valid, window=self.window,
                             scaling=kwargs.get("scaling", module.scaling), softcap=kwargs.get("softcap"),
                             layer_idx=module.layer_idx)
        if self.capture:
            layer.prefilled = True
            self.captured[module.layer_idx] = Capture(inputs, value, order)
            return
        kept = self._plan(inputs, self.config, self.method)
        rank = self.full_layers.index(module.layer_idx)
        self.stats.append(compress_layer(layer, inputs, value, self.method, kept[rank], order))

    def _plan(self, inputs: ScoreInputs, config: SnapKVConfig, method: Method) -> list[list[int]]:
        """Budgets of every layer and row; a bad budget empties the cache before it raises."""
        try:
            return plan(config, method, inputs.window, real_lengths(inputs), len(self.full_layers))
        except ValueError:
            self._setup_layers()
            raise

    def _setup_layers(self) -> None:
        fresh = DynamicCache(config=self.model.config).layers
        self.layers = [CompressedLayer() if type(layer) is DynamicLayer else layer for layer in fresh]
        self.stats = []

    # -- capture and derive -------------------------------------------------------------------
    def derive(
        self,
        method: Method | None = None,
        config: SnapKVConfig | None = None,
        *,
        window: int | None = None,
        prefix: int | None = None,
    ) -> SnapKVCache:
        """A compressed copy of this captured prefill (``capture=True``), for another method or budget.

        The prompt's full KV is shared, not copied; the new cache holds the kept tokens of
        each full-attention layer and shares the sliding layers' tensors. Arguments left as
        None take this cache's (a ``config`` of its own also brings its own default method).
        Scores are computed once per scoring method (equal settings share them), layer and
        window: deriving the same method at other budgets reuses them.

        ``prefix=n`` compresses only the first ``n`` prompt tokens, as if the prompt had
        ended there (causal attention makes their queries, keys and values a prefix of the
        capture). It needs every layer to be full attention.
        """
        if not self.captured:
            raise RuntimeError("derive() needs a cache built with capture=True and a prefill run through it "
                               "(captures are dropped when the cache is closed or its session ends)")
        if method is None:
            method = snapkv_from(config) if config is not None and self._default_method else self.method
        config = config or self.config
        window = window or config.window
        if prefix is not None:
            if not all(isinstance(layer, CompressedLayer) for layer in self.layers):
                raise ValueError("derive(prefix=...) needs every layer to be full attention; "
                                 "this model has sliding-window layers")
            length = next(iter(self.captured.values())).inputs.keys.shape[-2]
            if isinstance(prefix, bool) or not isinstance(prefix, int) or not window < prefix <= length:
                raise ValueError(f"prefix must be an integer in ({window}, {length}] (window, captured "
                                 f"tokens], got {prefix!r}")
        new = SnapKVCache(self.model, config, method, _lease=self._lease_for_child())
        if new._lease is not self._lease:
            new._finalizer = weakref.finalize(new, new._lease.release)
        new.window = window
        new._default_method = False
        kept = None
        for i, (src, dst) in enumerate(zip(self.layers, new.layers, strict=True)):
            if not isinstance(src, CompressedLayer):
                new.layers[i] = copy.copy(src)
                continue
            cap = self.captured[i]
            if src.seen != cap.inputs.keys.shape[-2]:
                raise RuntimeError("derive() takes a cache holding only the captured prompt, nothing appended")
            if prefix is not None and prefix < cap.inputs.keys.shape[-2]:
                cap = prefix_capture(cap, prefix)
            inputs = dataclasses.replace(cap.inputs, window=window)
            length = inputs.keys.shape[-2]
            dst.lazy_initialization(inputs.keys, cap.values)
            # the uncompressed state keeps the source's layout (a left-aligned capture is for scoring only)
            dst.keys, dst.values = (inputs.keys, cap.values) if cap.order is None else (src.keys, src.values)
            dst.seen = length
            if kept is None:
                kept = new._plan(inputs, config, method)
            memo = (method_key(method.scorer), i, window, length)
            if memo not in self._scores:
                self._scores[memo] = method.scorer.score(inputs)
            rank = self.full_layers.index(i)
            new.stats.append(compress_layer(dst, inputs, cap.values, method, kept[rank], cap.order,
                                            self._scores[memo]))
        return new

    def _lease_for_child(self) -> Lease:
        if self.closed:
            raise RuntimeError("this SnapKVCache is closed")
        if self._finalizer is None:  # a session's cache: its derived caches are the session's too
            return self._lease
        return enable(self.model)

    # -- state --------------------------------------------------------------------------------
    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens of every layer (checked on all layers first).

        On compressed layers only tokens appended after the prompt can go; asking for more
        raises ``ValueError`` and changes nothing.
        """
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                layer._no_ragged("crop")
                layer._crop_count(tokens_to_remove)
        super().crop(tokens_to_remove)

    def compressed_layers(self) -> list[int]:
        """Indices of the layers that hold a kept subset of their prompt."""
        return [i for i, layer in enumerate(self.layers) if getattr(layer, "compressed", False)]

    def snapshot(self) -> Snapshot:
        """State to :meth:`restore` later, e.g. after answering one question of many."""
        return Snapshot(
            tuple((*(getattr(layer, a, None) for a in _SAVED), _ragged_state(layer)) for layer in self.layers)
        )

    def restore(self, snap: Snapshot) -> None:
        """Roll every layer back to ``snap`` (appended tokens are dropped)."""
        for layer, state in zip(self.layers, snap.states, strict=True):
            for name, value in zip(_SAVED, state[:-1], strict=True):
                if hasattr(layer, name) or value is not None:
                    setattr(layer, name, value)
            if state[-1] is not None:  # ragged appends wrote in place: rewind the lengths
                layer.ragged.lengths.copy_(state[-1][0])
                layer.ragged.appended = state[-1][1]

    def kv_bytes(self) -> int:
        """Bytes held by all layers' keys and values now."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                total += layer.kv_bytes()
                continue
            for t in (layer.keys, layer.values):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total

