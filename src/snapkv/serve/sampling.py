"""Per-request sampling settings; the draw itself is the engine's (greedy, or temperature and top-p, seeded).

The decode step itself stays greedy (captured once); rows that sample draw their token from
the step's logits with their own parameters and their own seeded generator, so one request's
seed fixes its tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from snapkv.generation.sampling import SamplingParams as EngineSampling
from snapkv.generation.sampling import sample_with


@dataclass(slots=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    Args:
        max_tokens: tokens to generate at most (>= 1).
        temperature: 0 for greedy, else in (0, 2].
        top_p: nucleus mass in (0, 1].
        seed: seed of the request's generator (None: random).
        stop: strings that end the text (not included in it).
        eos_ids: token ids that end the generation (not included in the text).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    eos_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must lie in [0, 2], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        """Whether the request decodes greedily."""
        return self.temperature == 0.0


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's generator on ``device`` (None for greedy requests)."""
    return _engine_params(params).generator(device)


def _engine_params(params: SamplingParams) -> EngineSampling:
    return EngineSampling(temperature=params.temperature, top_p=params.top_p, seed=params.seed)


def sample_token(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """One token (0-d tensor) from ``logits [V]``: argmax when greedy, else a seeded draw.

    The engine's sampler (:func:`snapkv.generation.sampling.sample_with`: temperature, top-p nucleus,
    exponential-trick draw), so the server and ``Engine.generate`` choose tokens the same way.
    """
    return sample_with(logits[None], _engine_params(params), gen)[0]
