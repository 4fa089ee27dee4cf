"""SnapKV: prompt KV-cache compression for Hugging Face transformers decoders."""

from snapkv.cache.compressed import SnapKVCache
from snapkv.config import SnapKVConfig
from snapkv.integration.hf import SnapKVSession
from snapkv.methods import H2O, Method, RandomSelect, SnapKV, StreamingLLM

__version__ = "0.1.0"

__all__ = [
    "H2O",
    "Method",
    "RandomSelect",
    "SnapKV",
    "SnapKVCache",
    "SnapKVConfig",
    "SnapKVSession",
    "StreamingLLM",
]
