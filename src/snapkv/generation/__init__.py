"""The fast path: layer-bounded prefill, a static compressed cache and a captured decode step."""

from snapkv.generation.adapter import DecoderParts, runner_for, supported_model_types
from snapkv.generation.decode import DecodeRunner, decode_one_token
from snapkv.generation.generate import Engine, GenerationOutput
from snapkv.generation.memory import NotEnoughMemoryError
from snapkv.generation.prefill import PrefillStats, prefill
from snapkv.generation.sampling import SamplingParams, sample
from snapkv.generation.static_cache import StaticKVCache
from snapkv.generation.stream import Stream, StreamStep

__all__ = [
    "DecodeRunner",
    "DecoderParts",
    "Engine",
    "GenerationOutput",
    "NotEnoughMemoryError",
    "PrefillStats",
    "SamplingParams",
    "StaticKVCache",
    "Stream",
    "StreamStep",
    "decode_one_token",
    "prefill",
    "runner_for",
    "sample",
    "supported_model_types",
]
