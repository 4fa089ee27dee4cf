"""Ragged decode attention against dense uniform decode attention at equal total kept tokens.

    python scripts/bench_ragged.py --out bench_ragged.json [--budgets 1024 2048 4096] [--batch 1 8]

One layer of a Llama-3-8B shape (32 query / 8 KV heads, head dim 128, bf16). For each batch
and budget ``P`` (tokens per KV head of uniform SnapKV, so ``B * 8 * P`` kept tokens):

* dense uniform: keys/values ``[B, Hkv, P + slack, D]``, attention over the ``P + 1`` filled
  slots by SDPA (GQA packed as ``[B, Hkv, G, D]`` queries, and with ``enable_gqa``), and by the
  engine's static-cache ``decode_attention`` (matmul over all slots with a bias mask);
* ragged: the same total in a :class:`~snapkv.cache.ragged.RaggedLayer`, every head at ``P``
  ("ragged_uniform") and heads skewed as head-adaptive selection makes them ("ragged_skewed":
  a floor of ``32 + 0.2 (P - 32)`` per head, the rest split by a Dirichlet(0.3) draw per row).

Times are medians in microseconds from ``triton.testing.do_bench`` (eager launches) and
``do_bench_cudagraph`` (launch overhead removed, as in the captured decode loop), for attention
alone and for a decode step (append the new token in place, then attend; the append is undone
after each call so every call sees the same lengths). Memory: bytes the layer reports and the
allocator's measured growth.

``--model-prompts 8192 32768`` adds a whole-model comparison through the transformers path
(``SnapKVSession``, ``model.generate``, sdpa): a Llama-3-8B-shaped model with random bf16
weights (``--model-layers``, default 32), a random-token prompt, and for each budget uniform
SnapKV against head-adaptive (ragged) SnapKV at the same total, plus the full cache: median
ms per decoded token (CUDA-synchronized timestamps of each generated token), the cache's bytes
after the prompt, and peak allocated memory.

``--engine-budgets 1024 2048`` adds the captured decode of the engine (CUDA graph, fused
Triton step) on the same model shape: the static cache filled with random K/V, every head
keeping ``P`` tokens ("uniform") against heads skewed as in the layer benchmark, a new draw
per layer ("skewed"), same total; decode ms/token (CUDA events, median) side by side, and
the skewed step's logits against the eager torch step on the same cache.
Not a test; writes one JSON file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

try:
    import snapkv  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from snapkv.cache.ragged import RaggedLayer  # noqa: E402
from snapkv.core.adaptive import RaggedSelection  # noqa: E402
from snapkv.kernels.decode_ragged import ragged_decode_attention  # noqa: E402
from snapkv.kernels.ragged_ref import ragged_decode_reference  # noqa: E402

HQ, HKV, D, WINDOW = 32, 8, 128, 32
DEVICE = "cuda"  # a CPU smoke run (Triton interpreter) may override it


def _median_us(fn: Callable[[], Any], graph: bool) -> float:
    from triton.testing import do_bench, do_bench_cudagraph

    if graph:
        return 1000 * do_bench_cudagraph(fn, rep=50, return_mode="median")
    return 1000 * do_bench(fn, warmup=25, rep=100, return_mode="median")


def skewed_lengths(b: int, budget: int, gen: torch.Generator, alpha: float = 0.2, conc: float = 0.3) -> torch.Tensor:
    """``[B, Hkv]`` per-head kept counts summing to ``Hkv * budget`` per row, floor per head."""
    floor = WINDOW + int(alpha * (budget - WINDOW))
    rest = HKV * (budget - floor)
    share = torch.distributions.Dirichlet(torch.full((HKV,), conc)).sample((b,))  # [B, Hkv]
    extra = (share * rest).floor().long()
    extra[:, 0] += rest - extra.sum(-1)  # exact row totals
    return (floor + extra).to(torch.int32)


def _selection(lengths: torch.Tensor, length: int, device: torch.device) -> RaggedSelection:
    """Each head keeps its first ``lengths[b, h]`` positions of a ``length``-token prompt."""
    b, h = lengths.shape
    flat = lengths.view(-1).long()
    seg = torch.arange(b * h).repeat_interleave(flat)
    offsets = flat.cumsum(0) - flat
    idx = torch.arange(int(flat.sum())) - offsets[seg]
    return RaggedSelection(idx.to(device), seg.to(device), lengths.to(device), offsets.view(b, h).to(device), length)


def _held(build: Callable[[], Any]) -> tuple[Any, int]:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    obj = build()
    torch.cuda.synchronize()
    return obj, torch.cuda.memory_allocated() - before


def bench_config(batch: int, budget: int, slack: int, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    """All variants for one batch and budget."""
    dev = torch.device(DEVICE)
    gen = torch.Generator().manual_seed(seed)
    g = HQ // HKV
    scaling = D**-0.5
    cap = budget + slack
    q = torch.randn(batch, HQ, D, generator=gen).to(dev, dtype)
    new_k = torch.randn(batch, HKV, 1, D, generator=gen).to(dev, dtype)
    new_v = torch.randn(batch, HKV, 1, D, generator=gen).to(dev, dtype)
    res: dict[str, Any] = {"batch": batch, "budget": budget, "slack": slack, "kept_tokens": batch * HKV * budget}
    kv_read = 2 * batch * HKV * (budget + 1) * D * q.element_size()

    # Dense uniform: a static cache with P + 1 tokens filled (the prompt plus the new one).
    def build_dense() -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(batch, HKV, cap, D, device=dev, dtype=dtype),
                torch.randn(batch, HKV, cap, D, device=dev, dtype=dtype))

    (dk, dv), dense_held = _held(build_dense)
    pos = torch.full((1,), budget, dtype=torch.long, device=dev)
    bias = torch.full((batch, cap), float("-inf"), device=dev)
    bias[:, : budget + 1] = 0.0
    qp = q.view(batch, HKV, g, D)

    def sdpa_packed() -> torch.Tensor:
        return F.scaled_dot_product_attention(qp, dk[:, :, : budget + 1], dv[:, :, : budget + 1], scale=scaling)

    def sdpa_gqa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q[:, :, None], dk[:, :, : budget + 1], dv[:, :, : budget + 1],
                                              scale=scaling, enable_gqa=True)

    def dense_step(attn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            dk.index_copy_(2, pos, new_k)
            dv.index_copy_(2, pos, new_v)
            pos.add_(1)
            out = attn()
            pos.sub_(1)
            return out
        return step

    variants: dict[str, Callable[[], torch.Tensor]] = {"sdpa_packed": sdpa_packed, "sdpa_gqa": sdpa_gqa}
    try:
        from snapkv.generation.attention import decode_attention

        variants["engine_static"] = lambda: decode_attention(q[:, :, None], dk, dv, bias, scaling)
    except ImportError:
        pass

    # Ragged layers with the same total: uniform heads, and skewed heads.
    layouts = {"ragged_uniform": torch.full((batch, HKV), budget, dtype=torch.int32),
               "ragged_skewed": skewed_lengths(batch, budget, gen)}
    layers: dict[str, RaggedLayer] = {}
    for name, lengths in layouts.items():
        longest = int(lengths.max())
        src_k = torch.randn(batch, HKV, longest, D, device=dev, dtype=dtype)
        src_v = torch.randn(batch, HKV, longest, D, device=dev, dtype=dtype)
        sel = _selection(lengths, longest, dev)
        layer, held = _held(partial(RaggedLayer.from_selection, src_k, src_v, sel, slack))
        del src_k, src_v
        layer.append(new_k, new_v)  # P + 1 tokens, like the dense variants
        layers[name] = layer
        kept_plus_slack = 2 * (batch * HKV * budget + batch * HKV * slack) * D * q.element_size()
        res[f"{name}_memory"] = {"bytes": layer.bytes(), "kv_bytes": layer.kv_bytes(), "held": held,
                                 "kept_plus_slack": kept_plus_slack,
                                 "held_over_kept_plus_slack": held / kept_plus_slack,
                                 "longest_head": int(lengths.max()), "shortest_head": int(lengths.min())}

        def attn(layer: RaggedLayer = layer) -> torch.Tensor:
            return ragged_decode_attention(q, layer.keys, layer.values, layer.starts, layer.lengths,
                                           max_len=layer.max_capacity, sm_scale=scaling)

        variants[name] = attn
        out = attn()
        ref = ragged_decode_reference(q, layer.keys, layer.values, layer.starts, layer.lengths, scaling=scaling)
        res[f"{name}_max_rel_err"] = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
    res["dense_memory"] = {"bytes": 2 * dk.numel() * dk.element_size(), "held": dense_held}

    def ragged_step(layer: RaggedLayer, attn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            layer.append(new_k, new_v)
            out = attn()
            layer.lengths.sub_(1)
            layer.appended -= 1
            return out
        return step

    times: dict[str, dict[str, float]] = {}
    for name, attn in variants.items():
        step = ragged_step(layers[name], attn) if name in layers else dense_step(attn)
        t = {"attn_us": _median_us(attn, False), "attn_graph_us": _median_us(attn, True),
             "step_us": _median_us(step, False), "step_graph_us": _median_us(step, True)}
        t["attn_graph_gbps"] = kv_read / (t["attn_graph_us"] * 1e3)
        times[name] = t
    res["times"] = times
    best_dense = min(times[n]["step_graph_us"] for n in ("sdpa_packed", "sdpa_gqa", "engine_static") if n in times)
    res["ragged_over_best_dense_step_graph"] = {n: times[n]["step_graph_us"] / best_dense for n in layers}
    return res


def sweep(batch: int, budget: int, slack: int, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Kernel launch parameters on the skewed layout (attention alone, graph-timed)."""
    dev = torch.device(DEVICE)
    gen = torch.Generator().manual_seed(1)
    lengths = skewed_lengths(batch, budget, gen)
    longest = int(lengths.max())
    src = torch.randn(batch, HKV, longest, D, device=dev, dtype=dtype)
    layer = RaggedLayer.from_selection(src, src, _selection(lengths, longest, dev), slack)
    q = torch.randn(batch, HQ, D, device=dev, dtype=dtype)
    rows = []
    for block_n in (32, 64, 128):
        for num_warps in (4, 8):
            for num_splits in (None, 8, 32, 64):
                def attn(block_n: int = block_n, num_warps: int = num_warps, num_splits: Any = num_splits) -> Any:
                    return ragged_decode_attention(q, layer.keys, layer.values, layer.starts, layer.lengths,
                                                   max_len=layer.max_capacity, sm_scale=D**-0.5, block_n=block_n,
                                                   num_warps=num_warps, num_splits=num_splits)
                try:
                    us = _median_us(attn, True)
                except Exception as e:  # a launch configuration the GPU rejects
                    rows.append({"block_n": block_n, "num_warps": num_warps, "num_splits": num_splits, "error": str(e)})
                    continue
                rows.append({"batch": batch, "budget": budget, "block_n": block_n, "num_warps": num_warps,
                             "num_splits": num_splits, "attn_graph_us": us})
    return rows


