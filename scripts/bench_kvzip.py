"""Prefill cost of KVzip replay scoring against SnapKV's compressing prefill (seconds, peak memory).

Per prompt length, on the same random prompt:

* ``snapkv``: one prefill inside a SnapKVSession (each layer compressed right after its attention);
* ``kvzip``: the context prefilled into a :class:`ReplayCache` (full KV, room for one replay
  chunk; the replay reuses this KV, each replay forward computes only its own tokens), then
  the replay (chunked, rolled back, scores recorded), then per-layer top-k and gather of the
  kept tokens. Reported split into prefill / replay / select and in total. On CUDA the
  default is the Triton replay kernel computing both the replay's attention output and the
  scores (``attention=kernel``); at lengths up to ``--compare-max-tokens`` two more variants
  run: the model's attention plus kernel scores (``kvzip_backend_attention``) and the torch
  scores of before (``kvzip_torch_scores``).

* ``kvzip_span``: the same with the span-limited replay (``--span S``: each 2K replay chunk sees
  the first ``--sink`` context tokens and ``S`` tokens either side of its own; the kernel skips
  every other key block), linear in the length. Exact ``kvzip`` runs only up to
  ``--exact-max-tokens`` (its 128K point costs about a minute and was measured before).

Before timing, on CUDA, ``kernel_check`` compares the kernel with the torch twin on a real-size
slice (32 query / 8 KV heads of 128, a 2K chunk against up to 32K keys, bf16): max abs
difference of the scores and of the attention output; ``kernel_timing`` times one such chunk
against 32K keys (the kernel with and without the output, a few tile sizes, and torch's sdpa
of the same shape for reference, in ms and TFLOP/s); ``span_check`` repeats the check with a
span-limited window (sink and ``[lo, hi)`` of a 16K context) and ``span_kernel_timing`` times one
fused chunk exact and span-limited at 32K and 128K context keys. Lengths that would not fit the free
GPU memory (estimated by :func:`estimate_peak_bytes`) are shrunk to the largest multiple of
8192 that does (recorded as ``requested_tokens``).

GPU (Llama-3-8B shape, random bf16 weights; about 3 minutes on an H200; the gpu_suite stage
``kvzip``)::

    PYTHONPATH=src python scripts/bench_kvzip.py --model llama3-8b --device cuda \\
        --lengths 32768,131072 --span 2048 --exact-max-tokens 32768 --out $OUT/kvzip/kvzip.json

Memory estimate only (no model run; any device)::

    PYTHONPATH=src python scripts/bench_kvzip.py --estimate-only --lengths 32768,131072 --out /tmp/est.json

CPU (SmolLM2, a 2K passkey prompt)::

    PYTHONPATH=src OMP_NUM_THREADS=1 python scripts/bench_kvzip.py --model smollm2 --lengths 2048 \\
        --chunk 512 --threads 1 --out results/kvzip/cost_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from snapkv.cache.compressed import SnapKVCache
from snapkv.config import SnapKVConfig
from snapkv.core.replay import (
    DEFAULT_SINK,
    Visible,
    replay_chunk_attention,
    replay_chunk_scores,
    replay_chunk_scores_reference,
    span_visible,
)
from snapkv.core.selection import gather_positions, select_topk
from snapkv.methods.kvzip import ReplayCache, kvzip_scores, replay_inputs, resolve_replay_backends


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _cache_kwarg(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    import inspect

    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


@torch.no_grad()
def snapkv_prefill(model: torch.nn.Module, ids: torch.Tensor, budget: int, window: int) -> dict[str, Any]:
    """Seconds and peak of SnapKV's compressing prefill."""
    device = ids.device
    _reset_peak(device)
    with SnapKVCache(model, SnapKVConfig(budget=budget, window=window, kernel=7)) as cache:
        _sync(device)
        t0 = time.perf_counter()
        model(input_ids=ids, logits_to_keep=1, **_cache_kwarg(model, cache))
        _sync(device)
        sec = time.perf_counter() - t0
    return {"seconds": round(sec, 3), "peak_gib": _peak_gib(device)}


