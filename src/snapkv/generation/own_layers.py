"""The engine on the model's own decoder layers: no second copy of any family's forward.

:class:`OwnLayers` plays the role of :class:`~snapkv.generation.adapter.DecoderParts` for
models whose layers the engine does not hand-wire (Gemma 2, Gemma 3, Phi-3; and, as the
reference twin of the hand-wired path, Llama, Mistral, Qwen2, Qwen3). It calls each decoder
layer's own ``forward`` with

* ``position_embeddings`` from the model's own rotary module (per layer type where the model
  has several, e.g. Gemma 3's local and global RoPE bases);
* a small cache object of ours as the layer's cache: its ``update()`` collects the layer's
  post-RoPE keys and values (prefill) or writes them into the static cache's slot ``write_pos``
  with ``index_copy_`` (decode), and returns the keys and values attention should use;
* an attention function of ours, registered through transformers' ``AttentionInterface``
  only while the engine runs (:func:`own_attention`), that honours the layer's ``scaling``,
  ``softcap`` and ``sliding_window`` and raises on what it cannot honour.

What lies outside the layers is read off the model, not re-derived: the embedding module (Gemma's
scale lives in it), the final norm, ``lm_head`` and the config's ``final_logit_softcapping``.
Only model types in :data:`OWN_LAYER_MODEL_TYPES`, each checked against transformers by the
tests, are accepted. Prefill and decode live in :mod:`snapkv.generation.own_run`.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface

from snapkv.config import SnapKVConfig
from snapkv.core.budgets import layer_budget
from snapkv.generation.adapter import STATIC_ROPE_TYPES
from snapkv.generation.static_cache import StaticKVCache
from snapkv.methods.base import Method

#: Model types whose own layers the engine runs (each has an equality test against transformers).
OWN_LAYER_MODEL_TYPES: tuple[str, ...] = (
    "gemma2", "gemma3_text", "phi3", "llama", "mistral", "qwen2", "qwen3",
)

#: Model types the engine runs on their own layers by default (the others are hand-wired).
OWN_LAYER_DEFAULT_TYPES: tuple[str, ...] = ("gemma2", "gemma3_text", "phi3")

#: Config attributes that scale activations outside the decoder layers (models that have them
#: and are not listed above would be computed wrongly, so they are refused by name).
_OUTSIDE_SCALES = ("embedding_multiplier", "logits_scaling", "logit_scale", "residual_multiplier")

_ids = itertools.count()


def _text_config(model: torch.nn.Module) -> Any:
    return model.config.get_text_config(decoder=True)


def layer_kinds(text: Any) -> list[str]:
    """``"full"`` or ``"sliding"`` per layer, as the model's config declares them."""
    n = text.num_hidden_layers
    types = getattr(text, "layer_types", None)
    if types:
        unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise ValueError(f"layer types {unknown} are not supported by the engine")
        return ["sliding" if t == "sliding_attention" else "full" for t in types]
    window = getattr(text, "sliding_window", None)
    if window is not None and getattr(text, "use_sliding_window", True):
        return ["sliding"] * n
    return ["full"] * n


