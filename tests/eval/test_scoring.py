"""Scoring functions and confidence intervals."""

from __future__ import annotations

import pytest

from snapkv.eval.report import bootstrap, fmt, interval, retention, wilson
from snapkv.eval.tasks import passkey_match, string_match_all


def test_string_match_all() -> None:
    assert string_match_all(" 123 and 456.", ["123", "456"]) == 1.0
    assert string_match_all("Only 123", ["123", "456"]) == 0.5
    assert string_match_all("ABC", ["abc"]) == 1.0
    assert string_match_all("", ["x"]) == 0.0


def test_passkey_match() -> None:
    assert passkey_match(" 19683. Remember it.", ["19683"]) == 1.0
    assert passkey_match(" 196.", ["19683"]) == 0.0
    assert passkey_match(" 196831", ["19683"]) == 0.0
    assert passkey_match("no digits", ["1"]) == 0.0


def test_wilson_known_values() -> None:
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.490, abs=1e-3) and hi == pytest.approx(0.943, abs=1e-3)
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0


def test_bootstrap_is_seeded_and_brackets_mean() -> None:
    xs = [0.0, 0.25, 0.5, 0.75, 1.0, 0.5]
    assert bootstrap(xs) == bootstrap(xs)
    lo, hi = bootstrap(xs)
    assert lo <= sum(xs) / len(xs) <= hi
    m, lo2, hi2 = interval([1.0, 0.0, 1.0])
    assert (lo2, hi2) == wilson(2, 3) and m == pytest.approx(2 / 3)
    assert fmt([1.0, 1.0]).startswith("100 (")


def test_retention_pairs_samples() -> None:
    recs = [dict(task="t", index=i, method="full", mode="query", budget="full", score=1.0) for i in range(4)]
    recs += [dict(task="t", index=i, method="snapkv", mode="query", budget="64", score=float(i < 3)) for i in range(4)]
    r, lo, hi, n = retention(recs, "64")
    assert r == pytest.approx(0.75) and n == 4 and lo <= r <= hi