def estimate_peak_bytes(config: Any, length: int, chunk: int, prompt_len: int, param_bytes: int = 2) -> dict[str, int]:
    """Upper estimate of KVzip's peak at ``length`` tokens (bytes): weights, full KV, prefill work.

    The one-forward context prefill dominates: its KV (``2 * layers * Hkv * D`` per position,
    held for the replay), plus one layer's transient activations (the residual stream, q/k/v/o
    and the MLP's gate, up and product, in the weights' dtype). The replay adds one chunk's
    activations, fp32 scores (``layers * Hkv * L``) and the kernel's ``Hq * chunk`` row
    statistics: no ``chunk x L`` tensor.
    """
    layers, h, hq = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
    hkv = config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // hq
    vocab, inter = config.vocab_size, config.intermediate_size
    weights = param_bytes * (layers * (h * d * (hq + 2 * hkv) + hq * d * h + 3 * h * inter + 2 * h)
                             + vocab * h * (1 if config.tie_word_embeddings else 2) + h)
    replay_len = chunk + prompt_len + 8
    kv = param_bytes * 2 * layers * hkv * d * (length + replay_len)
    work = param_bytes * length * (3 * h + d * (hq * 2 + 2 * hkv) + 3 * inter)
    replay = param_bytes * replay_len * (3 * h + 3 * inter + d * (hq * 2 + 2 * hkv)) + 4 * (
        layers * hkv * length + hq * replay_len)
    return {"weights": weights, "kv": kv, "prefill_work": work, "replay_extra": replay,
            "peak": weights + kv + max(work, replay)}


