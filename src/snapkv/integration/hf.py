"""transformers glue: one SnapKV attention function per model, routed by the cache in use.

Nothing is monkeypatched and no state outlives its users. :func:`enable` registers an
attention function (and the matching mask function) under a name unique to the model,
switches the model to it, checks that the switch happened, and returns a :class:`Lease`.
Leases are reference-counted per model: the function stays while any lease is held (a
:class:`~snapkv.cache.SnapKVCache` holds one, a :class:`~snapkv.SnapKVSession` holds one),
and releasing the last one restores the model's own implementation and removes both
registrations.

The function itself holds no settings. Each cache routes its own forwards: when a
:class:`~snapkv.cache.SnapKVCache` stores a layer's keys it marks itself in a context
variable (one per thread and per asyncio task) as the cache of the next attention call, and
the function hands that call to the cache, which attends and compresses with its own config
and method. So any number of caches, sessions and threads can interleave on one model.

A forward whose cache is not a SnapKV cache runs the model's own backend unchanged (it asks
for no compression), except while a :class:`~snapkv.SnapKVSession` is open on the model:
inside a session such a forward is a mistake (the session's cache was not passed) and raises.
"""

from __future__ import annotations

import inspect
import itertools
import sys
import threading
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

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


def text_config(model: torch.nn.Module) -> Any:
    """The decoder's config (the model's own for text-only models)."""
    return model.config.get_text_config(decoder=True)


def layer_types(model: torch.nn.Module) -> list[str]:
    """``full_attention`` / ``sliding_attention`` (...) of every decoder layer."""
    text = text_config(model)
    return list(getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers)


def model_backend(model: torch.nn.Module) -> str:
    """The attention implementation SnapKV would wrap; ``ValueError`` if it cannot."""
    hook = _HOOKS.get(id(model))
    if hook is not None and hook.model is model:
        return hook.backend
    backend = text_config(model)._attn_implementation or "eager"
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"attention implementation {backend!r} cannot be wrapped by SnapKV; "
            f"load the model with attn_implementation in {sorted(SUPPORTED_BACKENDS)}"
        )
    return backend


