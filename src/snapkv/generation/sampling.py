"""Sync-free next-token choice: greedy, or sampled with temperature, top-k, top-p and a seed.

Sampling uses the exponential trick (gpt-fast generate.py:43-45): ``argmax(p / E)`` with
``E ~ Exp(1)`` draws from ``p`` without a host sync or a multinomial kernel. The noise comes
from a ``torch.Generator`` seeded per request, so a seed reproduces a sample on one device.
:func:`filter_logits` (top-k, then top-p) has a plain per-row twin, :func:`filter_logits_ref`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How each next token is chosen.

    Args:
        temperature: 0 for greedy (argmax of the logits), else the softmax temperature (> 0).
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``
            (nucleus sampling), in (0, 1]; 1 keeps all.
        top_k: keep the ``top_k`` most likely tokens; 0 keeps all.
        seed: seed of this request's generator (None: a fresh random seed).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0.0 or t == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {p!r}")
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        s = self.seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {s!r}")

    @property
    def greedy(self) -> bool:
        """Whether tokens are chosen by argmax."""
        return self.temperature == 0.0

    def generator(self, device: torch.device | str) -> torch.Generator | None:
        """This request's generator on ``device`` (None when greedy)."""
        if self.greedy:
            return None
        gen = torch.Generator(device=device)
        if self.seed is None:
            gen.seed()
        else:
            gen.manual_seed(self.seed)
        return gen


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``logits [B, V]`` with every token outside the top-k, then the top-p nucleus, set to -inf.

    The nucleus keeps the most likely tokens up to and including the one whose cumulative
    probability first reaches ``top_p`` (at least one token). Ties at the k-th value are kept.
    """
    out = logits
    v = logits.shape[-1]
    if 0 < top_k < v:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]  # [B, 1]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def filter_logits_ref(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Plain per-row twin of :func:`filter_logits` (Python lists, float64)."""
    rows = []
    for row in logits.double().tolist():
        keep = set(range(len(row)))
        if 0 < top_k < len(row):
            kth = sorted(row, reverse=True)[top_k - 1]
            keep = {i for i in keep if row[i] >= kth}
        if top_p < 1.0:
            order = sorted(keep, key=lambda i: -row[i])
            m = max(row[i] for i in order)
            weights = [torch.tensor(row[i] - m).exp().item() for i in order]
            total = sum(weights)
            kept, acc = set(), 0.0
            for i, w in zip(order, weights, strict=True):
                if kept and acc >= top_p:
                    break
                kept.add(i)
                acc += w / total
            keep = kept
        rows.append([x if i in keep else float("-inf") for i, x in enumerate(row)])
    return torch.tensor(rows, dtype=logits.dtype)


def sample(
    logits: torch.Tensor,
    temperature: float = 0.0,
    *,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next tokens ``[B]`` from ``logits [B, V]``: greedy at temperature 0, else sampled.

    No host sync: the draw is ``argmax(softmax(filtered / T) / Exp(1))`` with the noise from
    ``generator`` (the default generator when None).
    """
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    scaled = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(scaled, dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)


def sample_with(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """:func:`sample` with the settings of ``params``."""
    return sample(logits, params.temperature, top_k=params.top_k, top_p=params.top_p, generator=generator)


__all__ = ["SamplingParams", "filter_logits", "filter_logits_ref", "sample", "sample_with"]