class _TokenClock:
    """A generate() streamer that records a synchronized timestamp per generated token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        import time

        if not self._prompt_seen:  # generate() first hands over the prompt
            self._prompt_seen = True
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def model_decode(prompts: list[int], budgets: list[int], layers: int, new_tokens: int) -> list[dict[str, Any]]:
    """Whole-model decode: full cache, uniform SnapKV and head-adaptive SnapKV, side by side."""
    import statistics

    import transformers as tf

    from snapkv import SnapKVConfig, SnapKVSession
    from snapkv.integration.hf import cache_argument

    cfg = tf.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D, rope_theta=500000.0,
                         max_position_embeddings=max(prompts) + new_tokens + 64)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    rows = []
    for n in prompts:
        ids = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)).to(DEVICE)
        settings: list[tuple[str, int | None]] = [("full", None)]
        settings += [(mode, b) for b in budgets for mode in ("uniform", "adaptive")]
        steps: dict[tuple[str, int | None], list[float]] = {s: [] for s in settings}
        info: dict[tuple[str, int | None], dict[str, Any]] = {}
        # Two passes in opposite orders; each setting's median is over both passes' token steps.
        for order in (settings, settings[::-1]):
            for mode, budget in order:
                clock = _TokenClock()
                cuda = DEVICE == "cuda"
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() if cuda else 0
                gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock,
                           pad_token_id=0)
                spread = None
                with torch.no_grad():
                    if budget is None:
                        cache = tf.DynamicCache(config=cfg)
                        out = model.generate(ids, **{cache_argument(model): cache}, **gen)
                        kv = sum(t.numel() * t.element_size() for layer in cache.layers
                                 for t in (layer.keys, layer.values))
                    else:
                        with SnapKVSession(model, SnapKVConfig(budget=budget, window=WINDOW), head_budget=mode,
                                           slack=new_tokens + 8) as s:
                            cache = s.new_cache()
                            out = model.generate(ids, **s.cache_kwargs(cache), **gen)
                            kv = cache.kv_bytes()
                        rag = [layer.ragged for layer in cache.layers if getattr(layer, "ragged", None) is not None]
                        if rag:  # kept tokens per head (without the generated ones), over all layers
                            kept = torch.stack([(r.lengths - r.appended).float() for r in rag])
                            spread = {"longest_head": int(kept.max()), "shortest_head": int(kept.min()),
                                      "mean_head": float(kept.mean())}
                steps[(mode, budget)] += [b - a for a, b in itertools.pairwise(clock.stamps)]
                info[(mode, budget)] = {"new_tokens": out.shape[1] - n, "cache_bytes_after": kv, "head_spread": spread,
                                        "peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda
                                        else float("nan")}
                del cache, out
        for mode, budget in settings:
            t = steps[(mode, budget)]
            row = {"prompt": n, "mode": mode, "budget": budget, "layers": layers, "steps_timed": len(t),
                   "decode_ms_per_token": 1000 * statistics.median(t), **info[(mode, budget)]}
            rows.append(row)
            print(f"model n={n} {mode} budget={budget}: {row['decode_ms_per_token']:.2f} ms/token "
                  f"({len(t)} steps), cache {row['cache_bytes_after'] / 2**20:.1f} MiB, "
                  f"peak +{row['peak_gib']:.2f} GiB, heads {row['head_spread']}", flush=True)
    return rows


def engine_decode(budgets: list[int], batches: list[int], layers: int, steps: int = 100) -> list[dict[str, Any]]:
    """Captured whole-model decode over uniform vs skewed per-head lengths at equal totals."""
    import statistics

    import transformers as tf

    from snapkv.bench.measure import time_steps
    from snapkv.generation import DecodeRunner, StaticKVCache
    from snapkv.generation.adapter import DecoderParts

    cfg = tf.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D, rope_theta=500000.0,
                         max_position_embeddings=1 << 20)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    parts = DecoderParts.from_model(model)
    rows = []
    for batch in batches:
        for budget in budgets:
            gen = torch.Generator().manual_seed(budget + batch)
            layouts = {"uniform": [torch.full((batch, HKV), budget, dtype=torch.int32) for _ in range(layers)],
                       "skewed": [skewed_lengths(batch, budget, gen) for _ in range(layers)]}
            res: dict[str, Any] = {"batch": batch, "budget": budget, "layers": layers, "steps": steps}
            for name, per_layer in layouts.items():
                slots = max(int(x.max()) for x in per_layer)
                cache = StaticKVCache(layers, batch, HKV, D, slots, steps + 16, dtype=torch.bfloat16, device=DEVICE)
                for li, lengths in enumerate(per_layer):
                    for b in range(batch):
                        k = torch.randn(HKV, slots, D, device=DEVICE, dtype=torch.bfloat16)
                        cache.load(li, b, k, torch.randn_like(k), head_lengths=lengths[b].tolist())
                for b in range(batch):
                    cache.set_prompt_length(b, 32768)
                tokens = torch.randint(4, cfg.vocab_size, (batch,), generator=gen).to(DEVICE)
                with torch.inference_mode():
                    state = cache.state()
                    eager = DecodeRunner(parts, cache, use_graph=False, fused=False)
                    eager.feed(tokens)
                    eager.step()
                    ref = eager.logits.float().clone()
                    cache.rewind(state)
                    runner = DecodeRunner(parts, cache)  # graph + fused Triton kernels
                    runner.feed(tokens)
                    runner.capture()
                    runner.step()
                    err = float((runner.logits.float() - ref).abs().max() / ref.abs().max())
                    for _ in range(5):
                        runner.step()
                    times = time_steps(runner.step, steps, torch.device(DEVICE))
                kept = sum(int(x.sum()) for x in per_layer)
                res[name] = {"decode_ms": statistics.median(times), "prompt_slots": slots,
                             "kept_head_tokens": kept, "longest_head": max(int(x.max()) for x in per_layer),
                             "static_cache_bytes": cache.kv_bytes(), "kept_bytes": cache.kept_bytes(),
                             "graph_vs_eager_max_rel_err": err}
                del runner, eager, cache
            res["skewed_over_uniform"] = res["skewed"]["decode_ms"] / res["uniform"]["decode_ms"]
            rows.append(res)
            print(f"engine B={batch} P={budget}: uniform {res['uniform']['decode_ms']:.3f} ms, skewed "
                  f"{res['skewed']['decode_ms']:.3f} ms ({res['skewed_over_uniform']:.3f}x), logits err "
                  f"{res['skewed']['graph_vs_eager_max_rel_err']:.1e}", flush=True)
    return rows


def main() -> None:
    """Parse arguments, run every configuration, write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--slack", type=int, default=256)
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--no-sweep", action="store_true", help="skip the launch-parameter sweep")
    p.add_argument("--model-prompts", type=int, nargs="*", default=[],
                   help="prompt lengths for the whole-model comparison (none: skip it)")
    p.add_argument("--model-budgets", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--model-layers", type=int, default=32)
    p.add_argument("--model-new-tokens", type=int, default=64)
    p.add_argument("--engine-budgets", type=int, nargs="*", default=[],
                   help="budgets for the engine's captured decode, uniform vs skewed heads (none: skip)")
    p.add_argument("--engine-batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--skip-layer", action="store_true", help="skip the one-layer kernel benchmark")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_ragged needs CUDA")
    dtype = getattr(torch, args.dtype)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "shape": {"Hq": HQ, "Hkv": HKV, "D": D, "dtype": args.dtype}, "configs": []}
    for b in [] if args.skip_layer else args.batch:
        for budget in args.budgets:
            r = bench_config(b, budget, args.slack, dtype)
            result["configs"].append(r)
            t = r["times"]
            line = ", ".join(f"{n} {v['step_graph_us']:.1f}us" for n, v in t.items())
            print(f"B={b} P={budget} (decode step, graph): {line}", flush=True)
    if args.engine_budgets:
        result["engine"] = engine_decode(args.engine_budgets, args.engine_batch, args.model_layers)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.model_prompts:
        result["model"] = model_decode(args.model_prompts, args.model_budgets, args.model_layers,
                                       args.model_new_tokens)
    if not args.no_sweep and not args.skip_layer:
        result["sweep"] = [row for b in args.batch for row in sweep(b, 2048, args.slack, dtype)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