def _backend_function(name: str, module: torch.nn.Module) -> Callable[..., Any]:
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def key_valid_from_mask(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """``[B, L]`` bool (False at padding) read off the backend's prefill mask, or None.

    A 4-D mask is read at its last query row: causal masks let it see every real key of
    its row, whether the row is padded on the left or on the right.
    """
    if mask is None:
        return None
    if mask.dim() == 2:
        valid = mask.bool()
    elif mask.dim() == 4:
        last = mask[:, 0, -1, :]  # the last query sees every real key of its row, padded left or right
        valid = last if last.dtype == torch.bool else last == 0
    else:
        raise ValueError(f"unexpected attention mask of shape {tuple(mask.shape)}")
    if valid.shape[-1] != length:
        raise ValueError(f"attention mask covers {valid.shape[-1]} keys, the layer holds {length}")
    valid = valid.expand(batch, length)
    return None if bool(valid.all()) else valid


def decode_mask(layer: Any, q_len: int, kind: str, dtype: torch.dtype) -> torch.Tensor:
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


# -- routing: which cache the next attention call of this thread belongs to ------------------


@dataclass(slots=True, frozen=True)
class _Route:
    cache: weakref.ref
    layer_idx: int
    key: weakref.ref


_ROUTE: ContextVar[_Route | None] = ContextVar("snapkv_route", default=None)


def mark_route(cache: Any, layer_idx: int, key: torch.Tensor) -> None:
    """Record ``cache`` as the owner of this thread's next attention call (of ``layer_idx`` on ``key``).

    Raises ``RuntimeError`` when the previous mark of this cache was never consumed: the
    model ran an attention that was not SnapKV's (its implementation was switched away, or
    the cache is used with a model SnapKV is not enabled on).
    """
    previous = _ROUTE.get()
    if previous is not None and previous.cache() is cache:
        _ROUTE.set(None)
        raise RuntimeError(
            f"layer {previous.layer_idx} of this SnapKVCache was attended by another attention function "
            "than SnapKV's: the cache is used with a model SnapKV is not enabled on, or the model's "
            "attention implementation was changed while the cache is in use"
        )
    _ROUTE.set(_Route(weakref.ref(cache), layer_idx, weakref.ref(key)))


def _take_route(layer_idx: int, key: torch.Tensor) -> Any:
    """The cache that marked this call (and clear the mark), or None."""
    route = _ROUTE.get()
    if route is None:
        return None
    _ROUTE.set(None)
    cache = route.cache()
    if cache is None or route.layer_idx != layer_idx:  # a mark left by an interrupted forward
        return None
    if route.key() is not key:
        raise RuntimeError(
            f"layer {layer_idx}'s attention received other keys than its SnapKV cache returned (the model "
            "transforms the cached keys before attention); SnapKV cannot compress this model"
        )
    return cache


# -- one attention function per model, reference-counted -------------------------------------


class _ModelHook:
    """SnapKV's attention function registered on one model while leases are held."""

    def __init__(self, model: torch.nn.Module, backend: str) -> None:
        self.model = model
        self.backend = backend
        self.kind = SUPPORTED_BACKENDS[backend]
        self.name = f"snapkv_{backend}_{next(_ids)}"
        self.users = 0
        self.strict_users = 0

    def attention(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        """The registered function: hand the call to the cache that marked it, else the backend."""
        backend = _backend_function(self.backend, module)
        cache = _take_route(module.layer_idx, key)
        if cache is None:
            if self.strict_users:
                raise RuntimeError(
                    "SnapKV found no SnapKV cache in this forward: pass the cache from "
                    "`session.new_cache()` as the model's cache (use_cache must stay on)"
                )
            return backend(module, query, key, value, attention_mask, **kwargs)
        if cache.model is not self.model:
            raise RuntimeError("this SnapKVCache was built for another model")
        return cache.attend(module, query, key, value, attention_mask, backend, self.kind, kwargs)

    def install(self) -> None:
        AttentionInterface.register(self.name, self.attention)
        AttentionMaskInterface.register(self.name, AttentionMaskInterface._global_mapping[self.backend])
        try:
            self.model.set_attn_implementation(self.name)
            self._check_switched()
        except BaseException:
            self.uninstall()
            raise

    def _check_switched(self) -> None:
        """transformers only logs a warning when a model cannot switch (legacy/remote code): raise."""
        stale = [] if text_config(self.model)._attn_implementation == self.name else ["config"]
        for name, module in self.model.named_modules():
            cfg = getattr(module, "config", None)
            if hasattr(module, "layer_idx") and getattr(cfg, "_attn_implementation", self.name) != self.name:
                stale.append(name)
        if stale:
            raise ValueError(
                f"{type(self.model).__name__}.set_attn_implementation() did not switch the attention of "
                f"{stale[:3]}{' ...' if len(stale) > 3 else ''} to SnapKV's (legacy or remote-code modeling "
                "files ignore it); SnapKV cannot compress this model's cache"
            )

    def uninstall(self) -> None:
        try:
            if text_config(self.model)._attn_implementation != self.backend:
                self.model.set_attn_implementation(self.backend)
        finally:
            AttentionInterface._global_mapping.pop(self.name, None)
            AttentionMaskInterface._global_mapping.pop(self.name, None)


_HOOKS: dict[int, _ModelHook] = {}
_LOCK = threading.RLock()


class Lease:
    """One user's hold on SnapKV's attention function of a model (see :func:`enable`).

    ``release()`` is idempotent and thread-safe; ``with`` releases on exit.
    """

    def __init__(self, hook: _ModelHook, strict: bool) -> None:
        self.hook, self.strict = hook, strict
        self._held = True

    @property
    def active(self) -> bool:
        """Whether this lease still holds the function."""
        return self._held

    @property
    def model(self) -> torch.nn.Module:
        """The model the function is registered on."""
        return self.hook.model

    def release(self) -> None:
        """Give the hold back; the last release restores the model."""
        with _LOCK:
            if not self._held:
                return
            self._held = False
            hook = self.hook
            hook.users -= 1
            hook.strict_users -= self.strict
            if hook.users == 0:
                del _HOOKS[id(hook.model)]
                hook.uninstall()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def enable(model: torch.nn.Module, *, strict: bool = False) -> Lease:
    """Hold SnapKV's attention function on ``model`` (registered by the first holder).

    Raises ``ValueError`` when the model's attention implementation cannot be wrapped or
    the model does not switch to SnapKV's. ``strict``: while held, forwards without a SnapKV
    cache raise instead of running the model's own attention (what a session asks).
    """
    with _LOCK:
        hook = _HOOKS.get(id(model))
        if hook is None or hook.model is not model:
            hook = _ModelHook(model, model_backend(model))
            hook.install()
            _HOOKS[id(model)] = hook
        hook.users += 1
        hook.strict_users += strict
        return Lease(hook, strict)


def enabled_models() -> list[torch.nn.Module]:
    """Models SnapKV's attention function is registered on now (empty when nobody uses SnapKV)."""
    with _LOCK:
        return [hook.model for hook in _HOOKS.values()]


#: Names that moved out of this module, and where they live now.
_MOVED = {"SnapKVSession": "snapkv.integration.session", "LayerStats": "snapkv.cache.compress"}


def __getattr__(name: str) -> Any:
    """Names that moved out of this module (importable from here for one release)."""
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    import warnings

    warnings.warn(f"import {name} from snapkv (or {_MOVED[name]}); snapkv.integration.hf.{name} is deprecated",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(_MOVED[name]), name)
