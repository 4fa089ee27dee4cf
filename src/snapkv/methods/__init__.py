"""Selection methods: each a small dataclass with one ``score()``."""

from snapkv.methods.base import Method, ScoreInputs
from snapkv.methods.baselines import H2O, RandomSelect, StreamingLLM
from snapkv.methods.snapkv import SnapKV

METHODS: dict[str, type[Method]] = {
    "snapkv": SnapKV,
    "streaming": StreamingLLM,
    "random": RandomSelect,
    "h2o": H2O,
}

__all__ = ["METHODS", "H2O", "Method", "RandomSelect", "ScoreInputs", "SnapKV", "StreamingLLM"]
