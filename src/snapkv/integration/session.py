"""SnapKVSession: the previous entry point, now a thin layer over :class:`~snapkv.SnapKVCache`.

A session holds SnapKV's attention function on the model for its ``with`` block (strictly:
inside it, a forward without a SnapKV cache raises) and makes caches with its settings.
Each cache carries its own settings and statistics, so sessions may overlap, be left in any
order and share the model with other caches and threads. Leaving the session closes the
caches it made (they refuse further forwards) and drops their captured inputs.

Prefer ``SnapKVCache(model, SnapKVConfig(...), method=...)``; the string flags
``layer_profile``, ``head_budget``, ``alpha`` and ``slack`` are deprecated in favour of the
wrappers :class:`~snapkv.methods.PyramidBudgets` and :class:`~snapkv.methods.AdaptiveHeads`.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from snapkv.cache.compress import Capture, LayerStats, snapkv_from
from snapkv.cache.compressed import SnapKVCache
from snapkv.config import SnapKVConfig
from snapkv.core.adaptive import HEAD_MODES
from snapkv.core.budgets import PROFILES
from snapkv.integration.hf import Lease, cache_argument, enable, layer_types, model_backend
from snapkv.methods.base import Method
from snapkv.methods.wrappers import AdaptiveHeads, PyramidBudgets

__all__ = ["LayerStats", "SnapKVSession", "wrap_method"]


def wrap_method(method: Method, layer_profile: str = "uniform", head_budget: str = "uniform",
                alpha: float = 0.2, slack: int = 256) -> Method:
    """``method`` wrapped as the legacy string flags ask (pyramid layers, adaptive heads)."""
    if layer_profile not in PROFILES:
        raise ValueError(f"layer_profile must be one of {PROFILES}, got {layer_profile!r}")
    if head_budget not in HEAD_MODES:
        raise ValueError(f"head_budget must be one of {HEAD_MODES}, got {head_budget!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    if head_budget == "adaptive":
        method = AdaptiveHeads(method, alpha=alpha, slack=slack)
    if layer_profile == "pyramid":
        method = PyramidBudgets(method)
    return method


def _warn_flags(stacklevel: int = 3, **flags: Any) -> None:
    used = {k: v for k, v in flags.items() if v is not None}
    if used:
        warnings.warn(
            f"SnapKVSession's {sorted(used)} are deprecated: pass method=PyramidBudgets(SnapKV()) or "
            "AdaptiveHeads(SnapKV(), alpha=..., slack=...) instead", DeprecationWarning, stacklevel=stacklevel)


@dataclass
class SnapKVSession:
    """Compress a model's prompt KV cache inside a ``with`` block (legacy; see :class:`~snapkv.SnapKVCache`).

    Example::

        with SnapKVSession(model, SnapKVConfig(budget=1024)) as session:
            cache = session.new_cache()
            out = model.generate(**inputs, past_key_values=cache, max_new_tokens=32)

    Args:
        model: a transformers decoder (``*ForCausalLM``) on any device map.
        config: window and budget.
        method: how positions are chosen (default :class:`~snapkv.methods.SnapKV` with the
            config's scoring settings); wrappers included.
        layer_profile, head_budget, alpha, slack: deprecated flags, the same as wrapping
            ``method`` in :class:`~snapkv.methods.PyramidBudgets` (``"pyramid"``) or
            :class:`~snapkv.methods.AdaptiveHeads` (``"adaptive"``, with ``alpha`` and ``slack``).
        capture: caches keep the full prompt KV and each full layer's scoring inputs, so
            :meth:`derive` can build compressed caches for many methods and budgets.
    """

    model: torch.nn.Module
    config: SnapKVConfig = field(default_factory=SnapKVConfig)
    method: Method | None = None
    layer_profile: str = "uniform"
    head_budget: str = "uniform"
    alpha: float = 0.2
    slack: int = 256
    capture: bool = False

    def __post_init__(self) -> None:
        if self.layer_profile != "uniform" or self.head_budget != "uniform":
            _warn_flags(stacklevel=5, layer_profile=None if self.layer_profile == "uniform" else self.layer_profile,
                        head_budget=None if self.head_budget == "uniform" else self.head_budget)
        if isinstance(self.slack, bool) or not isinstance(self.slack, int) or self.slack < 1:
            raise ValueError(f"slack must be an integer >= 1 (new tokens per head), got {self.slack!r}")
        self._default_method = self.method is None
        self._base = snapkv_from(self.config) if self.method is None else self.method
        self.method = wrap_method(self._base, self.layer_profile, self.head_budget, self.alpha, self.slack)
        self.backend = model_backend(self.model)
        self.layer_types = layer_types(self.model)
        self.full_layers = [i for i, t in enumerate(self.layer_types) if t == "full_attention"]
        #: Observation window of new caches (``config.window`` unless widened).
        self.window = self.config.window
        self._lease: Lease | None = None
        self._caches: weakref.WeakSet[SnapKVCache] = weakref.WeakSet()
        self._current: SnapKVCache | None = None

    # -- context -------------------------------------------------------------------------
    def __enter__(self) -> SnapKVSession:
        if self._lease is not None and self._lease.active:
            raise RuntimeError("this SnapKVSession is already open")
        self._lease = enable(self.model, strict=True)
        return self

    def __exit__(self, *exc: object) -> None:
        lease, self._lease = self._lease, None
        for cache in list(self._caches):  # the caches end with the session: no capture outlives it
            cache.end_capture()
        self._caches = weakref.WeakSet()
        self._current = None
        if lease is not None:
            lease.release()

    @property
    def _active(self) -> bool:
        return self._lease is not None and self._lease.active

    # -- caches --------------------------------------------------------------------------
    def _adopt(self, cache: SnapKVCache) -> SnapKVCache:
        self._caches.add(cache)
        self._current = cache
        return cache

    def new_cache(self) -> SnapKVCache:
        """A fresh cache for one prompt (or one batch of prompts), with the session's settings."""
        if not self._active:
            raise RuntimeError("create caches inside `with SnapKVSession(...)`")
        cache = SnapKVCache(self.model, self.config, self.method, capture=self.capture, _lease=self._lease)
        cache.window = self.window
        cache._default_method = self._default_method
        return self._adopt(cache)

    def activate(self, cache: SnapKVCache) -> None:
        """Make ``cache`` the one :attr:`stats` and :attr:`captured` read (caches route themselves)."""
        self._current = cache

    @property
    def stats(self) -> list[LayerStats]:
        """What compression did to each layer of the latest cache (``cache.stats``)."""
        return self._current.stats if self._current is not None else []

    @stats.setter
    def stats(self, value: list[LayerStats]) -> None:
        if self._current is not None:
            self._current.stats = list(value)

    @property
    def captured(self) -> dict[int, Capture]:
        """The latest cache's captured layers (``cache.captured``)."""
        return self._current.captured if self._current is not None else {}

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
        """``source.derive(...)`` (see :meth:`SnapKVCache.derive`); the legacy flags wrap the method.

        A method given here is used as is (wrap it yourself); otherwise the session's method,
        or with a ``config`` of its own that config's SnapKV, wrapped by the flags (the
        session's where left as None).
        """
        if layer_profile is not None or head_budget is not None or alpha is not None:
            _warn_flags(layer_profile=layer_profile, head_budget=head_budget, alpha=alpha)
        if method is None:
            base = snapkv_from(config) if config is not None and self._default_method else self._base
            method = wrap_method(base, layer_profile or self.layer_profile, head_budget or self.head_budget,
                                 self.alpha if alpha is None else alpha, self.slack)
        elif layer_profile is not None or head_budget is not None:
            method = wrap_method(method, layer_profile or "uniform", head_budget or "uniform",
                                 self.alpha if alpha is None else alpha, self.slack)
        return self._adopt(source.derive(method, config or self.config, window=window, prefix=prefix))

    def cache_kwargs(self, cache: SnapKVCache) -> dict[str, SnapKVCache]:
        """``{name: cache}`` with the cache keyword of the installed transformers."""
        return {cache_argument(self.model): cache}
