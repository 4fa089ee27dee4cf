"""Tiny stand-ins for the eval tests: a byte-level codec and random-weight decoders."""

from __future__ import annotations

import argparse

import torch
import transformers as tf

from snapkv.eval.runner import add_arguments
from snapkv.eval.tasks import Codec


def byte_codec(chat: bool = False) -> Codec:
    """One token per UTF-8 byte (ids 0-255); 'chat' frames the prompt with fixed markers."""
    enc = lambda text: list(text.encode("utf-8"))  # noqa: E731
    dec = lambda ids: bytes(i for i in ids if i < 256).decode("utf-8", errors="ignore")  # noqa: E731
    head = enc("<user>") if chat else ()
    tail = enc("</user><bot>") if chat else ()
    return Codec(enc, dec, head, tail, chat=chat, eos=[0], name="bytes")


def tiny_llama() -> torch.nn.Module:
    """A 2-layer random Llama with GQA over the byte vocabulary."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=4096, initializer_range=0.2)
    return tf.LlamaForCausalLM(cfg).eval()


def tiny_gemma3() -> torch.nn.Module:
    """A 3-layer random Gemma-3 with two sliding-window layers and one full-attention layer."""
    torch.manual_seed(0)
    cfg = tf.Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=16,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                              max_position_embeddings=4096, initializer_range=0.2)
    return tf.Gemma3ForCausalLM(cfg).eval()


def eval_args(*argv: str) -> argparse.Namespace:
    """Parsed ``snapkv eval`` arguments."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))
