"""SnapKVConfig validation, kept-token arithmetic and layer budget profiles."""

from __future__ import annotations

import math

import pytest

from snapkv import SnapKVConfig
from snapkv.core.budgets import layer_budget


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (dict(budget=32, window=32), "budget"),
        (dict(budget=8, window=32), "budget"),
        (dict(budget=0, window=1), "budget"),
        (dict(budget=-5, window=1), "budget"),
        (dict(budget=0.0), "budget"),
        (dict(budget=-0.5), "budget"),
        (dict(budget=1.5), "budget"),
        (dict(budget=math.nan), "budget"),
        (dict(budget="1024"), "budget"),
        (dict(budget=True), "budget"),
        (dict(window=0, budget=16), "window"),
        (dict(window=-3, budget=16), "window"),
        (dict(window=2.0, budget=16), "window"),
        (dict(kernel=4), "kernel"),
        (dict(kernel=0), "kernel"),
        (dict(kernel=-3), "kernel"),
        (dict(kernel=2), "kernel"),
        (dict(kernel=5.0), "kernel"),
        (dict(pooling="mean"), "pooling"),
        (dict(pooling="MAX"), "pooling"),
        (dict(gqa_reduce="sum"), "gqa_reduce"),
        (dict(gqa_reduce="avg"), "gqa_reduce"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_config_names_the_parameter(kwargs, param):
    with pytest.raises(ValueError, match=rf"^{param}\b"):
        SnapKVConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(budget=33, window=32),
        dict(budget=2, window=1, kernel=1),
        dict(budget=1.0),
        dict(budget=0.25, pooling="avg", gqa_reduce="max"),
        dict(budget=40, window=8, kernel=3, chunk_size=1),
    ],
)
def test_good_config_is_accepted(kwargs):
    cfg = SnapKVConfig(**kwargs)
    for name, value in kwargs.items():
        assert getattr(cfg, name) == value


def test_config_is_frozen_and_with_window_revalidates():
    cfg = SnapKVConfig(budget=40, window=8)
    with pytest.raises(AttributeError):
        cfg.budget = 10  # type: ignore[misc]
    assert cfg.with_window(16).window == 16
    assert cfg.with_window(16).budget == 40
    with pytest.raises(ValueError, match="budget"):
        cfg.with_window(40)


@pytest.mark.parametrize(("budget", "length", "kept"), [(40, 10, 10), (40, 40, 40), (40, 41, 40), (40, 1000, 40)])
def test_kept_tokens_int_budget(budget, length, kept):
    assert SnapKVConfig(budget=budget, window=8).kept_tokens(length) == kept


@pytest.mark.parametrize(("frac", "length", "kept"), [(0.5, 100, 50), (0.25, 101, 26), (1.0, 77, 77), (0.99, 10, 10)])
def test_kept_tokens_fraction(frac, length, kept):
    assert SnapKVConfig(budget=frac, window=8).kept_tokens(length) == kept


def test_kept_tokens_fraction_below_window_raises():
    cfg = SnapKVConfig(budget=0.1, window=8)
    with pytest.raises(ValueError, match="window"):
        cfg.kept_tokens(50)  # 5 tokens, not above the window


def test_uniform_profile_keeps_the_same_everywhere():
    assert [layer_budget("uniform", 100, 8, r, 5) for r in range(5)] == [100] * 5


@pytest.mark.parametrize(("kept", "window", "n_layers"), [(108, 8, 4), (72, 8, 9), (2048, 32, 32)])
def test_pyramid_profile_decreases_and_keeps_the_average(kept, window, n_layers):
    budgets = [layer_budget("pyramid", kept, window, r, n_layers) for r in range(n_layers)]
    assert budgets == sorted(budgets, reverse=True)
    assert budgets[0] > kept > budgets[-1]
    assert min(budgets) > window
    assert abs(sum(budgets) / n_layers - kept) <= 1.0


def test_unknown_profile_raises():
    with pytest.raises(ValueError, match="profile"):
        layer_budget("triangle", 100, 8, 0, 4)
