"""A model split over GPUs by layers (accelerate ``device_map``), transformers path with a SnapKV cache.

    python scripts/bench_split.py --out runs/split                       # 2 x H200, Llama-3-70B shape
    python scripts/bench_split.py --shape llama3-8b --lengths 131072     # the issue-14 crash shape

Random bf16 weights are drawn on the GPU each layer lives on (a 70B model's 140 GB never exist
on disk or in host memory). For each prompt length: TTFT, decode ms/token (median of greedy
steps through ``model(...)`` with the cache) and peak GiB per GPU, SnapKV budget 2048 against
the full cache. Writes ``OUT/split.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from snapkv import SnapKVConfig, SnapKVSession  # noqa: E402
from snapkv.integration.hf import cache_argument  # noqa: E402

SHAPES = {
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, head_dim=128),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128),
}


def build(shape: str, devices: list[torch.device], layers: int | None) -> torch.nn.Module:
    """Random weights, each layer drawn on its own device; accelerate hooks move activations between them."""
    from accelerate import dispatch_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = dict(SHAPES[shape], rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=1 << 21,
               tie_word_embeddings=False)
    if layers:
        cfg["num_hidden_layers"] = layers
    config = LlamaConfig(**cfg)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    n = config.num_hidden_layers
    dmap = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0], "model.norm": devices[-1],
            "lm_head": devices[-1]}
    dmap.update({f"model.layers.{i}": devices[i * len(devices) // n] for i in range(n)})
    seed = 0
    for name, dev in dmap.items():
        module = model.get_submodule(name)
        module.to_empty(device=dev)
        for pname, p in module.named_parameters():
            if "norm" in pname or name == "model.norm":
                p.data.fill_(1.0)
            else:  # transformers' initializer: normal, std 0.02 (never zeros)
                seed += 1
                p.data.normal_(0.0, 0.02, generator=torch.Generator(dev).manual_seed(seed))
    with torch.device(devices[0]):  # to_empty left its inv_freq buffer uninitialized
        model.model.rotary_emb = LlamaRotaryEmbedding(config)
    model.eval().requires_grad_(False)
    return dispatch_model(model, device_map={k: str(v) for k, v in dmap.items()})


def _sync(d: torch.device) -> None:
    if d.type == "cuda":
        torch.cuda.synchronize(d)


def run_point(model: torch.nn.Module, n: int, budget: int | None, steps: int, devices: list[torch.device]) -> dict:
    point: dict = {"n": n, "cache": f"snapkv{budget}" if budget else "full"}
    for d in devices:
        if d.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)
    ids = torch.randint(4, model.config.vocab_size, (1, n), device=devices[0])
    arg = cache_argument(model)
    try:
        with torch.inference_mode():
            if budget:
                session = SnapKVSession(model, SnapKVConfig(budget=budget))
                session.__enter__()
                cache = session.new_cache()
            else:
                from transformers import DynamicCache

                session, cache = None, DynamicCache(config=model.config)
            try:
                for d in devices:
                    _sync(d)
                t = time.perf_counter()
                logits = model(input_ids=ids, logits_to_keep=1, **{arg: cache}).logits[:, -1]
                tok = logits.argmax(-1, keepdim=True)
                for d in devices:
                    _sync(d)
                point["ttft_s"] = round(time.perf_counter() - t, 2)
                times = []
                for i in range(steps):
                    s = time.perf_counter()
                    pos = torch.full((1, 1), n + i, device=devices[0])
                    logits = model(input_ids=tok.to(devices[0]), position_ids=pos, **{arg: cache}).logits[:, -1]
                    tok = logits.argmax(-1, keepdim=True)
                    _sync(devices[-1])
                    times.append(1000 * (time.perf_counter() - s))
                point["decode_ms"] = round(statistics.median(times[2:]), 2)
                point["kv_gib"] = round(sum(
                    sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
                    for layer in cache.layers) / 2**30, 2)
            finally:
                if session is not None:
                    session.__exit__(None, None, None)
    except torch.OutOfMemoryError as err:
        point["oom"] = str(err).splitlines()[0][:160]
    if devices[0].type == "cuda":
        point["peak_gib_per_gpu"] = [round(torch.cuda.max_memory_allocated(d) / 2**30, 1) for d in devices]
        torch.cuda.empty_cache()
    return point


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/split")
    parser.add_argument("--shape", default="llama3-70b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="SnapKV runs per length (the crash was intermittent)")
    parser.add_argument("--no-full", action="store_true", help="skip the full-cache baseline")
    parser.add_argument("--time-budget", type=float, default=500.0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())] or [torch.device("cpu")] * 2
    model = build(args.shape, devices, args.layers)
    result = {"shape": args.shape, "devices": [str(d) for d in devices],
              "build_s": round(time.perf_counter() - t0, 1), "torch": torch.__version__, "points": []}
    for n in args.lengths:
        runs = [2048] * args.repeats + ([] if args.no_full else [None])
        for budget in runs:
            if time.perf_counter() - t0 > args.time_budget:
                result["points"].append({"n": n, "cache": budget, "skipped": "time budget"})
                continue
            point = run_point(model, n, budget, args.steps, devices)
            print(json.dumps(point), flush=True)
            result["points"].append(point)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "split.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
