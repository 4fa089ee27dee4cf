"""Pick the Triton kernel or its torch twin for the window votes.

The kernel runs when the keys are on CUDA and Triton imports; elsewhere the torch twin runs.
``SNAPKV_FORCE_TRITON=1`` forces the kernel (CPU tensors then need ``TRITON_INTERPRET=1``, set
before Triton is first imported); ``SNAPKV_FORCE_TRITON=0`` forces the twin. Importing this
module never imports Triton.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from snapkv.kernels.ref import reduced_window_votes_ref

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def _score_module() -> ModuleType | None:
    """The kernel module, or None when Triton cannot be imported."""
    try:
        from snapkv.kernels import score
    except Exception:  # no triton, or a broken install: the twin still works
        return None
    return score


def triton_available() -> bool:
    """True when the Triton kernels can be imported."""
    return _score_module() is not None


def _use_kernel(q_win: torch.Tensor, keys: torch.Tensor) -> bool:
    force = os.environ.get("SNAPKV_FORCE_TRITON", "")
    if force == "0":
        return False
    if force == "1":
        if not triton_available():
            raise ImportError("SNAPKV_FORCE_TRITON=1 but triton (or snapkv.kernels.score) cannot be imported")
        return True
    return (
        keys.is_cuda
        and q_win.device == keys.device
        and q_win.dtype in _KERNEL_DTYPES
        and keys.dtype in _KERNEL_DTYPES
        and keys.shape[-1] <= 512
        and triton_available()
    )


def reduced_window_votes(
    q_win: torch.Tensor,
    keys: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    *,
    scaling: float,
    softcap: float | None = None,
    gqa_reduce: str = "mean",
    chunk_size: int = 8192,
) -> torch.Tensor:
    """GQA-reduced window votes (SnapKV steps 1-3): ``[B, Hkv, L]`` fp32.

    Equals ``reduce_gqa(window_votes(q_win, keys, key_valid, ...), Hkv, gqa_reduce)``.

    Args:
        q_win: ``[B, Hq, w, D]`` window queries, post-RoPE.
        keys: ``[B, Hkv, L, D]`` keys, post-RoPE.
        key_valid: ``[B, L]`` bool, False at padding, or None.
        scaling: logit scale.
        softcap: logit soft-cap, or None.
        gqa_reduce: ``"mean"`` or ``"max"`` over each KV head's query heads.
        chunk_size: keys per chunk of the torch twin (the kernel ignores it).
    """
    if _use_kernel(q_win, keys):
        score = _score_module()
        assert score is not None  # checked by _use_kernel
        if q_win.shape[-1] > 1 and q_win.stride(-1) != 1:
            q_win = q_win.contiguous()
        if keys.shape[-1] > 1 and keys.stride(-1) != 1:
            keys = keys.contiguous()
        return score.reduced_window_votes_triton(
            q_win, keys, key_valid, scaling=scaling, softcap=softcap, gqa_reduce=gqa_reduce
        )
    return reduced_window_votes_ref(
        q_win, keys, key_valid, scaling=scaling, softcap=softcap, gqa_reduce=gqa_reduce, chunk_size=chunk_size
    )
