"""Passkey retrieval in the Landmark-attention format (Mohtashami & Jaggi 2023, arXiv:2305.16300)."""

from __future__ import annotations

from snapkv.eval.tasks.base import Codec, Sample, compose, grid_depth, sample_rng
from snapkv.eval.tasks.haystack import NOISE

DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
QUESTION = "What is the pass key?"
ANSWER_PREFIX = " The pass key is"


def needle(key: int) -> str:
    """The sentence that hides the key."""
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def passkey(codec: Codec, length: int, index: int, seed: int = 0) -> Sample:
    """A random pass key (1..50000) in noise filler at the sample's grid depth."""
    rng = sample_rng(seed, "passkey", length, index)
    key = rng.randint(1, 50000)
    depth = grid_depth(index)
    line = f"\n{needle(key)}\n"
    return compose(
        codec,
        task="passkey",
        index=index,
        length=length,
        pre=DESCRIPTION + "\n",
        unit=lambda i: NOISE if i == 0 else " " + NOISE,
        needles=[line],
        depths=[depth],
        question=QUESTION,
        answer_prefix=ANSWER_PREFIX,
        answers=[str(key)],
        max_new_tokens=10,
        depth=depth,
    )
