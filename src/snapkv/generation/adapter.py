"""The one place the engine reads a Hugging Face decoder's module structure.

Which layer runner a model gets is decided here, by its ``model_type`` only (:func:`runner_for`):
:data:`RUNNERS` maps each admitted type to the factory of its runner. Types not listed are
refused with a ``ValueError`` naming the supported ones; a model with Llama module names but
another forward (Granite, SmolLM3, OLMo, ...) is therefore never run by the hand-wired path.

Llama-family models (Llama, Mistral without a sliding window, Qwen2, Qwen3) share one layout:
``model.model.embed_tokens``, ``model.model.layers[i].{input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp}``, ``model.model.norm``, ``model.model.rotary_emb`` and
``model.lm_head``. :class:`DecoderParts` holds references to those modules (weights are shared,
never copied, and no class is patched) and the few per-token operations built on them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from snapkv.config import SnapKVConfig
    from snapkv.generation.static_cache import StaticKVCache
    from snapkv.methods.base import Method

#: ``model_type`` -> ``"module:attribute.path"`` of the factory building its layer runner
#: (``factory(model) -> DecoderParts`` or a subclass). The hand-wired Llama path is admitted
#: for exactly these four types, each checked to compute the same forward as transformers'
#: (tests/test_engine_equality.py, and the self-check every :class:`~snapkv.generation.Engine`
#: runs at construction). Another family adds its own line here, with a runner that
#: subclasses :class:`DecoderParts` and overrides :meth:`~DecoderParts.prefill_row`,
#: :meth:`~DecoderParts.decode_step` and, if it needs another cache, :meth:`~DecoderParts.make_cache`.
RUNNERS: dict[str, str] = {
    "llama": "snapkv.generation.adapter:DecoderParts.from_model",
    "mistral": "snapkv.generation.own_layers:llama_family_runner",  # own layers with a sliding window
    "qwen2": "snapkv.generation.own_layers:llama_family_runner",  # own layers with sliding layers
    "qwen3": "snapkv.generation.adapter:DecoderParts.from_model",
    # The model's own decoder layers (snapkv.generation.own_layers; tests/test_own_layers.py):
    "gemma2": "snapkv.generation.own_layers:OwnLayers.from_model",
    "gemma3_text": "snapkv.generation.own_layers:OwnLayers.from_model",  # Gemma3ForCausalLM and the multimodal ones
    "phi3": "snapkv.generation.own_layers:OwnLayers.from_model",
}

#: The types the hand-wired Llama path admits (its fused decode kernels are written for them).
LLAMA_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")

#: RoPE types whose frequencies depend only on the position (no host-side state).
STATIC_ROPE_TYPES: tuple[str, ...] = ("default", "llama3", "linear", "yarn")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dimension (``[-x2, x1]``), as Llama's RoPE does."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``x [B, H, T, D]`` with ``cos, sin [B, T, D]`` (same arithmetic as transformers)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


def _text_config(model: torch.nn.Module) -> Any:
    return model.config.get_text_config(decoder=True)


def model_type(model: torch.nn.Module) -> str:
    """The ``model_type`` of a model's text decoder config (``""`` when it has none)."""
    return str(getattr(_text_config(model), "model_type", "") or "")


def supported_model_types() -> tuple[str, ...]:
    """Model types the engine runs (sorted)."""
    return tuple(sorted(RUNNERS))


def runner_for(model: torch.nn.Module) -> DecoderParts:
    """The layer runner of ``model``: the hand-wired Llama parts or a family's own runner.

    Raises ``ValueError`` naming the model type and the supported ones when the engine has no
    runner for it, or the runner's own reason when it refuses this model's settings.
    """
    kind = model_type(model)
    target = RUNNERS.get(kind)
    if target is None:
        raise ValueError(
            f"the engine cannot run model type {kind!r} ({type(model).__name__}); supported model types: "
            f"{', '.join(supported_model_types())}. Use backend='transformers' (SnapKVSession) for it"
        )
    module, _, path = target.partition(":")
    factory: Any = importlib.import_module(module)
    for name in path.split("."):
        factory = getattr(factory, name)
    return factory(model)


