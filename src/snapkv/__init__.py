"""SnapKV: prompt KV-cache compression for Hugging Face transformers decoders.

    cache = SnapKVCache(model, SnapKVConfig(budget=512), method=SnapKV(kernel=31))
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=32)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "H2O",
    "AdaptiveHeads",
    "Answer",
    "ContextCache",
    "LayerStats",
    "Lease",
    "KVzip",
    "Method",
    "Probe",
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

#: Where each public name lives. Imported on first use, so that ``import snapkv.config`` (the CLI's
#: argument checks) does not import torch. A new public name: add it here and to ``__all__``.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("Answer", "ContextCache", "answer", "split_prompt"), "snapkv.api"),
    "LayerStats": "snapkv.cache.compress",
    "SnapKVCache": "snapkv.cache.compressed",
    "SnapKVConfig": "snapkv.config",
    **dict.fromkeys(("Lease", "enable"), "snapkv.integration.hf"),
    "SnapKVSession": "snapkv.integration.session",
    **dict.fromkeys(("H2O", "AdaptiveHeads", "Method", "Probe", "PyramidBudgets", "RandomSelect", "ScoreInputs",
                     "SnapKV", "StreamingLLM"), "snapkv.methods"),
    "KVzip": "snapkv.methods.kvzip",
}

if TYPE_CHECKING:  # static tools see the real names
    from snapkv.api import Answer, ContextCache, answer, split_prompt
    from snapkv.cache.compress import LayerStats
    from snapkv.cache.compressed import SnapKVCache
    from snapkv.config import SnapKVConfig
    from snapkv.integration.hf import Lease, enable
    from snapkv.integration.session import SnapKVSession
    from snapkv.methods import (
        H2O,
        AdaptiveHeads,
        Method,
        Probe,
        PyramidBudgets,
        RandomSelect,
        ScoreInputs,
        SnapKV,
        StreamingLLM,
    )
    from snapkv.methods.kvzip import KVzip


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'snapkv' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
