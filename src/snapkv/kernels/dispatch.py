"""Pick the Triton kernel or its torch twin for the window votes.

The kernel runs when the keys are on CUDA and Triton imports; elsewhere the torch twin runs.
CUDA keys with a Triton that cannot be imported (missing or broken install) take the twin
with a warning, once per process, that names the import error.
``SNAPKV_FORCE_TRITON=1`` forces the kernel (CPU tensors then need ``TRITON_INTERPRET=1``, set
before Triton is first imported); ``SNAPKV_FORCE_TRITON=0`` forces the twin. Importing this
module never imports Triton.
"""

from __future__ import annotations

import functools
import os
import warnings
from types import ModuleType

import torch

from snapkv.kernels.ref import reduced_window_votes_ref

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


_IMPORT_ERROR: list[BaseException] = []


@functools.cache
def _score_module() -> ModuleType | None:
    """The kernel module, or None when Triton cannot be imported (the error is kept for the warning)."""
    try:
        from snapkv.kernels import score
    except Exception as exc:  # no triton, or a broken install: the twin still works, with a warning on CUDA
        _IMPORT_ERROR.append(exc)
        return None
    return score


@functools.cache
def _warn_no_kernel() -> None:
    """Say once that CUDA scoring takes the (slower) torch twin, and why."""
    err = _IMPORT_ERROR[0] if _IMPORT_ERROR else None
    warnings.warn(
        f"SnapKV's Triton scoring kernel cannot be imported ({type(err).__name__}: {err}); CUDA scoring "
        "takes the torch twin, which is slower. Install or repair triton, or set SNAPKV_FORCE_TRITON=0 "
        "to choose the twin without this warning.", RuntimeWarning, stacklevel=4)


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
    suitable = (
        keys.is_cuda
        and q_win.device == keys.device
        and q_win.dtype in _KERNEL_DTYPES
        and keys.dtype in _KERNEL_DTYPES
        and keys.shape[-1] <= 512
    )
    if suitable and not triton_available():
        _warn_no_kernel()
        return False
    return suitable


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
