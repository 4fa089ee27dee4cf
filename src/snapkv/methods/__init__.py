"""Selection methods: each a small dataclass with one ``score()``; wrappers take a method."""

from snapkv.methods.base import Method, ScoreInputs
from snapkv.methods.baselines import H2O, RandomSelect, StreamingLLM
from snapkv.methods.probe import DEFAULT_PROBE, Probe
from snapkv.methods.snapkv import SnapKV
from snapkv.methods.wrappers import AdaptiveHeads, PyramidBudgets

METHODS: dict[str, type[Method]] = {
    "snapkv": SnapKV,
    "streaming": StreamingLLM,
    "random": RandomSelect,
    "h2o": H2O,
}

__all__ = [
    "DEFAULT_PROBE",
    "H2O",
    "METHODS",
    "AdaptiveHeads",
    "Method",
    "Probe",
    "PyramidBudgets",
    "RandomSelect",
    "ScoreInputs",
    "SnapKV",
    "StreamingLLM",
]
