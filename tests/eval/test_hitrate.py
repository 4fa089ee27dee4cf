"""Hit rate of window votes against generated-token attention."""

from __future__ import annotations

import math

import torch

from snapkv.eval.hitrate import layer_hit_rate


def test_hit_rate_is_one_when_generated_queries_copy_the_window() -> None:
    torch.manual_seed(0)
    L, w, t, d = 200, 8, 4, 16
    keys = torch.randn(1, 1, L + t, d) * 0.1
    keys[0, 0, 50] = torch.ones(d) * 3  # one key everybody attends to
    q = torch.randn(1, 2, L + t, d) * 0.1
    q[:, :, L - w :] = torch.ones(d) * 3  # window and generated tokens look for key 50
    r = layer_hit_rate(q, keys, L, w, scaling=d**-0.5)
    assert r == 1.0


def test_hit_rate_low_when_generated_tokens_look_elsewhere() -> None:
    torch.manual_seed(0)
    L, w, t, d = 400, 8, 3, 16
    keys = torch.randn(1, 1, L + t, d) * 0.1
    keys[0, 0, 50] = torch.ones(d) * 3
    keys[0, 0, 300] = -torch.ones(d) * 3
    q = torch.randn(1, 1, L + t, d) * 0.1
    q[:, :, L - w : L] = torch.ones(d) * 3  # window votes for 50
    q[:, :, L:] = -torch.ones(d) * 3  # generated tokens attend to 300
    r = layer_hit_rate(q, keys, L, w, scaling=d**-0.5)
    assert r < 0.5 and not math.isnan(r)
