"""Layer budget profiles: how many tokens each compressed layer keeps."""

from __future__ import annotations

PROFILES: tuple[str, ...] = ("uniform", "pyramid")


def layer_budget(profile: str, kept: int, window: int, rank: int, n_layers: int, beta: int = 20) -> int:
    """Tokens kept by the ``rank``-th of ``n_layers`` compressed layers.

    ``uniform`` keeps ``kept`` in every layer. ``pyramid`` (PyramidKV, arXiv:2406.02069) keeps
    more in lower layers and fewer in upper ones, linearly, with the same average prefix
    budget: ``min = (kept - window) // beta`` and ``max = 2 (kept - window) - min``.
    """
    if profile == "uniform" or n_layers == 1:
        return kept
    if profile != "pyramid":
        raise ValueError(f"layer budget profile must be one of {PROFILES}, got {profile!r}")
    prefix = kept - window
    lo = prefix // beta
    hi = 2 * prefix - lo
    step = (hi - lo) / (n_layers - 1)
    return window + round(hi - rank * step)