@dataclass
class DecoderParts:
    """References to a Llama-family model's modules, and its shape.

    Build with :meth:`from_model`; raises ``ValueError`` for a model the engine cannot run.
    """

    model: torch.nn.Module
    embed: torch.nn.Module
    layers: list[torch.nn.Module]
    norm: torch.nn.Module
    lm_head: torch.nn.Module
    rotary: torch.nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    scaling: float
    vocab_size: int

    #: Whether :mod:`snapkv.generation.fused` may run this model's decode step (a runner that
    #: overrides :meth:`decode_step` sets it False).
    fusable = True

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> DecoderParts:
        """Check that ``model`` is an admitted Llama-family type with full attention everywhere."""
        text = _text_config(model)
        inner = getattr(model, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if inner is None or not all(hasattr(inner, n) for n in needed) or not hasattr(model, "lm_head"):
            raise ValueError(
                f"{type(model).__name__} does not have the Llama-family layout (model.model.embed_tokens, "
                "layers, norm, rotary_emb, lm_head); use SnapKVSession with model.generate instead"
            )
        layer_types = getattr(text, "layer_types", None) or []
        sliding = getattr(text, "sliding_window", None)
        uses_sliding = sliding is not None and getattr(text, "use_sliding_window", True)
        if any(t != "full_attention" for t in layer_types) or uses_sliding:
            raise ValueError(
                "the engine runs full-attention models only; this one has sliding-window layers "
                "(use SnapKVSession with model.generate, which leaves those layers alone)"
            )
        for i, layer in enumerate(inner.layers):
            attn = getattr(layer, "self_attn", None)
            parts = ("q_proj", "k_proj", "v_proj", "o_proj")
            if attn is None or not all(hasattr(attn, p) for p in parts):
                raise ValueError(f"layer {i} has no self_attn.q_proj/k_proj/v_proj/o_proj (fused projections?)")
            if not all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm", "mlp")):
                raise ValueError(f"layer {i} lacks input_layernorm, post_attention_layernorm or mlp")
        rope_type = getattr(inner.rotary_emb, "rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise ValueError(f"RoPE type {rope_type!r} is not supported by the engine; supported: {STATIC_ROPE_TYPES}")
        if getattr(text, "attn_logit_softcapping", None) or getattr(text, "final_logit_softcapping", None):
            raise ValueError("soft-capped attention or logits are not supported by the engine")
        kind = model_type(model)
        if kind not in LLAMA_TYPES:
            raise ValueError(
                f"model type {kind!r} ({type(model).__name__}) is not one the hand-wired Llama path computes "
                f"exactly; it admits {', '.join(LLAMA_TYPES)}"
            )
        attn0 = inner.layers[0].self_attn
        head_dim = attn0.head_dim
        return cls(
            model=model,
            embed=inner.embed_tokens,
            layers=list(inner.layers),
            norm=inner.norm,
            lm_head=model.lm_head,
            rotary=inner.rotary_emb,
            num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads,
            head_dim=head_dim,
            hidden_size=text.hidden_size,
            scaling=float(attn0.scaling),
            vocab_size=model.lm_head.out_features,
        )

    # -- per-layer pieces --------------------------------------------------------------------
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

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin [B, T, D]`` for ``positions [B, T]`` from the model's own rotary module."""
        return self.rotary(x, positions)

    def queries(self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Post-RoPE queries ``[B, Hq, T, D]`` of normed hidden states ``h [B, T, H]``."""
        attn = self.layers[layer].self_attn
        b, t, _ = h.shape
        q = attn.q_proj(h).view(b, t, -1, self.head_dim)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        return apply_rope(q.transpose(1, 2), cos, sin)

    def keys_values(
        self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Post-RoPE keys and values ``[B, Hkv, T, D]`` of normed hidden states ``h [B, T, H]``."""
        attn = self.layers[layer].self_attn
        b, t, _ = h.shape
        k = attn.k_proj(h).view(b, t, -1, self.head_dim)
        if hasattr(attn, "k_norm"):
            k = attn.k_norm(k)
        v = attn.v_proj(h).view(b, t, -1, self.head_dim).transpose(1, 2)
        return apply_rope(k.transpose(1, 2), cos, sin), v

    # -- the runner interface the engine calls (a family's runner overrides these) ------------
    def kept_per_layer(
        self, config: SnapKVConfig | None, length: int, profile: str = "uniform", method: Method | None = None,
        probe_tokens: int = 0,
    ) -> list[int]:
        """Prompt tokens each layer keeps of a ``length``-token prompt (every layer is compressed).

        ``probe_tokens`` (a probe at the prompt's end, cut after the prefill) changes nothing here:
        every layer is full attention and keeps the probe as its window.
        """
        from snapkv.generation.prefill import kept_per_layer

        return kept_per_layer(config, length, self.num_layers, profile, method)

    def prompt_slots(
        self, config: SnapKVConfig | None, length: int, profile: str = "uniform", method: Method | None = None,
        probe_tokens: int = 0,
    ) -> int:
        """Cache slots one prompt of ``length`` tokens needs (its largest layer)."""
        return max(self.kept_per_layer(config, length, profile, method, probe_tokens))

    def make_cache(self, batch: int, prompt_slots: int, max_new_tokens: int) -> StaticKVCache:
        """An empty static cache for ``batch`` rows of this model."""
        from snapkv.generation.static_cache import StaticKVCache

        return StaticKVCache(self.num_layers, batch, self.num_kv_heads, self.head_dim, prompt_slots,
                             max_new_tokens, dtype=self.dtype, device=self.device)

    def prefill_row(self, ids: torch.Tensor, cache: StaticKVCache, row: int, **kwargs: Any) -> torch.Tensor:
        """Prefill one prompt ``ids [n]`` into ``cache`` row ``row``; its last logits ``[V]``.

        ``kwargs`` are :func:`snapkv.generation.prefill.prefill_row`'s (kept, method, window,
        chunk, backend, timer, num_layers, whole_layer_bytes).
        """
        from snapkv.generation.prefill import prefill_row

        return prefill_row(self, ids, cache, row, **kwargs)

    def decode_step(self, cache: StaticKVCache, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row (``tokens [B]``) over ``cache``; logits ``[B, V]`` (eager, capturable)."""
        from snapkv.generation.decode import decode_one_token

        return decode_one_token(self, cache, tokens)

    def weight_bytes(self) -> int:
        """Bytes of all parameters (what one decode step must read at least once)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())
