"""Window votes: SnapKV steps 1-4 (Li et al. 2024, arXiv:2404.14469, Algorithm 1).

1. The last ``w`` prompt queries (post-RoPE, as the model computed them) attend to all ``L``
   keys: ``softmax(q k^T * scale)`` in fp32, causal inside the window, padding excluded.
2. Each key's vote is the sum of its probabilities over the ``w`` window queries.
3. Votes of the query heads sharing one KV head are reduced (mean or max), so the
   cache keeps the model's native KV-head width.
4. Votes are pooled along the sequence (odd kernel, stride 1, ``kernel // 2`` padding).

Scoring runs in chunks of keys with two passes (row max and sum, then the votes), so a
128K prompt never holds ``heads x window x L`` probabilities at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _chunk_logits(
    q: torch.Tensor,  # [B, Hkv, G*w, D] fp32
    k: torch.Tensor,  # [B, Hkv, C, D]
    start: int,
    length: int,
    window: int,
    key_valid: torch.Tensor | None,  # [B, L] bool
    scaling: float,
    softcap: float | None,
) -> torch.Tensor:
    """Masked logits of the window queries against keys ``start : start + C``: [B, Hkv, G*w, C]."""
    logits = torch.matmul(q, k.float().transpose(-1, -2)) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    c = k.shape[-2]
    rows = q.shape[-2]
    key_pos = torch.arange(start, start + c, device=q.device)  # [C]
    q_pos = length - window + torch.arange(window, device=q.device).repeat(rows // window)  # [G*w]
    allowed = key_pos[None, :] <= q_pos[:, None]  # [G*w, C]
    allowed = allowed[None, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, start : start + c]
    return logits.masked_fill(~allowed, float("-inf"))


def window_votes(
    query_window: torch.Tensor,
    keys: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    *,
    scaling: float,
    softcap: float | None = None,
    chunk_size: int = 8192,
) -> torch.Tensor:
    """Per-query-head votes of the observation window for every key (steps 1-2).

    Args:
        query_window: ``[B, Hq, w, D]`` queries of the last ``w`` prompt tokens, post-RoPE.
        keys: ``[B, Hkv, L, D]`` the layer's keys, post-RoPE; ``Hq`` is a multiple of ``Hkv``.
        key_valid: ``[B, L]`` bool, False at padding, or None when nothing is padded.
        scaling: the attention's logit scale (usually ``D ** -0.5``).
        softcap: the attention's logit soft-cap (Gemma 2), or None.
        chunk_size: keys scored per chunk.

    Returns:
        ``[B, Hq, L]`` fp32: summed probabilities over the window queries. Entries of
        padding keys are 0.
    """
    b, hq, w, d = query_window.shape
    _, hkv, length, _ = keys.shape
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    g = hq // hkv
    # [B, Hkv, G*w, D]: the G query heads of one KV head stacked along the rows.
    q = query_window.float().reshape(b, hkv, g * w, d)
    row_max = torch.full((b, hkv, g * w), float("-inf"), device=keys.device)
    row_sum = torch.zeros((b, hkv, g * w), device=keys.device)
    for start in range(0, length, chunk_size):
        k = keys[:, :, start : start + chunk_size]
        logits = _chunk_logits(q, k, start, length, w, key_valid, scaling, softcap)
        new_max = torch.maximum(row_max, logits.amax(-1))
        safe = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        row_sum = row_sum * torch.exp(row_max - safe) + torch.exp(logits - safe[..., None]).sum(-1)
        row_max = new_max
    safe_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    inv_sum = torch.where(row_sum > 0, 1.0 / row_sum, torch.zeros_like(row_sum))
    votes = torch.empty((b, hkv, g, length), device=keys.device)
    for start in range(0, length, chunk_size):
        k = keys[:, :, start : start + chunk_size]
        logits = _chunk_logits(q, k, start, length, w, key_valid, scaling, softcap)
        probs = torch.exp(logits - safe_max[..., None]) * inv_sum[..., None]  # [B, Hkv, G*w, C]
        votes[..., start : start + k.shape[-2]] = probs.view(b, hkv, g, w, -1).sum(3)
    return votes.view(b, hq, length)


def reduce_gqa(votes: torch.Tensor, num_kv_heads: int, mode: str = "mean") -> torch.Tensor:
    """Combine the votes of each group of query heads that share a KV head (step 3).

    ``[B, Hq, L] -> [B, Hkv, L]``.
    """
    b, hq, length = votes.shape
    grouped = votes.view(b, num_kv_heads, hq // num_kv_heads, length)
    if mode == "mean":
        return grouped.mean(2)
    if mode == "max":
        return grouped.amax(2)
    raise ValueError(f"gqa_reduce must be 'mean' or 'max', got {mode!r}")


def pool_votes(votes: torch.Tensor, kernel: int, pooling: str = "max") -> torch.Tensor:
    """1-D pooling of the votes along the sequence, stride 1, same length (step 4).

    ``[B, H, L] -> [B, H, L]``. Max pooling pads with -inf, average pooling with zeros
    (counted in the average), as ``torch.nn.functional`` does.
    """
    if kernel == 1:
        return votes
    b, h, length = votes.shape
    flat = votes.reshape(b * h, 1, length)
    if pooling == "max":
        out = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    elif pooling == "avg":
        out = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        raise ValueError(f"pooling must be 'max' or 'avg', got {pooling!r}")
    return out.view(b, h, length)