def flops_estimate(config: Any, length: int, chunk: int, prompt_len: int, span: int | None = None,
                   sink: int = DEFAULT_SINK) -> dict[str, float]:
    """FLOPs of SnapKV's prefill and of KVzip with the fused kernel (an estimate, not a measurement).

    Prefill: linear layers ``2 * params`` per token plus causal attention (QK and PV over half
    the ``L x L`` square). KVzip adds the replay: linear layers for ``L`` tokens plus prompt and
    overlap per chunk, the kernel's first pass (QK and PV of every replay query against all
    context keys: the full square, twice the prefill's causal half), its second pass (QK only).
    With ``span``, each replay query sees at most ``sink + chunk + 2 * span`` context keys
    instead of ``L`` (``kvzip_span``, ``span_ratio``).
    """
    layers, h, hq = config.num_hidden_layers, config.hidden_size, config.num_attention_heads
    hkv, inter = config.num_key_value_heads, config.intermediate_size
    d = getattr(config, "head_dim", None) or h // hq
    per_token = 2 * layers * (h * d * (hq + 2 * hkv) + hq * d * h + 3 * h * inter)
    square = 2 * length * length * hq * d * layers  # one L x L matmul over all heads and layers
    replay_tokens = length + -(-length // chunk) * (prompt_len + 8)
    snapkv = per_token * length + square  # QK + PV on the causal half
    kvzip = snapkv + per_token * replay_tokens + 2 * square + square
    out = {"snapkv": snapkv, "kvzip": kvzip, "ratio": round(kvzip / snapkv, 2)}
    if span is not None:
        seen = min(length, sink + chunk + 2 * span)
        band = 2 * length * seen * hq * d * layers  # every replay query x its visible context keys
        out["kvzip_span"] = snapkv + per_token * replay_tokens + 3 * band
        out["span_ratio"] = round(out["kvzip_span"] / snapkv, 2)
    return out


def fit_length(config: Any, length: int, chunk: int, prompt_len: int, free: int, weights_loaded: bool) -> int:
    """``length``, or the largest multiple of 8192 whose estimated peak fits ``free`` (90%)."""
    def need(n: int) -> int:
        e = estimate_peak_bytes(config, n, chunk, prompt_len)
        return e["peak"] - (e["weights"] if weights_loaded else 0)

    n = length
    while n > 8192 and need(n) > 0.9 * free:
        n = (n - 1) // 8192 * 8192
    return n


@torch.no_grad()
def kvzip_prefill(model: torch.nn.Module, ids: torch.Tensor, prompt: list[int], budget: int, window: int,
                  chunk: int, precision: str, split: bool = False, score_backend: str = "auto",
                  attention: str = "auto", span: int | None = None, sink: int = DEFAULT_SINK) -> dict[str, Any]:
    """Seconds (prefill, replay, selection) and peak of KVzip's prefill + replay + compression.

    ``span``: the span-limited replay (:func:`kvzip_scores`), None: exact.
    """
    device = ids.device
    length = ids.shape[1]
    longest = max(len(x) for x in replay_inputs(range(length), prompt, chunk, 8))
    ran = resolve_replay_backends(model, None, score_backend, attention)  # what kvzip_scores will run
    _reset_peak(device)
    cache = ReplayCache(model.config, length + longest)
    _sync(device)
    t0 = time.perf_counter()
    model(input_ids=ids, logits_to_keep=1, **_cache_kwarg(model, cache))
    _sync(device)
    t1 = time.perf_counter()
    scores = kvzip_scores(model, ids, prompt, chunk=chunk, cache=cache, precision=precision,
                          score_backend=score_backend, attention=attention, span=span, sink=sink)
    _sync(device)
    t2 = time.perf_counter()
    kept = []
    n_keep = torch.tensor([budget], device=device)
    for layer, s in zip(cache.layers, scores, strict=True):
        sel = select_topk(s, n_keep, window)
        kept.append((gather_positions(layer.keys, sel.indices), gather_positions(layer.values, sel.indices)))
    _sync(device)
    t3 = time.perf_counter()
    peak = _peak_gib(device)
    unscored = replay_forwards(model, ids, prompt, chunk, cache) if split else None
    del cache, scores
    return {"prefill_s": round(t1 - t0, 3), "replay_s": round(t2 - t1, 3), "select_s": round(t3 - t2, 3),
            "seconds": round(t3 - t0, 3), "peak_gib": peak, "chunk": chunk, "span": span,
            "sink": None if span is None else sink, "score_backend": ran[1],
            "attention": "kernel" if ran[2] else f"backend ({ran[0]})",
            "replay_forwards_unscored_s": None if unscored is None else round(unscored, 3),
            "replay_forwards": len(replay_inputs(range(length), prompt, chunk, 8))}


@torch.no_grad()
def replay_forwards(model: torch.nn.Module, ids: torch.Tensor, prompt: list[int], chunk: int,
                    cache: ReplayCache) -> float:
    """Seconds of the same replay forwards without scoring (the model's own attention only)."""
    length = ids.shape[1]
    device = ids.device
    _sync(device)
    t0 = time.perf_counter()
    for x in replay_inputs(ids[0].tolist(), prompt, chunk, 8):
        pos = torch.arange(length, length + len(x), device=device)[None]
        model(input_ids=torch.tensor([x], device=device), position_ids=pos, logits_to_keep=1,
              **_cache_kwarg(model, cache))
        cache.rollback(length)
    _sync(device)
    return time.perf_counter() - t0


def check_mixed(device: torch.device) -> dict[str, Any]:
    """Mixed-precision logits (bf16 inputs, fp32 accumulation) against fp32 ones on random tensors."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, 32, 256, 128, generator=gen).to(device, torch.bfloat16)
    k = torch.randn(1, 8, 4096 + 256, 128, generator=gen).to(device, torch.bfloat16)
    ref = replay_chunk_scores(q, k, 4096, scaling=128**-0.5, precision="fp32")
    out = {"max_score": float(ref.max())}
    for name, max_logits in (("one_matmul", 1 << 26), ("two_pass", 0)):
        got = replay_chunk_scores(q, k, 4096, scaling=128**-0.5, precision="mixed", max_logits=max_logits,
                                  key_block=1024)
        out[f"max_abs_diff_{name}"] = float((got - ref).abs().max())
    return out


#: ``(query heads, KV heads, chunk, head_dim)`` of the kernel check and timing: Llama-3-8B, a 2K chunk.
REAL_SLICE = (32, 8, 2048, 128)


def check_kernel(device: torch.device, context: int, shape: tuple[int, int, int, int] = REAL_SLICE,
                 visible: Visible | None = None) -> dict[str, Any]:
    """The Triton kernel against the torch twin on a real-size slice (bf16 inputs).

    Scores: the kernel (native bf16 dots, fp32 accumulation), alone and with the attention
    output, against the torch twin with fp32 logits. Attention output: against fp32 sdpa with
    the replay's causal mask. ``visible``: the span-limited replay (both sides limited to it).
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    hq, hkv, c, d = shape
    scaling = d**-0.5
    q = torch.randn(1, hq, c, d, generator=gen).to(device, torch.bfloat16)
    k = torch.randn(1, hkv, context + c, d, generator=gen).to(device, torch.bfloat16)
    v = torch.randn(1, hkv, context + c, d, generator=gen).to(device, torch.bfloat16)
    ref = replay_chunk_scores(q, k, context, scaling=scaling, backend="torch", precision="fp32", max_logits=0,
                              visible=visible)
    got = replay_chunk_scores(q, k, context, scaling=scaling, backend="triton", visible=visible)
    fused, attn = replay_chunk_attention(q, k, v, context, scaling=scaling, visible=visible)
    pos = torch.arange(context + c, device=device)
    allowed = pos[None, :] <= (context + torch.arange(c, device=device))[:, None]
    if visible is not None:
        sink_end, lo, hi = visible
        allowed &= (pos >= context) | (pos < sink_end) | (pos >= lo) & (pos < hi)
    ref_attn = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(hq // hkv, dim=1), v.float().repeat_interleave(hq // hkv, dim=1),
        attn_mask=allowed,
        scale=scaling).transpose(1, 2)
    out = {"context": context, "chunk": c, "visible": visible, "max_score": float(ref.max()),
           "max_abs_diff_scores": float((got - ref).abs().max()),
           "max_abs_diff_fused_scores": float((fused - ref).abs().max()),
           "max_abs_diff_attention": float((attn.float() - ref_attn).abs().max()),
           "max_abs_attention": float(ref_attn.abs().max())}
    out["ok"] = (out["max_abs_diff_scores"] <= 2e-3 * out["max_score"]
                 and out["max_abs_diff_fused_scores"] <= 2e-3 * out["max_score"]
                 and out["max_abs_diff_attention"] <= 2e-2 * max(out["max_abs_attention"], 1e-6))
    if visible is not None:  # the hidden keys score exactly 0 on both sides
        hidden = ~torch.zeros(context, dtype=torch.bool, device=device).index_fill_(
            0, torch.cat([torch.arange(visible[0]), torch.arange(visible[1], visible[2])]).to(device), True)
        out["hidden_keys_zero"] = bool((got[..., hidden] == 0).all() and (fused[..., hidden] == 0).all())
        out["ok"] = out["ok"] and out["hidden_keys_zero"]
    return out


def check_span_small(device: torch.device) -> dict[str, Any]:
    """The span-limited kernel against the dense float64 twin on a small odd fp32 case (exact up to rounding)."""
    gen = torch.Generator(device="cpu").manual_seed(2)
    q = torch.randn(2, 12, 37, 64, generator=gen).to(device)
    k = torch.randn(2, 3, 1000 + 37, 64, generator=gen).to(device)
    visible = span_visible(1000, 600, 637, 101, 13)
    got = replay_chunk_scores(q, k, 1000, scaling=0.125, backend="triton", precision="fp32", visible=visible)
    ref = replay_chunk_scores_reference(q, k, 1000, scaling=0.125, visible=visible)
    diff = float((got.double() - ref).abs().max())
    return {"visible": visible, "max_abs_diff": diff, "max_score": float(ref.max()),
            "ok": diff <= 1e-4 * float(ref.max()) + 1e-7}


def time_span_kernel(device: torch.device, contexts: tuple[int, ...] = (32768, 131072), span: int = 2048,
                     sink: int = DEFAULT_SINK, repeats: int = 5, shape: tuple[int, int, int, int] = REAL_SLICE
                     ) -> dict[str, Any]:
    """Milliseconds of one fused replay chunk (mid-context), exact and span-limited, per context length.

    The exact chunk grows with the context; the span-limited one should not (its key blocks
    outside the sink and ``[a - span, b + span)`` are skipped).
    """
    from snapkv.kernels.replay_score import replay_attention_scores_triton

    hq, hkv, c, d = shape
    out: dict[str, Any] = {"span": span, "sink": sink, "chunk": c}
    for context in contexts:
        gen = torch.Generator(device="cpu").manual_seed(3)
        q = torch.randn(1, hq, c, d, generator=gen).to(device, torch.bfloat16)
        k = torch.randn(1, hkv, context + c, d, generator=gen).to(device, torch.bfloat16)
        v = torch.randn(1, hkv, context + c, d, generator=gen).to(device, torch.bfloat16)
        a = context // 2
        visible = span_visible(context, a, min(context, a + c), span, sink)
        row = {}
        for name, vis in (("exact_ms", None), ("span_ms", visible)):
            for i in range(repeats + 1):  # the first call is a warm-up
                if i == 1:
                    _sync(device)
                    t0 = time.perf_counter()
                replay_attention_scores_triton(q, k, context, scaling=d**-0.5, values=v, visible=vis)
            _sync(device)
            row[name] = round((time.perf_counter() - t0) / repeats * 1e3, 3)
        out[str(context)] = row
        del q, k, v
    return out


def time_kernel(device: torch.device, context: int, repeats: int = 10,
                shape: tuple[int, int, int, int] = REAL_SLICE) -> dict[str, Any]:
    """Milliseconds and TFLOP/s of one replay chunk (Llama-3-8B heads, 2K queries, bf16) per tile choice.

    ``fused``: the kernel's output and scores (QK + PV, then QK: 3 matmul units); ``scores``:
    scores only (QK twice: 2 units); ``sdpa``: torch's attention of the same queries over the
    same keys (GQA, no mask: 2 units), the reference for what the first pass could reach.
    """
    from snapkv.kernels.replay_score import replay_attention_scores_triton

    gen = torch.Generator(device="cpu").manual_seed(1)
    hq, hkv, c, d = shape
    q = torch.randn(1, hq, c, d, generator=gen).to(device, torch.bfloat16)
    k = torch.randn(1, hkv, context + c, d, generator=gen).to(device, torch.bfloat16)
    v = torch.randn(1, hkv, context + c, d, generator=gen).to(device, torch.bfloat16)
    unit = 2 * hq * c * (context + c) * d  # FLOPs of one q @ k^T over all heads

    def ms(fn: Any) -> float:
        fn()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync(device)
        return (time.perf_counter() - t0) / repeats * 1e3

    out: dict[str, Any] = {"context": context, "chunk": c}
    sdpa = ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    out["sdpa"] = {"ms": round(sdpa, 3), "tflops": round(2 * unit / sdpa / 1e9, 1)}
    for bm, bn in ((None, None), (64, 64), (128, 128)):
        tag = "default" if bm is None else f"m{bm}_n{bn}"
        try:
            f = ms(lambda bm=bm, bn=bn: replay_attention_scores_triton(q, k, context, scaling=d**-0.5, values=v,
                                                                       block_m=bm, block_n=bn))
            sc = ms(lambda bm=bm, bn=bn: replay_attention_scores_triton(q, k, context, scaling=d**-0.5,
                                                                        block_m=bm, block_n=bn))
            out[tag] = {"fused_ms": round(f, 3), "fused_tflops": round(3 * unit / f / 1e9, 1),
                        "scores_ms": round(sc, 3), "scores_tflops": round(2 * unit / sc / 1e9, 1)}
        except Exception as e:  # a tile that does not fit this GPU's shared memory: recorded
            out[tag] = {"error": repr(e)[:300]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b", help="a random shape of snapkv.bench.models, or smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "mixed"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--compare-max-tokens", type=int, default=32768,
                        help="up to this length also time kvzip with the model's attention (kernel scores) and "
                             "with the torch scores (0: never)")
    parser.add_argument("--estimate-only", action="store_true",
                        help="print the memory estimate per length (llama3-8b shape, bf16) and exit")
    parser.add_argument("--split", action="store_true",
                        help="also time the replay forwards without scoring (not counted in seconds)")
    parser.add_argument("--span", type=int, default=2048,
                        help="also time the span-limited replay with this span (kvzip_span; -1: not at all)")
    parser.add_argument("--sink", type=int, default=DEFAULT_SINK, help="context tokens every span-limited chunk sees")
    parser.add_argument("--exact-max-tokens", type=int, default=1 << 30,
                        help="time the exact replay (kvzip) only up to this length (the span one runs at all)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="skip a kvzip point whose time, extrapolated from the last one (length^1.7), "
                             "would end past this many seconds from the start (recorded as skipped)")
    args = parser.parse_args()
    if args.span < -1 or args.sink < 0:
        parser.error(f"--span must be >= -1 (-1: off) and --sink >= 0, got {args.span}, {args.sink}")
    span = None if args.span < 0 else args.span
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    if args.estimate_only:
        import transformers

        from snapkv.bench.models import RANDOM_SHAPES

        cfg_name, kwargs = RANDOM_SHAPES[args.model]
        config = getattr(transformers, cfg_name)(**kwargs)
        est = {n: {**{k: round(v / 2**30, 2) for k, v in estimate_peak_bytes(config, n, args.chunk, 9).items()},
                   "flops_ratio_kvzip_over_snapkv": flops_estimate(config, n, args.chunk, 9)["ratio"],
                   "flops_ratio_kvzip_span_over_snapkv": flops_estimate(
                       config, n, args.chunk, 9, span if span is not None else n, args.sink)["span_ratio"]}
               for n in lengths}
        print(json.dumps({"model": args.model, "chunk": args.chunk, "gib": est}, indent=1))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": args.model, "chunk": args.chunk, "gib": est}, indent=1))
        return
    result: dict[str, Any] = {"model": args.model, "device": str(device), "torch": torch.__version__,
                              "budget": args.budget, "window": args.window, "span": span, "sink": args.sink,
                              "points": []}
    if args.model == "smollm2":
        from snapkv.eval.runner import codec_for, load
        from snapkv.eval.tasks import make_sample
        from snapkv.methods.kvzip import DEFAULT_REPLAY_PROMPT

        model, tok = load("smollm2")
        codec = codec_for(tok)
        prompt = list(codec.encode(DEFAULT_REPLAY_PROMPT)) + list(codec.tail)

        def ids_for(n: int) -> torch.Tensor:
            return torch.tensor([list(make_sample("passkey", codec, n, 0, 0).context_ids)], device=device)
    else:
        from snapkv.bench.models import random_model

        model = random_model(args.model, device=device, dtype=torch.bfloat16 if device.type == "cuda" else
                             torch.float32)
        prompt = [t % model.config.vocab_size for t in (17, 2031, 3, 905, 611, 28, 77, 400, 12)]  # any 9 tokens

        def ids_for(n: int) -> torch.Tensor:
            gen = torch.Generator(device="cpu").manual_seed(n)
            return torch.randint(100, model.config.vocab_size, (1, n), generator=gen).to(device)
    if device.type == "cuda":
        try:
            result["mixed_check"] = check_mixed(device)
        except Exception as e:  # bf16 x bf16 -> fp32 bmm missing: say so and score in fp32
            result["mixed_check"] = {"error": repr(e)[:500]}
            if args.precision == "auto":
                args.precision = "fp32"
                print("NOTE: mixed-precision logits unavailable, scoring with --precision fp32", flush=True)
        print("mixed check", result["mixed_check"], flush=True)
        free = torch.cuda.mem_get_info(device)[0]
        try:
            result["kernel_check"] = check_kernel(device, min(32768, max(4096, free // 2**30 * 256)))
        except Exception as e:  # recorded; the timings still run (and say which backend they used)
            result["kernel_check"] = {"error": repr(e)[:500], "ok": False}
        print("kernel check", result["kernel_check"], flush=True)
        try:
            result["kernel_timing"] = time_kernel(device, 32768)
        except Exception as e:
            result["kernel_timing"] = {"error": repr(e)[:500]}
        print("kernel timing", result["kernel_timing"], flush=True)
        if span is not None:
            for key, fn in (("span_check_small", lambda: check_span_small(device)),
                            ("span_check", lambda: check_kernel(device, 16384, visible=span_visible(
                                16384, 6144, 8192, span, args.sink))),
                            ("span_kernel_timing", lambda: time_span_kernel(device, (32768, 131072), span, args.sink))):
                try:
                    result[key] = fn()
                except Exception as e:  # recorded; the timings still run
                    result[key] = {"error": repr(e)[:500], "ok": False}
                print(key, result[key], flush=True)
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(device)[0]
        requested = {fit_length(model.config, n, args.chunk, len(prompt), free, True): n for n in lengths}
        result["free_gib_after_model"] = round(free / 2**30, 1)
        if any(k != v for k, v in requested.items()):
            print("NOTE: lengths shrunk to fit free memory:", requested, flush=True)
        lengths = sorted(requested)
    else:
        requested = {n: n for n in lengths}
    result["precision"] = args.precision
    # Warm-up on a short prompt (kernels, allocator), discarded.
    warm = ids_for(min(lengths[0], 1024))
    snapkv_prefill(model, warm, min(args.budget, warm.shape[1] // 2), args.window)
    warm_kws: list[dict[str, Any]] = [{}, {"attention": "backend"}, {"score_backend": "torch", "attention": "backend"}]
    if span is not None:
        warm_kws += [{"span": span, "sink": args.sink}, {"span": span, "sink": args.sink, "attention": "backend"}]
    for kw in warm_kws:
        if kw.get("attention") and lengths[0] > args.compare_max_tokens:
            continue
        kvzip_prefill(model, warm, prompt, min(args.budget, warm.shape[1] // 2), args.window,
                      min(args.chunk, 512), args.precision, **kw)
    for n in lengths:
        ids = ids_for(n)
        point: dict[str, Any] = {"tokens": ids.shape[1],
                                 "flops_estimate": flops_estimate(model.config, n, args.chunk, len(prompt), span,
                                                                  args.sink)}
        if requested[n] != n:
            point["requested_tokens"] = requested[n]

        def run_kvzip(ids: torch.Tensor = ids, **kw: Any) -> dict[str, Any]:
            return kvzip_prefill(model, ids, prompt, args.budget, args.window, args.chunk, args.precision,
                                 args.split and not kw, **kw)

        def run_span(**kw: Any) -> dict[str, Any]:
            return run_kvzip(span=span, sink=args.sink, **kw)

        runs: dict[str, Any] = {"snapkv": lambda ids=ids: snapkv_prefill(model, ids, args.budget, args.window)}
        if span is not None:
            runs["kvzip_span"] = run_span
        if n <= args.exact_max_tokens:
            runs["kvzip"] = run_kvzip
        else:
            point["kvzip"] = {"skipped": f"exact replay above --exact-max-tokens {args.exact_max_tokens}"}
        if n <= args.compare_max_tokens:
            if span is not None:
                runs["kvzip_span_backend_attention"] = lambda: run_span(attention="backend")
            if n <= args.exact_max_tokens:
                runs["kvzip_backend_attention"] = lambda: run_kvzip(attention="backend")
                runs["kvzip_torch_scores"] = lambda: run_kvzip(score_backend="torch", attention="backend")
        queue = list(runs.items())
        for name, fn in queue:
            last = next((p for p in reversed(result["points"]) if "seconds" in p.get(name, {})), None)
            if name.startswith("kvzip") and last is not None:
                # An 8B prefill's FLOPs grow ~10x from 32K to 128K (linear layers + attention): ^1.7.
                guess = last[name]["seconds"] * (n / last["tokens"]) ** 1.7
                if time.perf_counter() - start + guess > args.budget_s:
                    point[name] = {"skipped": f"about {guess:.0f} s expected, past --budget-s {args.budget_s:.0f}"}
                    print(n, name, point[name], flush=True)
                    continue
            try:
                point[name] = fn()
            except Exception as e:  # e.g. out of memory: recorded, the next point still runs
                point[name] = {"error": repr(e)[:500]}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if name == "kvzip" and "kvzip_backend_attention" not in runs:
                    # Recorded as its own variant (not as "kvzip"): the kernel's failure stays visible.
                    runs["kvzip_backend_attention"] = lambda: run_kvzip(attention="backend")
                    runs["kvzip_torch_scores"] = lambda: run_kvzip(score_backend="torch", attention="backend")
                    queue += [(k, runs[k]) for k in ("kvzip_backend_attention", "kvzip_torch_scores")]
                if name == "kvzip_span" and "kvzip_span_backend_attention" not in runs:
                    runs["kvzip_span_backend_attention"] = lambda: run_span(attention="backend")
                    queue.append(("kvzip_span_backend_attention", runs["kvzip_span_backend_attention"]))
            print(n, name, point[name], flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({**result, "points": [*result["points"], point]}, indent=1))
        for name in [x for x in runs if x.startswith("kvzip")]:
            if "seconds" in point["snapkv"] and "seconds" in point.get(name, {}):
                point[f"{name}_over_snapkv"] = round(point[name]["seconds"] / point["snapkv"]["seconds"], 2)
        result["points"].append(point)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
