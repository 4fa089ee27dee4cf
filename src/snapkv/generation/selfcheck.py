"""The engine against the model's own forward, once per model: no silent divergence.

A short deterministic prompt goes through the engine's prefill (full cache) and a few
teacher-forced decode steps, and through the model's own ``forward`` in one call; the logits
of each position must agree within the dtype's tolerance, else ``ValueError`` naming the
model type. The result is remembered per model object (weakly) and engine setting, so the
check costs one tiny forward per model, not one per request.

Error measure: per position, ``||engine - model||_2 / ||model||_2`` over the vocabulary;
the check fails on the largest. A model whose forward the engine does not reproduce
(another residual scale, logit scale, NoPE layers, clipped QKV, ...) gives errors of order
0.1 to 1; the same forward computed by other kernels gives float rounding.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch

from snapkv.generation.adapter import model_type

if TYPE_CHECKING:
    from snapkv.generation.generate import Engine

#: Largest relative logit error accepted, per dtype, from measurement (CPU, tiny models of
#: llama/mistral/qwen2/qwen3, 2 layers, peaked attention): fp32 <= 1.6e-6, fp16 <= 2.3e-3,
#: bf16 <= 1.5e-2 (bf16 keeps 8 mantissa bits; the engine's decode rounds differently from
#: transformers'). A different forward measured 0.12-0.17 (SmolLM3 NoPE layers), 1.3-1.5
#: (OLMo clip_qkv) and 8.2-8.5 (Granite multipliers), so bf16's 6e-2 sits between the two.
TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float64: 1e-8,
                                       torch.bfloat16: 6e-2, torch.float16: 3e-2}

PROMPT_TOKENS = 12
DECODE_STEPS = 3

_PASSED: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, float]] = weakref.WeakKeyDictionary()


def check_ids(vocab: int, n: int) -> torch.Tensor:
    """``[1, n]`` deterministic token ids spread over the vocabulary (ids 3 and up)."""
    span = max(1, vocab - 3)
    return ((torch.arange(n) * 7919 + 11) % span + 3)[None]


@torch.inference_mode()
def engine_errors(engine: Engine) -> list[float]:
    """Relative logit error of each checked position: prefill's last, then the decode steps."""
    from snapkv.generation.decode import DecodeRunner

    parts = engine.parts
    ids = check_ids(parts.vocab_size, PROMPT_TOKENS + DECODE_STEPS).to(parts.device)
    cache, logits, _ = engine.prefill(ids[:, :PROMPT_TOKENS], max_new_tokens=DECODE_STEPS, compress=False)
    runner = DecodeRunner(parts, cache, use_graph=False, fused=engine.fused)
    got = [logits.float()]
    for i in range(DECODE_STEPS - 1):
        runner.feed(ids[:, PROMPT_TOKENS + i])
        runner.step()
        got.append(runner.logits.float().clone())
    ref = parts.model(input_ids=ids[:, : PROMPT_TOKENS + DECODE_STEPS - 1], use_cache=False).logits[0]
    ref = ref[PROMPT_TOKENS - 1 :].float()  # [steps, V]
    return [float((g[0] - r).norm() / r.norm().clamp_min(1e-30)) for g, r in zip(got, ref, strict=True)]


def self_check(engine: Engine) -> float:
    """Check ``engine`` against its model's forward (once per model and setting); the error.

    Raises ``ValueError`` naming the model type when the error exceeds :data:`TOLERANCE`.
    """
    parts = engine.parts
    key = (type(parts).__name__, engine.fused, str(parts.device), parts.dtype)
    done = _PASSED.get(parts.model)
    if done is not None and key in done:
        return done[key]
    tol = TOLERANCE.get(parts.dtype, 6e-2)
    kind = model_type(parts.model)
    try:
        err = max(engine_errors(engine))
    except (RuntimeError, TypeError, AttributeError) as failure:  # the engine cannot even run it
        if isinstance(failure, torch.OutOfMemoryError):
            raise
        raise ValueError(f"the engine fails on model type {kind!r} ({type(parts.model).__name__}) in its "
                         f"self-check: {type(failure).__name__}: {failure}") from failure
    if not err <= tol:  # NaN fails too
        raise ValueError(
            f"the engine does not compute model type {kind!r} ({type(parts.model).__name__}) like its own forward: "
            f"relative logit error {err:.3g} > {tol:g} ({str(parts.dtype).removeprefix('torch.')}) on a "
            f"{PROMPT_TOKENS}-token check; use backend='transformers' (SnapKVSession) for this model"
        )
    _PASSED.setdefault(parts.model, {})[key] = err
    return err
