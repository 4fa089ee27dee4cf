"""Engine decode with head-adaptive budgets (AdaptiveHeads) against uniform SnapKV, end to end.

For each prompt length, the same random prompt goes through :class:`~snapkv.generation.Engine`
twice on one model (default: the Llama-3-8B shape, random bf16 weights): once with uniform
SnapKV and once with ``AdaptiveHeads(SnapKV(), alpha)``, at the same budget. Each run: the
engine's prefill (per-layer scoring and selection; adaptive: per-head counts, the cache sized by
the fullest head), then the captured decode (CUDA graph, fused kernels, the ragged attention
reading each head's own tokens). Reported per run: TTFT (prefill + first token), decode
ms/token (median of ``--steps`` captured steps after a warm-up), peak memory, the cache's
prompt slots, allocated K/V bytes and kept K/V bytes, the per-head counts' spread, and the
relative logit error of the captured fused step against the eager unfused step on the same cache.

GPU (the gpu_suite stage ``adaptive_engine``)::

    python scripts/bench_engine_adaptive.py --out runs/adaptive_engine.json

CPU smoke run (tiny shape)::

    python scripts/bench_engine_adaptive.py --shape tiny --prompts 300 --budget 40 --steps 3 --out /tmp/a.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
import transformers as tf

from snapkv import AdaptiveHeads, SnapKV, SnapKVConfig
from snapkv.bench.measure import time_steps
from snapkv.generation import DecodeRunner, Engine

SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=16, initializer_range=0.2),
}


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random-weight Llama of ``shape`` on ``device`` (weights do the same work as real ones)."""
    cfg = tf.LlamaConfig(**SHAPES[shape], max_position_embeddings=1 << 20)
    torch.manual_seed(0)
    with device:
        return tf.LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(model: torch.nn.Module, ids: torch.Tensor, config: SnapKVConfig, method: Any, steps: int) -> dict[str, Any]:
    """Prefill ``ids [1, n]`` and time the captured decode; one row of the report."""
    device = ids.device
    engine = Engine(model, config, method=method)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    cache, logits, stats = engine.prefill(ids, max_new_tokens=steps + 16)
    first = logits.argmax(-1)
    _sync(device)
    ttft = time.perf_counter() - t0
    with torch.inference_mode():
        state = cache.state()
        eager = DecodeRunner(engine.parts, cache, use_graph=False, fused=False)  # the masked reference step
        eager.feed(first)
        eager.step()
        ref = eager.logits.float().clone()
        cache.rewind(state)
        runner = engine.runner(cache)  # CUDA graph + fused kernels on a GPU (eager twins elsewhere)
        runner.feed(first)
        runner.capture()
        runner.step()
        err = float((runner.logits.float() - ref).abs().max() / ref.abs().max())
        for _ in range(3):
            runner.step()
        times = time_steps(runner.step, steps, device)
    lengths = cache.head_tokens().float()  # [layers, B, Hkv] the prompt's kept tokens per head
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "method": "adaptive" if engine.per_head else "uniform",
        "ttft_s": ttft,
        "decode_ms": statistics.median(times),
        "decode_ms_p10": sorted(times)[len(times) // 10],
        "decode_ms_p90": sorted(times)[(9 * len(times)) // 10],
        "peak_gib": peak,
        "prompt_slots": cache.prompt_slots,
        "kv_bytes_allocated": cache.kv_bytes(),
        "kv_bytes_kept": cache.kept_bytes(),
        "head_tokens_min": int(lengths.min()),
        "head_tokens_max": int(lengths.max()),
        "head_tokens_mean": float(lengths.mean()),
        "kept_per_head_mean_layer0": stats.kept[0][0],
        "fused_graph_vs_eager_rel_err": err,
        "ops": runner.ops.name if runner.ops is not None else "unfused",
        "graph": runner.use_graph,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--prompts", type=int, nargs="+", default=[32768, 131072], help="prompt lengths")
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--alpha", type=float, default=0.2, help="AdaptiveHeads' floor share")
    p.add_argument("--steps", type=int, default=100, help="timed decode steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = build_model(args.shape, device, dtype)
    meta = {"shape": args.shape, "budget": args.budget, "window": args.window, "alpha": args.alpha,
            "steps": args.steps, "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
            "transformers": tf.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", "model_build_s": time.perf_counter() - t0}
    print(json.dumps(meta), flush=True)
    config = SnapKVConfig(budget=args.budget, window=args.window, kernel=7, pooling="max")
    methods = {"uniform": SnapKV(kernel=7, pooling="max"),
               "adaptive": AdaptiveHeads(SnapKV(kernel=7, pooling="max"), alpha=args.alpha)}
    rows = []
    for n in args.prompts:
        gen = torch.Generator().manual_seed(n)
        ids = torch.randint(4, model.config.vocab_size, (1, n), generator=gen).to(device)
        res: dict[str, Any] = {"prompt_tokens": n}
        for name, method in methods.items():
            res[name] = run_one(model, ids, config, method, args.steps)
            r = res[name]
            print(f"n={n} {name}: TTFT {r['ttft_s']:.2f} s, decode {r['decode_ms']:.3f} ms/token, slots "
                  f"{r['prompt_slots']}, heads {r['head_tokens_min']}..{r['head_tokens_max']} tokens, "
                  f"alloc {r['kv_bytes_allocated'] / 2**20:.0f} MiB, kept {r['kv_bytes_kept'] / 2**20:.0f} MiB, "
                  f"peak {r['peak_gib']} GiB, err {r['fused_graph_vs_eager_rel_err']:.1e} ({r['ops']})", flush=True)
        res["adaptive_over_uniform_decode"] = res["adaptive"]["decode_ms"] / res["uniform"]["decode_ms"]
        rows.append(res)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
