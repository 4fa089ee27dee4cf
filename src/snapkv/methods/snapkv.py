"""SnapKV: keep what the observation window attends to.

Based on Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation",
arXiv:2404.14469.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from snapkv.core.scoring import pool_votes
from snapkv.kernels.dispatch import reduced_window_votes
from snapkv.methods.base import Method, ScoreInputs


@dataclass(slots=True)
class SnapKV(Method):
    """Window votes, reduced over each GQA group, pooled along the sequence.

    Args:
        kernel: odd pooling width (default 31; the paper's 7 is ``SnapKV(kernel=7)``).
        pooling: ``"max"`` (default) or ``"avg"``.
        gqa_reduce: ``"mean"`` (default) or ``"max"`` over the query heads of a KV head.
        chunk_size: keys scored per chunk.
    """

    kernel: int = 31
    pooling: str = "max"
    gqa_reduce: str = "mean"
    chunk_size: int = 8192
    name: str = "snapkv"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        w = inputs.window
        q_win = inputs.queries[:, :, -w:]  # [B, Hq, w, D]
        # Steps 1-3: fused Triton kernel on CUDA, the chunked torch twin elsewhere.
        votes = reduced_window_votes(  # [B, Hkv, L] fp32
            q_win,
            inputs.keys,
            inputs.key_valid,
            scaling=inputs.scaling,
            softcap=inputs.softcap,
            gqa_reduce=self.gqa_reduce,
            chunk_size=self.chunk_size,
        )
        # Pool the prefix only, as the paper does; the window is kept whole by the base class.
        prefix = votes.shape[-1] - w
        votes[..., :prefix] = pool_votes(votes[..., :prefix].contiguous(), self.kernel, self.pooling)
        return votes
