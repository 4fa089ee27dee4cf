"""Baselines that share SnapKV's selection: StreamingLLM, random, H2O-style heavy hitters."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from snapkv.core.scoring import reduce_gqa
from snapkv.methods.base import Method, ScoreInputs


@dataclass(slots=True)
class StreamingLLM(Method):
    """Attention sinks plus the most recent tokens.

    Based on Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks",
    arXiv:2309.17453. Keeps the first ``sinks`` real tokens of each row and then the most
    recent ones.
    """

    sinks: int = 4
    name: str = "streaming"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        b, h, length, _ = inputs.keys.shape
        pos = torch.arange(length, device=inputs.keys.device, dtype=torch.float32)
        scores = pos.expand(b, h, length).clone()  # later is better
        if inputs.key_valid is not None:
            first = (~inputs.key_valid).sum(-1)  # [B] first real position
        else:
            first = torch.zeros(b, dtype=torch.long, device=pos.device)
        sink = (pos[None, :] >= first[:, None]) & (pos[None, :] < first[:, None] + self.sinks)
        return scores.masked_fill(sink[:, None, :], float(length) + 1.0)


@dataclass(slots=True)
class RandomSelect(Method):
    """Uniformly random prefix positions (plus the window): the floor any method must beat."""

    seed: int = 0
    name: str = "random"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        b, h, length, _ = inputs.keys.shape
        gen = torch.Generator(device="cpu").manual_seed(self.seed + 7919 * inputs.layer_idx)
        return torch.rand((b, h, length), generator=gen).to(inputs.keys.device)


@dataclass(slots=True)
class H2O(Method):
    """Heavy hitters: attention accumulated over all prompt queries (one-shot, at prefill).

    Based on Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative
    Inference of Large Language Models", arXiv:2306.14048, applied once after prefill as
    in SnapKV's comparison. Needs the prefill's full queries.
    """

    gqa_reduce: str = "mean"
    chunk_size: int = 1024
    name: str = "h2o"

    def score(self, inputs: ScoreInputs) -> torch.Tensor:
        q, k = inputs.queries, inputs.keys
        b, hq, lq, d = q.shape
        _, hkv, length, _ = k.shape
        if lq != length:
            raise ValueError(f"H2O needs every prefill query ({length}), got {lq}")
        g = hq // hkv
        acc = torch.zeros((b, hkv, g, length), device=k.device)
        kf = k.float()
        key_pos = torch.arange(length, device=k.device)
        for start in range(0, lq, self.chunk_size):
            qc = q[:, :, start : start + self.chunk_size].float()  # [B, Hq, C, D]
            c = qc.shape[2]
            logits = torch.matmul(qc.reshape(b, hkv, g * c, d), kf.transpose(-1, -2)) * inputs.scaling
            if inputs.softcap is not None:
                logits = torch.tanh(logits / inputs.softcap) * inputs.softcap
            q_pos = start + torch.arange(c, device=k.device).repeat(g)
            allowed = (key_pos[None, :] <= q_pos[:, None])[None, None]
            if inputs.key_valid is not None:
                allowed = allowed & inputs.key_valid[:, None, None, :]
            probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
            acc += probs.view(b, hkv, g, c, length).sum(3)
        return reduce_gqa(acc.view(b, hq, length), hkv, self.gqa_reduce)