def cache_keyword(layer: torch.nn.Module) -> str:
    """The keyword under which this transformers version's decoder layer takes its cache."""
    params = inspect.signature(layer.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@contextmanager
def own_attention(model: torch.nn.Module, fn: Callable[..., Any], name: str | None = None) -> Iterator[None]:
    """Run ``model``'s layers with attention ``fn`` inside the block; restore and unregister after.

    ``name``: the registration name (default: a fresh one); a fixed one keeps compiled code valid.
    """
    name = name or f"snapkv_own_{next(_ids)}"
    original = _text_config(model)._attn_implementation or "eager"
    AttentionInterface.register(name, fn)
    try:
        model.set_attn_implementation(name)
        try:
            yield
        finally:
            model.set_attn_implementation(original)
    finally:
        AttentionInterface._global_mapping.pop(name, None)


@dataclass
class OwnLayers:
    """References to a model's own modules, its shape and its layer kinds.

    Build with :meth:`from_model`; raises ``ValueError`` for a model the engine cannot run.
    """

    model: torch.nn.Module
    embed: torch.nn.Module
    layers: list[torch.nn.Module]
    norm: torch.nn.Module
    lm_head: torch.nn.Module
    rotary: torch.nn.Module
    kinds: list[str]
    rope_types: list[str | None]
    sliding_window: int | None
    final_softcap: float | None
    cache_kw: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    own_layers: bool = True  # the engine's marker: prefill and decode run the layers' own forwards

    #: The fused hand-wired decode kernels never apply (they compute the Llama layer).
    fusable = False

    def __post_init__(self) -> None:
        self.attention_name = f"snapkv_own_decode_{next(_ids)}"
        self.compiled_body: Callable[..., torch.Tensor] | None = None
        self._decode_attention: Any = None

    def decode_attention(self) -> Any:
        """This model's decode attention object (one per :class:`OwnLayers`)."""
        if self._decode_attention is None:
            from snapkv.generation.own_run import DecodeAttention

            self._decode_attention = DecodeAttention(self)
        return self._decode_attention

    def compile_decode(self) -> None:
        """Run decode steps through ``torch.compile`` (fullgraph, static shapes; opt-in).

        The first step compiles (about a minute for a 34-layer model); later steps, or a CUDA
        graph captured over them, run the fused kernels. Note: the compiled step copies the
        layers' K/V buffers it writes (functionalised in-place update), a cost that grows with
        the cache: use it with a budget, not with a full long-prompt cache.
        """
        from snapkv.generation.own_run import decode_body

        self.compiled_body = torch.compile(decode_body, fullgraph=True, dynamic=False)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> OwnLayers:
        """Check the model type and layout; raises ``ValueError`` naming what is unsupported."""
        text = _text_config(model)
        mtype = getattr(text, "model_type", None)
        if mtype not in OWN_LAYER_MODEL_TYPES:
            raise ValueError(
                f"model type {mtype!r} is not supported by the engine's own-layer runner; "
                f"supported: {OWN_LAYER_MODEL_TYPES}"
            )
        inner = getattr(model, "model", None)
        inner = getattr(inner, "language_model", inner)  # Gemma 3's multimodal checkpoints: text input only
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if inner is None or not all(hasattr(inner, n) for n in needed) or not hasattr(model, "lm_head"):
            raise ValueError(f"{type(model).__name__} lacks model.embed_tokens/layers/norm/rotary_emb or lm_head")
        for attr in _OUTSIDE_SCALES:
            if getattr(text, attr, None) not in (None, 1, 1.0):
                raise ValueError(f"config.{attr} scales activations outside the layers; not supported")
        kinds = layer_kinds(text)
        if len(kinds) != len(inner.layers):
            raise ValueError(f"config declares {len(kinds)} layer types for {len(inner.layers)} layers")
        rope = getattr(inner.rotary_emb, "rope_type", "default")
        rope_names = set(rope.values()) if isinstance(rope, dict) else {rope}
        bad = sorted(rope_names - set(STATIC_ROPE_TYPES))
        if bad:
            raise ValueError(f"RoPE type(s) {bad} are not supported by the engine; supported: {STATIC_ROPE_TYPES}")
        per_type = "layer_type" in inspect.signature(inner.rotary_emb.forward).parameters
        types = list(getattr(text, "layer_types", None) or [None] * len(kinds))
        window = getattr(text, "sliding_window", None) if "sliding" in kinds else None
        attn0 = inner.layers[0].self_attn
        return cls(
            model=model,
            embed=inner.embed_tokens,
            layers=list(inner.layers),
            norm=inner.norm,
            lm_head=model.lm_head,
            rotary=inner.rotary_emb,
            kinds=kinds,
            rope_types=types if per_type else [None] * len(kinds),
            sliding_window=window,
            final_softcap=getattr(text, "final_logit_softcapping", None),
            cache_kw=cache_keyword(inner.layers[0]),
            num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads,
            head_dim=attn0.head_dim,
            hidden_size=text.hidden_size,
            vocab_size=model.lm_head.out_features,
        )

    # -- shape -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Decoder layers."""
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        """Device of the token embedding."""
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the token embedding (the activations' dtype)."""
        return self.embed.weight.dtype

    @property
    def full_layers(self) -> list[int]:
        """Indices of the full-attention layers (the ones SnapKV compresses)."""
        return [i for i, k in enumerate(self.kinds) if k == "full"]

    def weight_bytes(self) -> int:
        """Bytes of all parameters (what one decode step must read at least once)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    # -- budgets -----------------------------------------------------------------------------
    def kept_per_layer(
        self, config: SnapKVConfig | None, length: int, profile: str = "uniform", method: Method | None = None,
        probe_tokens: int = 0,
    ) -> list[int]:
        """Prompt tokens each layer keeps: a sliding layer its last ``window - 1``, a full layer its
        budget (ranked among the full layers for the pyramid profile and ``method``'s own layer
        budget, as the transformers path does).

        ``probe_tokens``: the prompt ends with a probe of that many tokens that is cut after the
        prefill (``Engine.prefill(probe_tokens=...)``): a sliding layer keeps that many more, so
        that its last ``window - 1`` context tokens remain once the probe is gone (their keys and
        values do not depend on the probe: attention is causal).
        """
        full = self.full_layers
        out = []
        for i, kind in enumerate(self.kinds):
            if kind == "sliding":
                out.append(min(length, self.sliding_window - 1 + probe_tokens))
                continue
            k = length if config is None else config.kept_tokens(length, config.window)
            if k < length:
                rank = full.index(i)
                k = min(length, layer_budget(profile, k, config.window, rank, len(full)))
                if method is not None:
                    k = min(length, method.layer_budget(k, config.window, rank, len(full)))
            out.append(k)
        return out

    def prompt_slots(
        self, config: SnapKVConfig | None, length: int, profile: str = "uniform", method: Method | None = None,
        probe_tokens: int = 0,
    ) -> int:
        """Cache slots one prompt of ``length`` tokens needs (its largest layer)."""
        return max(self.kept_per_layer(config, length, profile, method, probe_tokens))

    # -- the engine's runner interface (prefill one row, one decode step, a cache) ----------------
    def make_cache(self, batch: int, prompt_slots: int, max_new_tokens: int) -> StaticKVCache:
        """An empty static cache for ``batch`` rows of this model (all layers in one layout)."""
        return StaticKVCache(self.num_layers, batch, self.num_kv_heads, self.head_dim, prompt_slots,
                             max_new_tokens, dtype=self.dtype, device=self.device)

    def prefill_row(self, ids: torch.Tensor, cache: StaticKVCache, row: int, **kwargs: Any) -> torch.Tensor:
        """Prefill one prompt ``ids [n]`` into ``cache`` row ``row``; its last logits ``[V]``.

        ``kwargs``: :func:`~snapkv.generation.own_run.own_prefill_row`'s (``kept`` from
        :meth:`kept_per_layer`, method, window, chunk, backend, timer, num_layers); a
        ``whole_layer_bytes`` allowance is accepted and unused (the layers run by chunks).
        """
        from snapkv.generation.own_run import own_prefill_row

        kwargs.pop("whole_layer_bytes", None)
        return own_prefill_row(self, ids, cache, row, **kwargs)

    def decode_step(self, cache: StaticKVCache, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row (``tokens [B]``) over ``cache``; logits ``[B, V]`` (eager, capturable)."""
        from snapkv.generation.own_run import decode_step

        return decode_step(self, cache, tokens)

    # -- the pieces outside the layers ---------------------------------------------------------
    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> dict[str | None, tuple[torch.Tensor, torch.Tensor]]:
        """``{rope type: (cos, sin) [B, T, D]}`` for ``positions [B, T]`` from the model's rotary module."""
        out = {}
        for t in dict.fromkeys(self.rope_types):
            out[t] = self.rotary(x, positions) if t is None else self.rotary(x, positions, t)
        return out

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm, ``lm_head`` and the final soft-cap of hidden states ``x [..., H]``."""
        logits = self.lm_head(self.norm(x))
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def run_layer(
        self, li: int, x: torch.Tensor, pe: dict, positions: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """Layer ``li``'s own forward on hidden states ``x [B, T, H]``; returns its output."""
        out = self.layers[li](
            x,
            position_embeddings=pe[self.rope_types[li]],
            attention_mask=None,
            position_ids=positions,
            **{self.cache_kw: cache},
        )
        return out[0] if isinstance(out, tuple) else out


def uses_own_layers(model: torch.nn.Module) -> bool:
    """Whether the engine runs ``model`` on its own layers by default: the families it does not
    hand-wire, and hand-wired families whose config has sliding-window layers."""
    text = _text_config(model)
    mtype = getattr(text, "model_type", None)
    if mtype in OWN_LAYER_DEFAULT_TYPES:
        return True
    return mtype in OWN_LAYER_MODEL_TYPES and "sliding" in layer_kinds(text)


def llama_family_runner(model: torch.nn.Module) -> Any:
    """The runner of a Llama-family model: the hand-wired parts, or its own layers when its config
    has sliding-window layers (which the hand-wired path refuses)."""
    from snapkv.generation.adapter import DecoderParts

    if "sliding" in layer_kinds(_text_config(model)):
        return OwnLayers.from_model(model)
    return DecoderParts.from_model(model)
