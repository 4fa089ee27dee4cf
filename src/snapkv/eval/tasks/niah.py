"""RULER needle-in-a-haystack tasks (Hsieh et al. 2024, arXiv:2404.06654).

Template, needle sentence and answer prefix follow RULER's ``scripts/data/synthetic``.
Keys are adjective-noun pairs from ``wonderwords`` (or UUIDs), values 7-digit numbers
(or UUIDs). Haystacks: ``noise`` (repeated sentences), ``essay`` (Paul Graham essays) or
``needle`` (distractor needles with other keys).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable

from snapkv.eval.tasks.base import Codec, Sample, compose, grid_depth, sample_rng
from snapkv.eval.tasks.haystack import NOISE, essay_sentences, word_list

TEMPLATE_PRE = (
    "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_v} afterwards.\n"
)
QUESTION = "What are all the special magic {type_v} for {query} mentioned in the provided text?"
ANSWER_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"
NEEDLE = "One of the special magic {type_v} for {key} is: {value}."


def _value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def _key(rng: random.Random, kind: str) -> str:
    if kind == "words":
        return f"{rng.choice(word_list('adjective'))}-{rng.choice(word_list('noun'))}"
    return _value(rng, kind)


def _filler(haystack: str, rng: random.Random, type_k: str, type_v: str) -> Callable[[int], str]:
    if haystack == "noise":
        return lambda i: NOISE if i == 0 else " " + NOISE
    if haystack == "essay":
        sents = essay_sentences()
        start = rng.randrange(len(sents))
        return lambda i: ("" if i == 0 else " ") + sents[(start + i) % len(sents)]
    if haystack == "needle":
        cache: dict[int, str] = {}

        def distractor(i: int) -> str:
            if i not in cache:
                text = NEEDLE.format(type_v=type_v, key=_key(rng, type_k), value=_value(rng, type_v))
                cache[i] = ("" if i == 0 else "\n") + text
            return cache[i]

        return distractor
    raise ValueError(f"unknown haystack {haystack!r}")


def niah(
    codec: Codec,
    length: int,
    index: int,
    seed: int = 0,
    *,
    task: str = "niah_single_2",
    haystack: str = "essay",
    type_k: str = "words",
    type_v: str = "numbers",
    num_k: int = 1,
    num_v: int = 1,
    num_q: int = 1,
) -> Sample:
    """One RULER NIAH sample; the first needle sits at the sample's grid depth, the rest at random."""
    rng = sample_rng(seed, task, length, index)
    num_k = max(num_k, num_q)
    keys: list[str] = []
    while len(keys) < num_k:
        k = _key(rng, type_k)
        if k not in keys:
            keys.append(k)
    values = [[_value(rng, type_v) for _ in range(num_v)] for _ in keys]
    needles = [NEEDLE.format(type_v=type_v, key=k, value=v) for k, vs in zip(keys, values, strict=True) for v in vs]
    sep = "\n" if haystack == "needle" else " "
    needles = [sep + n + (sep if haystack == "needle" else "") for n in needles]
    depth = grid_depth(index)
    depths = [depth] + [rng.random() for _ in needles[1:]]
    order = list(range(len(needles)))
    rng.shuffle(order)  # which needle lands at the grid depth is random too
    needles = [needles[i] for i in order]
    queried = rng.sample(range(num_k), num_q)
    query_keys = [keys[i] for i in queried]
    query = query_keys[0] if num_q == 1 else ", ".join(query_keys[:-1]) + ", and " + query_keys[-1]
    answers = [v for i in queried for v in values[i]]
    return compose(
        codec,
        task=task,
        index=index,
        length=length,
        pre=TEMPLATE_PRE.format(type_v=type_v),
        unit=_filler(haystack, rng, type_k, type_v),
        needles=needles,
        depths=depths,
        question=QUESTION.format(type_v=type_v, query=query),
        answer_prefix=ANSWER_PREFIX.format(type_v=type_v, query=query),
        answers=answers,
        max_new_tokens=(16 if type_v == "numbers" else 40) * max(num_v, num_q),
        depth=depth if len(needles) == 1 else None,
    )
