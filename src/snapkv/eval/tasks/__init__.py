"""Task registry: name -> sample builder and scorer.

Every builder takes ``(codec, length, index, seed)`` and returns a :class:`Sample` of exactly
``length`` tokens; every scorer maps ``(prediction, answers)`` to a score in [0, 1].
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from snapkv.eval.tasks.base import DEPTHS, Codec, Sample
from snapkv.eval.tasks.niah import niah
from snapkv.eval.tasks.passkey import passkey
from snapkv.eval.tasks.variable_tracking import variable_tracking
from snapkv.eval.tasks.words import common_words, frequent_words


def _clean(pred: str) -> str:
    return re.sub(r"[\x00-\x1f]", "\n", pred).strip()


def string_match_all(pred: str, answers: Sequence[str]) -> float:
    """RULER's metric: the fraction of references found in the prediction (case-insensitive)."""
    p = _clean(pred).lower()
    return sum(a.lower() in p for a in answers) / len(answers)


def passkey_match(pred: str, answers: Sequence[str]) -> float:
    """1.0 when the first number in the prediction is the pass key."""
    found = re.findall(r"\d+", pred)
    return float(bool(found) and found[0] == answers[0])


@dataclass(frozen=True)
class Task:
    """A registered task: how to build a sample and how to score a prediction."""

    name: str
    build: Callable[..., Sample]
    score: Callable[[str, Sequence[str]], float]
    binary: bool  # scores are 0/1 only


_NIAH = {
    "niah_single_1": dict(haystack="noise", type_k="words", type_v="numbers"),
    "niah_single_2": dict(haystack="essay", type_k="words", type_v="numbers"),
    "niah_single_3": dict(haystack="essay", type_k="words", type_v="uuids"),
    "niah_multikey_1": dict(haystack="essay", type_k="words", type_v="numbers", num_k=4),
    "niah_multikey_2": dict(haystack="needle", type_k="words", type_v="numbers"),
    "niah_multikey_3": dict(haystack="needle", type_k="uuids", type_v="uuids"),
    "niah_multivalue": dict(haystack="essay", type_k="words", type_v="numbers", num_v=4),
    "niah_multiquery": dict(haystack="essay", type_k="words", type_v="numbers", num_q=4),
}

TASKS: dict[str, Task] = {"passkey": Task("passkey", passkey, passkey_match, True)}
for _name, _kw in _NIAH.items():
    _multi = _kw.get("num_v", 1) > 1 or _kw.get("num_q", 1) > 1
    TASKS[_name] = Task(_name, partial(niah, task=_name, **_kw), string_match_all, not _multi)
TASKS["vt"] = Task("vt", variable_tracking, string_match_all, False)
TASKS["cwe"] = Task("cwe", common_words, string_match_all, False)
TASKS["fwe"] = Task("fwe", frequent_words, string_match_all, False)

#: Aliases accepted on the command line.
GROUPS: dict[str, tuple[str, ...]] = {
    "all": tuple(TASKS),
    "ruler": tuple(t for t in TASKS if t != "passkey"),
    "niah": tuple(_NIAH),
}


def resolve_tasks(names: Sequence[str]) -> list[str]:
    """Expand groups and check names; raises ``ValueError`` naming the unknown ones."""
    out: list[str] = []
    for n in names:
        expanded = GROUPS.get(n, (n,))
        for t in expanded:
            if t not in TASKS:
                raise ValueError(f"unknown task {t!r}; choose from {sorted(TASKS)} or groups {sorted(GROUPS)}")
            if t not in out:
                out.append(t)
    return out


def make_sample(task: str, codec: Codec, length: int, index: int, seed: int = 0) -> Sample:
    """Build sample ``index`` of ``task`` at ``length`` tokens (deterministic in ``seed``)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    return TASKS[task].build(codec, length, index, seed)


__all__ = ["DEPTHS", "GROUPS", "TASKS", "Codec", "Sample", "Task", "make_sample", "resolve_tasks",
           "passkey_match", "string_match_all"]
