"""Where a captured decode step spends its time: kernels inside the CUDA graph, grouped (GPU only).

Llama-3-8B shape with random bf16 weights; a prompt of ``--prompt`` random tokens prefilled by
the engine with ``--budget``; the decode graph replayed ``--steps`` times under torch.profiler.
Prints and writes (``--out``) the step time (CUDA events, graph replays), the linears-only graph
and the weight-bandwidth floor beside it, and the per-step device time of each kernel group and
of the top kernels::

    python scripts/profile_decode.py --out runs/profile.json
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import torch

from snapkv.bench.models import load_bench_model
from snapkv.bench.runner import copy_bandwidth, linear_floor_ms
from snapkv.config import SnapKVConfig
from snapkv.generation import Engine

GROUPS = (
    ("gemm", r"nvjet|gemm|gemv|cutlass|xmma|sm90_|cublas|splitKreduce"),
    ("attention", r"ragged|attn|attention|flash"),
    ("norm", r"rmsnorm|norm"),
    ("rope/kv write", r"rope|append|scatter"),
    ("silu*mul", r"silu|swiglu|mul"),
    ("sampling", r"argmax|max|topk|sort"),
    ("copy", r"copy|memcpy|memset|fill"),
)


def group(name: str) -> str:
    low = name.lower()
    for g, pat in GROUPS:
        if re.search(pat, low):
            return g
    return "other"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--prompt", type=int, default=8192)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", default="runs/profile_decode.json")
    a = p.parse_args()
    model, desc = load_bench_model(a.model, device="cuda")
    engine = Engine(model, SnapKVConfig(budget=a.budget, window=32), use_graph=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (a.batch, a.prompt), generator=g)
    cache, logits, _ = engine.prefill(ids, max_new_tokens=a.steps * 3 + 16)
    runner = engine.runner(cache)
    runner.feed(logits.argmax(-1))
    runner.capture()
    for _ in range(5):
        runner.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(a.steps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        runner.step()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    step_ms = sorted(times)[len(times) // 2]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            runner.step()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        if t and ev.count:
            per_kernel[ev.key] += t / 1000.0 / a.steps  # ms per step
            counts[ev.key] += ev.count // a.steps
    groups: dict[str, float] = defaultdict(float)
    for k, ms in per_kernel.items():
        groups[group(k)] += ms
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    bw = copy_bandwidth(torch.device("cuda"))
    out = {
        "model": desc, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "prompt": a.prompt, "budget": a.budget, "batch": a.batch,
        "step_ms_median": step_ms, "linears_graph_ms": linear_floor_ms(model, a.batch),
        "weight_floor_ms": weights / bw * 1000 if bw else None,
        "kernel_ms_per_step_total": sum(per_kernel.values()),
        "groups_ms_per_step": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "top_kernels": [{"name": k[:120], "ms_per_step": round(v, 4), "launches_per_step": counts[k],
                         "group": group(k)} for k, v in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:40]],
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "top_kernels"}, indent=1))
    for row in out["top_kernels"][:25]:
        print(f"{row['ms_per_step']:8.4f} ms x{row['launches_per_step']:<4} {row['group']:<14} {row['name']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
