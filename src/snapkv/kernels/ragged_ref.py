"""Torch twins of the ragged decode kernel, and the dispatch between kernel and twin.

:func:`ragged_decode_reference` gathers each head's segment into a padded dense
``[B, Hkv, P, D]`` tensor and runs masked attention in fp32; it is the ground truth the
Triton kernel (:mod:`snapkv.kernels.decode_ragged`) is tested against, and the path taken
off CUDA. :func:`ragged_decode` picks the kernel for CUDA tensors, the twin elsewhere.
"""

from __future__ import annotations

import torch


def dense_masked_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per row against padded per-head keys, in fp32.

    Args:
        q: ``[B, Hq, D]``; keys, values: ``[B, Hkv, P, D]``; valid: ``[B, Hkv, P]`` bool.
        scaling: logit scale; softcap: logit soft-cap or None.
        sinks: ``[Hq]`` attention-sink logits (gpt-oss ``s_aux``): one extra logit per query
            head in the softmax's denominator, with no value; or None.

    Returns:
        ``[B, Hq, D]`` in ``q``'s dtype; a head with no valid key outputs zeros.
    """
    b, hq, d = q.shape
    hkv = keys.shape[1]
    g = hq // hkv
    qf = q.float().view(b, hkv, g, d)  # [B, Hkv, G, D]
    logits = torch.einsum("bhgd,bhpd->bhgp", qf, keys.float()) * scaling  # [B, Hkv, G, P]
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    if sinks is not None:  # the sink takes its share of the softmax, then is dropped
        sink = sinks.float().view(1, hkv, g, 1).expand(b, -1, -1, 1)
        probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all-masked heads give 0
    out = torch.einsum("bhgp,bhpd->bhgd", probs, values.float())
    return out.reshape(b, hq, d).to(q.dtype)


def ragged_decode_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    *,
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Twin of :func:`~snapkv.kernels.decode_ragged.ragged_decode_attention` (same arguments).

    ``q [B, Hq, D]``, flat ``k``/``v`` ``[S, D]``, ``starts``/``lengths`` ``[B, Hkv]``;
    returns ``[B, Hq, D]``. One host sync sizes the padded view.
    """
    p = int(lengths.max()) if lengths.numel() else 0
    slot = torch.arange(p, device=k.device)
    valid = slot < lengths[..., None].long()  # [B, Hkv, P]
    idx = (starts[..., None].long() + slot).clamp(0, max(k.shape[0] - 1, 0))
    idx = torch.where(valid, idx, torch.zeros_like(idx))
    if k.shape[0] == 0:
        keys = k.new_zeros((*idx.shape, k.shape[-1]))
        return dense_masked_attention(q, keys, keys, valid, scaling=scaling, softcap=softcap, sinks=sinks)
    return dense_masked_attention(q, k[idx], v[idx], valid, scaling=scaling, softcap=softcap, sinks=sinks)


def ragged_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    *,
    max_len: int,
    scaling: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    use_kernel: bool | None = None,
) -> torch.Tensor:
    """Ragged decode attention: the Triton kernel on CUDA, the torch twin elsewhere.

    Arguments as in :func:`~snapkv.kernels.decode_ragged.ragged_decode_attention`;
    ``use_kernel`` forces a path (None: kernel iff ``q`` is on CUDA). The kernel path has
    no host sync and can be captured in a CUDA graph; the twin syncs once.
    """
    if use_kernel is None:
        use_kernel = q.is_cuda
    if use_kernel:
        from snapkv.kernels.decode_ragged import ragged_decode_attention

        return ragged_decode_attention(
            q, k, v, starts, lengths, max_len=max_len, sm_scale=scaling, softcap=softcap, sinks=sinks
        )
    return ragged_decode_reference(q, k, v, starts, lengths, scaling=scaling, softcap=softcap, sinks=sinks)
