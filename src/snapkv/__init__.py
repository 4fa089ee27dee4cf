"""SnapKV: prompt KV-cache compression for Hugging Face transformers decoders.

    cache = SnapKVCache(model, SnapKVConfig(budget=512), method=SnapKV(kernel=31))
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=32)
"""

from snapkv.api import Answer, ContextCache, answer, split_prompt
from snapkv.cache.compress import LayerStats
from snapkv.cache.compressed import SnapKVCache
from snapkv.config import SnapKVConfig
from snapkv.integration.hf import Lease, enable
from snapkv.integration.session import SnapKVSession
from snapkv.methods import H2O, AdaptiveHeads, Method, PyramidBudgets, RandomSelect, ScoreInputs, SnapKV, StreamingLLM

__version__ = "0.1.0"

__all__ = [
    "H2O",
    "AdaptiveHeads",
    "Answer",
    "ContextCache",
    "LayerStats",
    "Lease",
    "Method",
    "PyramidBudgets",
    "RandomSelect",
    "ScoreInputs",
    "SnapKV",
    "SnapKVCache",
    "SnapKVConfig",
    "SnapKVSession",
    "StreamingLLM",
    "answer",
    "enable",
    "split_prompt",
]
