"""Kernels: Triton on CUDA, torch twins elsewhere. Importing this package never imports Triton."""

from snapkv.kernels.dispatch import reduced_window_votes, triton_available
from snapkv.kernels.ref import reduced_window_votes_ref

__all__ = ["reduced_window_votes", "reduced_window_votes_ref", "triton_available"]
