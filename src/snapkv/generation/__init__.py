"""The fast path: layer-bounded prefill, a static compressed cache and a captured decode step."""

from snapkv.generation.adapter import DecoderParts
from snapkv.generation.decode import DecodeRunner, decode_one_token, sample
from snapkv.generation.generate import Engine, GenerationOutput
from snapkv.generation.memory import NotEnoughMemoryError
from snapkv.generation.prefill import PrefillStats, prefill
from snapkv.generation.static_cache import StaticKVCache

__all__ = [
    "DecodeRunner",
    "DecoderParts",
    "Engine",
    "GenerationOutput",
    "NotEnoughMemoryError",
    "PrefillStats",
    "StaticKVCache",
    "decode_one_token",
    "prefill",
    "sample",
]
