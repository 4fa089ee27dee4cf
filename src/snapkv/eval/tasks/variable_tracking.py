"""RULER variable tracking (Hsieh et al. 2024, arXiv:2404.06654): follow a chain of assignments.

One chain of ``num_hops`` assignments (``VAR B = VAR A``) from a 5-digit value, spread over
noise sentences. RULER's one-shot example is not prepended (small models, exact lengths).
"""

from __future__ import annotations

import string

from snapkv.eval.tasks.base import Codec, Sample, compose, sample_rng
from snapkv.eval.tasks.haystack import NOISE

PRE = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
QUESTION = "Question: Find all variables that are assigned the value {query} in the text above."
ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, "
    "{num_v} variables are assigned the value {query}, they are: "
)


def variable_tracking(
    codec: Codec, length: int, index: int, seed: int = 0, *, num_chains: int = 1, num_hops: int = 4
) -> Sample:
    """Variables of ``num_chains`` chains; the first chain is queried."""
    rng = sample_rng(seed, "vt", length, index)
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
        v = "".join(rng.choices(string.ascii_uppercase, k=5))
        if v not in names:
            names.append(v)
    chains, needles, depths = [], [], []
    for c in range(num_chains):
        var = names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
        value = str(rng.randint(10000, 99999))
        lines = [f"VAR {var[0]} = {value}"] + [f"VAR {var[j + 1]} = VAR {var[j]}" for j in range(num_hops)]
        chains.append((value, var))
        needles += [f" {line}." for line in lines]
        depths += sorted(rng.random() for _ in lines)  # in order along the text
    value, answer = chains[0]
    return compose(
        codec,
        task="vt",
        index=index,
        length=length,
        pre=PRE,
        unit=lambda i: NOISE if i == 0 else " " + NOISE,
        needles=needles,
        depths=depths,
        question=QUESTION.format(query=value),
        answer_prefix=ANSWER_PREFIX.format(num_v=num_hops + 1, query=value),
        answers=answer,
        max_new_tokens=30,
    )
