"""Scoring dispatch: CUDA keys with a Triton that cannot be imported take the twin, with one warning."""

from __future__ import annotations

import sys
import warnings
from types import SimpleNamespace

import pytest
import torch

import snapkv.kernels
from snapkv.kernels import dispatch


@pytest.fixture
def broken_triton(monkeypatch):
    """``snapkv.kernels.score`` fails to import, as with a broken Triton install."""
    monkeypatch.delenv("SNAPKV_FORCE_TRITON", raising=False)
    monkeypatch.delattr(snapkv.kernels, "score", raising=False)
    monkeypatch.setitem(sys.modules, "snapkv.kernels.score", None)  # the import raises ImportError
    monkeypatch.setattr(dispatch, "_IMPORT_ERROR", [])
    dispatch._score_module.cache_clear()
    dispatch._warn_no_kernel.cache_clear()
    yield
    dispatch._score_module.cache_clear()
    dispatch._warn_no_kernel.cache_clear()


def test_cuda_scoring_without_triton_warns_once(broken_triton):
    cuda = SimpleNamespace(is_cuda=True, device="cuda:0", dtype=torch.float16, shape=(1, 2, 64, 64))
    with pytest.warns(RuntimeWarning, match=r"Triton scoring kernel cannot be imported \(ModuleNotFoundError"):
        assert dispatch._use_kernel(cuda, cuda) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch._use_kernel(cuda, cuda) is False  # once per process
    assert not dispatch.triton_available()


def test_cpu_scoring_without_triton_is_silent(broken_triton):
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 10, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        votes = dispatch.reduced_window_votes(q, k, scaling=8**-0.5)
    assert votes.shape == (1, 2, 10)
