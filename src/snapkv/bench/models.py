"""Models for benchmarks: random weights of real shapes, or the project's offline models.

Random weights are drawn by transformers' own initializer (normal, std 0.02; norms at 1), on
the target device, so every matrix product does real work on real-looking data (never zeros).
"""

from __future__ import annotations

from typing import Any

import torch

#: Shapes with random weights: name -> (transformers config class name, config kwargs).
RANDOM_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    # Meta-Llama-3-8B: 32 layers, hidden 4096, 32 query / 8 KV heads of 128, MLP 14336, vocab 128256.
    "llama3-8b": (
        "LlamaConfig",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            max_position_embeddings=1 << 21,
            tie_word_embeddings=False,
        ),
    ),
    # Qwen2-0.5B-like: biases on q/k/v, 14 query / 2 KV heads of 64.
    "qwen2-small": (
        "Qwen2Config",
        dict(
            vocab_size=32000,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=4,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=1 << 17,
            tie_word_embeddings=True,
        ),
    ),
    # Mistral-7B-like head layout (32 / 8 heads of 128), shallow and narrow in the MLP.
    "mistral-small": (
        "MistralConfig",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=2048,
            num_hidden_layers=2,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            sliding_window=None,
            max_position_embeddings=1 << 17,
        ),
    ),
    # Gemma-3-4B text: 34 layers (5 of every 6 with a 1,024-token sliding window), hidden 2560, 8 query /
    # 4 KV heads of 256, MLP 10240, vocab 262208, tied embeddings (scripts/bench_gemma.py's shape).
    "gemma3-4b": (
        "Gemma3TextConfig",
        dict(
            vocab_size=262208,
            hidden_size=2560,
            intermediate_size=10240,
            num_hidden_layers=34,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=1024,
            max_position_embeddings=131072 + 4096,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
            tie_word_embeddings=True,
        ),
    ),
    # Tiny Llama for CPU runs and tests.
    "tiny-llama": (
        "LlamaConfig",
        dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=1 << 16,
            initializer_range=0.2,
        ),
    ),
}


#: Model classes whose name is not the config's with ``ForCausalLM`` for ``Config``.
_MODEL_CLASSES = {"Gemma3TextConfig": "Gemma3ForCausalLM"}


def random_model(
    shape: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    num_layers: int | None = None,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> torch.nn.Module:
    """A ``*ForCausalLM`` of a named shape with random weights, built directly on ``device``.

    Args:
        shape: a key of :data:`RANDOM_SHAPES`.
        device: where to build it.
        dtype: weight dtype.
        num_layers: override the depth (same per-layer shape).
        seed: RNG seed of the initializer.
        attn_implementation: transformers attention backend.
    """
    import transformers

    if shape not in RANDOM_SHAPES:
        raise ValueError(f"shape must be one of {sorted(RANDOM_SHAPES)}, got {shape!r}")
    cfg_name, kwargs = RANDOM_SHAPES[shape]
    kwargs = dict(kwargs)
    if num_layers is not None:
        kwargs["num_hidden_layers"] = num_layers
    config = getattr(transformers, cfg_name)(**kwargs)
    model_cls = getattr(transformers, _MODEL_CLASSES.get(cfg_name, cfg_name.replace("Config", "ForCausalLM")))
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.eval()
    model.requires_grad_(False)
    return model


def load_bench_model(
    name: str, *, device: str | torch.device, dtype: torch.dtype | None = None, num_layers: int | None = None
) -> tuple[torch.nn.Module, str]:
    """``(model, description)``: a random shape from :data:`RANDOM_SHAPES`, else an offline model."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if name in RANDOM_SHAPES:
        model = random_model(name, device=device, dtype=dtype, num_layers=num_layers)
        return model, f"{name} (random weights, {str(dtype).removeprefix('torch.')})"
    from snapkv.models import load_model

    model, _ = load_model(name, device=device, dtype=dtype)
    model.requires_grad_(False)
    return model, f"{name} ({str(dtype).removeprefix('torch.')})"
