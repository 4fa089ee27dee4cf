"""Registry of tiny, randomly initialised decoders, one per supported model family.

Each model has a few layers, hidden size 64, a 256-token vocabulary, float32 weights and
grouped-query attention (4 query heads over 2 KV heads) where the family allows it. The
initialiser range is raised above the families' default so that attention is peaked, not
uniform: the window's votes then separate positions clearly and selections are stable.
"""

from __future__ import annotations

import torch
import transformers as tf

#: Sliding window of the hybrid families, small enough that test prompts exceed it.
SLIDING_WINDOW = 16

_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)


def _configs() -> dict[str, tuple[type, type, dict]]:
    return {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(num_hidden_layers=2, head_dim=16)),
        "mistral": (
            tf.MistralConfig,
            tf.MistralForCausalLM,
            dict(num_hidden_layers=2, head_dim=16, sliding_window=None),
        ),
        "mistral_sw": (
            tf.MistralConfig,
            tf.MistralForCausalLM,
            dict(num_hidden_layers=2, head_dim=16, sliding_window=SLIDING_WINDOW),
        ),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(num_hidden_layers=2)),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, dict(num_hidden_layers=2, head_dim=16)),
        "gemma2": (
            tf.Gemma2Config,
            tf.Gemma2ForCausalLM,
            dict(
                num_hidden_layers=2,
                head_dim=16,
                query_pre_attn_scalar=40,  # scaling differs from head_dim ** -0.5
                sliding_window=SLIDING_WINDOW,
                layer_types=["sliding_attention", "full_attention"],
                attn_logit_softcapping=5.0,  # low enough to change the scores
                final_logit_softcapping=30.0,
            ),
        ),
        "gemma3": (
            tf.Gemma3TextConfig,
            tf.Gemma3ForCausalLM,
            dict(
                num_hidden_layers=3,
                head_dim=16,
                query_pre_attn_scalar=40,  # scaling differs from head_dim ** -0.5
                sliding_window=SLIDING_WINDOW,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            ),
        ),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, dict(num_hidden_layers=2)),
        "mixtral": (
            tf.MixtralConfig,
            tf.MixtralForCausalLM,
            dict(num_hidden_layers=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2),
        ),
    }


FAMILIES: tuple[str, ...] = tuple(_configs())

#: Families whose layers are all full attention (every layer is compressed).
FULL_ONLY: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral")

#: Families with sliding-window layers that SnapKV must leave alone.
HYBRID: tuple[str, ...] = ("gemma2", "gemma3", "mistral_sw")

#: Families without an SDPA implementation (soft-capped attention): they run eager.
EAGER_ONLY: tuple[str, ...] = ("gemma2",)


def tiny_config(family: str):
    """The config of ``family``'s tiny model."""
    cfg_cls, _, extra = _configs()[family]
    return cfg_cls(**{**_COMMON, **extra})


def tiny_model(family: str, attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny ``*ForCausalLM`` of ``family``, float32, eval mode.

    ``attn_implementation="sdpa"`` on a family in :data:`EAGER_ONLY` gives eager attention.
    """
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; known: {FAMILIES}")
    _, model_cls, _ = _configs()[family]
    if family in EAGER_ONLY and attn_implementation == "sdpa":
        attn_implementation = "eager"
    config = tiny_config(family)
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    model.eval()
    gen = model.generation_config
    gen.eos_token_id = None  # random models must not stop early: fixed-length generations
    gen.pad_token_id = 0
    gen.do_sample = False
    return model


def left_padded(lengths: list[int], seed: int = 0, vocab: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded with token 0: ``(input_ids, attention_mask)``."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


def greedy_generate(model, ids, mask, steps, **kwargs):
    """Greedy ``generate`` returning sequences and per-step logits."""
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
