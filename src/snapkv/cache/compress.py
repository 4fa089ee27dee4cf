"""What a SnapKV cache does to one layer right after its prefill: plan, score, select, store.

Pure bookkeeping around the method (no transformers): the per-row, per-layer budget plan
(validated for every layer before the first one is compressed), right-padded rows moved to
the left-padded layout the selection expects, and the kept tokens stored in a
:class:`~snapkv.cache.compressed.CompressedLayer` (dense, or ragged per head).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from snapkv.cache.layer import CompressedLayer
from snapkv.cache.ragged import RaggedLayer
from snapkv.config import SnapKVConfig
from snapkv.core.adaptive import RaggedSelection
from snapkv.core.selection import gather_positions
from snapkv.methods.base import Method, ScoreInputs
from snapkv.methods.snapkv import SnapKV


@dataclass
class LayerStats:
    """What compression did to one layer."""

    layer: int
    prompt_tokens: list[int]
    kept_tokens: list[int]
    bytes_before: int
    bytes_after: int


@dataclass(slots=True)
class Capture:
    """One layer's scoring inputs and values kept by a capture cache (for ``derive()``).

    ``order`` is the ``[B, L]`` permutation that moved right padding to the front (None
    when no row was right-padded): ``inputs`` and ``values`` are in the permuted layout.
    """

    inputs: ScoreInputs
    values: torch.Tensor
    order: torch.Tensor | None = None


def snapkv_from(config: SnapKVConfig) -> SnapKV:
    """The :class:`~snapkv.methods.SnapKV` method with ``config``'s scoring settings."""
    return SnapKV(kernel=config.kernel, pooling=config.pooling, gqa_reduce=config.gqa_reduce,
                  chunk_size=config.chunk_size)


def method_key(method: Method) -> Any:
    """Methods with equal settings score alike: a dataclass method is keyed by its fields."""
    if dataclasses.is_dataclass(method):
        return (type(method), repr(method))
    return id(method)


def left_align(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Move each row's padding to the front when some row ends in padding (right padding).

    The observation window is then each row's last real tokens. Keys keep their rotation
    (RoPE was applied at their real positions), so the permuted rows attend as before.
    Returns ``queries, keys, values, key_valid`` in the new layout and the ``[B, L]``
    permutation (None, and the inputs unchanged, when no row ends in padding).
    """
    if key_valid is None or bool(key_valid[:, -1].all()):
        return queries, keys, values, key_valid, None
    order = torch.sort(key_valid.to(torch.int8), dim=-1, stable=True).indices  # [B, L] padding first

    def take(t: torch.Tensor) -> torch.Tensor:  # [B, H, L, D] along L
        return t.gather(2, order[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[-1]))

    return take(queries), take(keys), take(values), key_valid.gather(1, order), order


def plan(
    config: SnapKVConfig, method: Method, window: int, real: list[int], n_layers: int
) -> list[list[int]]:
    """Tokens kept per compressed layer (by rank) and row; ``ValueError`` before any layer changes."""
    base = []
    for row, n in enumerate(real):
        try:
            base.append(config.kept_tokens(n, window))
        except ValueError as exc:
            raise ValueError(f"row {row} ({n} real tokens): {exc}") from None
    out = []
    for rank in range(n_layers):
        out.append([k if k >= n else min(n, method.layer_budget(k, window, rank, n_layers))
                    for k, n in zip(base, real, strict=True)])
    return out


def real_lengths(inputs: ScoreInputs) -> list[int]:
    """Real (unpadded) tokens of each row."""
    b, length = inputs.keys.shape[0], inputs.keys.shape[-2]
    return inputs.key_valid.sum(-1).tolist() if inputs.key_valid is not None else [length] * b


def compress_layer(
    layer: CompressedLayer,
    inputs: ScoreInputs,
    values: torch.Tensor,
    method: Method,
    kept: list[int],
    order: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
) -> LayerStats:
    """Replace ``layer``'s full prompt KV by the tokens ``method`` keeps (``kept[b]`` per row and head).

    ``inputs``/``values`` may be in a left-aligned layout (``order``, see :func:`left_align`);
    stored positions are the original ones. ``scores`` are ``method.score(inputs)`` if known.
    """
    key = inputs.keys
    real = real_lengths(inputs)
    layer.prefilled = True
    full_bytes = 2 * key.numel() * key.element_size()
    if kept == real:  # every row fits its budget: the layer stays as it is
        return LayerStats(inputs.layer_idx, real, kept, full_bytes, full_bytes)
    n_keep = torch.tensor(kept, device=key.device)
    sel = method.select(inputs, n_keep, scores)
    if isinstance(sel, RaggedSelection):
        if method.slack is None:
            raise ValueError(f"{type(method).__name__} selects per head but has no slack for new tokens")
        layer.replace_ragged(RaggedLayer.from_selection(key, values, sel, method.slack), sel.trailing_run())
        return LayerStats(inputs.layer_idx, real, kept, full_bytes, layer.ragged.kv_bytes())
    new_k, new_v = gather_positions(key, sel.indices), gather_positions(values, sel.indices)
    positions = sel.indices
    if order is not None:  # back to the positions of the caller's (right-padded) layout
        b, h, p = positions.shape
        positions = order.gather(1, positions.reshape(b, h * p)).view(b, h, p)
    layer.replace(new_k, new_v, sel.pad, positions.to(torch.int32))
    return LayerStats(inputs.layer_idx, real, kept, full_bytes, 2 * new_k.numel() * new_k.element_size())


def prefix_capture(capture: Capture, n: int) -> Capture:
    """The capture of the first ``n`` prompt tokens (a causal prefix of a left-padded capture)."""
    if capture.order is not None:
        raise ValueError("derive(prefix=...) needs a capture without right-padded rows")
    inputs = capture.inputs
    valid = inputs.key_valid[:, :n] if inputs.key_valid is not None else None
    if valid is not None and not bool(valid.any(-1).all()):
        raise ValueError(f"prefix {n} leaves a row with no real token (left padding is longer)")
    inputs = dataclasses.replace(inputs, queries=inputs.queries[:, :, :n], keys=inputs.keys[:, :, :n],
                                 key_valid=valid)
    return Capture(inputs, capture.values[:, :, :n], None)
