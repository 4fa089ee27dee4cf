"""Per-request sampling: greedy at temperature 0, else temperature and nucleus (top-p) with a seed.

The decode step itself stays greedy (captured once); rows that sample draw their token from
the step's logits with their own parameters and their own seeded generator, so one request's
seed fixes its tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest set of tokens whose mass reaches ``top_p`` (``probs [V]``), renormalised."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(descending=True)
    before = sorted_p.cumsum(0) - sorted_p  # mass of the tokens ranked above each one
    sorted_p = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))
    out = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return out / out.sum()


def sample_token(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """One token (0-d tensor) from ``logits [V]``: argmax when greedy, else a seeded draw."""
    if params.greedy:
        return logits.argmax()
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    probs = top_p_filter(probs, params.top_p)
    return torch.multinomial(probs, 1, generator=gen)[0]
