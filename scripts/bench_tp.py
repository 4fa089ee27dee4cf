"""Tensor-parallel checks and benchmark, one process per GPU (torchrun).

    torchrun --nproc-per-node 2 scripts/bench_tp.py --out runs/tp            # 2 x H200
    torchrun --nproc-per-node 2 scripts/bench_tp.py --cpu --out /tmp/tp      # smoke test on CPU (gloo)

Stages (``--stages``, default all):

* ``check``: Llama-3-8B shape (4 layers, random bf16): rank-local models under
  :class:`~snapkv.generation.tp.TensorParallel` against the whole model on one GPU, teacher-forced:
  the transformers path with a SnapKV cache and the engine (captured decode, NCCL all-reduces in
  the graph), budget 1024 and the full cache.
* ``hf_tp_plan``: transformers' own ``tp_plan="auto"`` loading of a saved random checkpoint, with a
  SnapKV cache, against one GPU (what users of ``from_pretrained(tp_plan="auto")`` get).
* ``bench``: a Llama-3-70B-shaped model (80 layers, hidden 8192, 64 / 8 heads, MLP 28672, random
  bf16 built on each rank), prompts of ``--lengths`` tokens: TTFT, decode ms/token (median), peak
  GiB per GPU, SnapKV budget 2048 against the full cache; and the weight-bandwidth floor measured
  on this device (rank-local weight bytes / device-to-device copy rate).

Rank 0 writes ``OUT/tp.json``. Points stop being started after ``--time-budget`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from snapkv import SnapKVConfig, SnapKVSession  # noqa: E402
from snapkv.generation import Engine  # noqa: E402
from snapkv.generation.memory import NotEnoughMemoryError  # noqa: E402
from snapkv.generation.tp import TensorParallel, random_local_model, shard_model  # noqa: E402

LLAMA70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                rms_norm_eps=1e-5, max_position_embeddings=1 << 21, tie_word_embeddings=False)


def log(*a: object) -> None:
    if dist.get_rank() == 0:
        print(*a, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def teacher_forced_engine(engine: Engine, ids: torch.Tensor, path: torch.Tensor) -> list[torch.Tensor]:
    with torch.inference_mode():
        cache, logits, _ = engine.prefill(ids, max_new_tokens=path.shape[1] + 1)
        runner = engine.runner(cache)
        out = [logits.float()]
        for t in range(path.shape[1]):
            runner.feed(path[:, t])
            runner.step()
            out.append(runner.logits.float().clone())
    return out


def teacher_forced_hf(model: torch.nn.Module, ids: torch.Tensor, path: torch.Tensor,
                      config: SnapKVConfig) -> list[torch.Tensor]:
    with torch.inference_mode(), SnapKVSession(model, config) as s:
        kw = s.cache_kwargs(s.new_cache())
        out = [model(input_ids=ids, **kw).logits[:, -1].float()]
        n = ids.shape[1]
        for t in range(path.shape[1]):
            pos = torch.full((ids.shape[0], 1), n + t, device=ids.device)
            out.append(model(input_ids=path[:, t : t + 1], position_ids=pos, **kw).logits[:, -1].float())
    return out


def stage_check(device: torch.device, rank: int, world: int, dtype: torch.dtype, n: int) -> dict:
    from snapkv.bench.models import random_model

    full = random_model("llama3-8b" if device.type == "cuda" else "tiny-llama", device=device, dtype=dtype,
                        num_layers=4 if device.type == "cuda" else None, seed=0)
    vocab = full.lm_head.out_features
    ids = torch.randint(4, vocab, (1, n), device=device, generator=torch.Generator(device).manual_seed(1))
    path = torch.randint(4, vocab, (1, 8), device=device, generator=torch.Generator(device).manual_seed(2))
    local = shard_model(full, rank, world)
    res = {}
    for label, config in (("snapkv1024", SnapKVConfig(budget=min(1024, n // 2), window=32)),
                          ("full", SnapKVConfig(budget=1.0))):
        ref_hf = teacher_forced_hf(full, ids, path, config)
        ref_en = teacher_forced_engine(Engine(full, config), ids, path)
        with TensorParallel(local):
            got_hf = teacher_forced_hf(local, ids, path, config)
            got_en = teacher_forced_engine(Engine(local, config), ids, path)
        res[label] = {
            "hf_rel_err": max(rel(a, b) for a, b in zip(got_hf, ref_hf, strict=True)),
            "engine_rel_err": max(rel(a, b) for a, b in zip(got_en, ref_en, strict=True)),
            "engine_top1_agree": sum(int(a.argmax() == b.argmax()) for a, b in zip(got_en, ref_en, strict=True))
            / len(ref_en),
        }
    del full, local
    # bf16: the ranks sum partial products in another order; at a budget below the prompt that can move a
    # top-k choice at the margin. Same 5e-2 bound as the engine-vs-transformers GPU check (bench/checks.py).
    res["ok"] = all(v["hf_rel_err"] < 5e-2 and v["engine_rel_err"] < 5e-2 for v in res.values() if isinstance(v, dict))
    return res


def stage_hf_tp_plan(device: torch.device, rank: int, world: int, dtype: torch.dtype, out: Path) -> dict:
    """transformers' own tensor-parallel loading with a SnapKV cache, against one GPU."""
    from transformers import AutoModelForCausalLM

    from snapkv.bench.models import random_model

    ckpt = out / "tp_ckpt"
    if rank == 0:
        random_model("llama3-8b", device=device, dtype=dtype, num_layers=2, seed=0).save_pretrained(ckpt)
    dist.barrier()
    try:
        full = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        tp = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa", tp_plan="auto").eval()
        ids = torch.randint(4, 128256, (1, 3000), device=device, generator=torch.Generator(device).manual_seed(1))
        path = torch.randint(4, 128256, (1, 6), device=device, generator=torch.Generator(device).manual_seed(2))
        config = SnapKVConfig(budget=1024)
        ref = teacher_forced_hf(full, ids, path, config)
        got = teacher_forced_hf(tp, ids, path, config)
        err = max(rel(a, b) for a, b in zip(got, ref, strict=True))
        return {"ok": err < 3e-2, "rel_err": err}
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:400]}"}
    finally:
        dist.barrier()
        if rank == 0:
            import shutil

            shutil.rmtree(ckpt, ignore_errors=True)


def copy_rate(device: torch.device) -> float:
    """Device-to-device copy bytes/s (read + write counted once each)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync(device)
    return 2 * 10 * a.numel() / (time.perf_counter() - t)


def stage_bench(device: torch.device, rank: int, world: int, dtype: torch.dtype, lengths: list[int],
                steps: int, deadline: float, layers: int | None) -> dict:
    from transformers import LlamaConfig

    cfg = dict(LLAMA70B)
    if layers:
        cfg["num_hidden_layers"] = layers
    if device.type != "cuda":  # smoke test: a narrow model of the same layout
        cfg.update(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=2, head_dim=16, vocab_size=512)
    config = LlamaConfig(**cfg)
    config._attn_implementation = "sdpa"
    t0 = time.perf_counter()
    model = random_local_model(config, rank, world, device=device, dtype=dtype)
    sync(device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    info = {"shape": "llama3-70b" if device.type == "cuda" else "tiny", "layers": cfg["num_hidden_layers"],
            "build_s": round(time.perf_counter() - t0, 1), "rank_weight_gb": round(weights / 1e9, 2), "points": []}
    if device.type == "cuda":
        bw = copy_rate(device)
        info["copy_tb_s"] = round(bw / 1e12, 2)
        info["floor_ms"] = round(1000 * weights / bw, 2)
    with TensorParallel(model):
        for n in lengths:
            for label, snap in (("snapkv2048", SnapKVConfig(budget=2048, window=32)), ("full", None)):
                if time.perf_counter() > deadline:
                    info["points"].append({"n": n, "cache": label, "skipped": "time budget"})
                    continue
                point = {"n": n, "cache": label}
                ids = torch.randint(4, config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    torch.cuda.empty_cache()
                engine = Engine(model, snap, prefill_chunk=8192)
                try:
                    sync(device)
                    t = time.perf_counter()
                    with torch.inference_mode():
                        cache, logits, stats = engine.prefill(ids, max_new_tokens=steps + 8)
                        first = logits.argmax(-1)
                        sync(device)
                        point["ttft_s"] = round(time.perf_counter() - t, 2)
                        runner = engine.runner(cache)
                        runner.feed(first)
                        runner.capture()
                        times = []
                        for _ in range(steps):
                            sync(device)
                            s = time.perf_counter()
                            runner.step()
                            sync(device)
                            times.append(1000 * (time.perf_counter() - s))
                    point["decode_ms"] = round(statistics.median(times[2:] or times), 3)
                    point["kept_per_layer"] = max(stats.kept[0]) if stats.kept else None
                    if device.type == "cuda":
                        point["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
                        if info.get("floor_ms"):
                            point["vs_floor"] = round(point["decode_ms"] / info["floor_ms"], 3)
                    del cache, runner, logits
                except NotEnoughMemoryError as err:
                    point["refused"] = str(err)[:200]
                except torch.OutOfMemoryError as err:
                    point["oom"] = str(err).splitlines()[0][:200]
                del engine
                peaks = [None] * world
                dist.all_gather_object(peaks, point.get("peak_gib"))
                point["peak_gib_per_gpu"] = peaks
                log(json.dumps(point))
                info["points"].append(point)
    return info


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/tp")
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU with tiny shapes (smoke test)")
    parser.add_argument("--stages", nargs="+", default=["check", "hf_tp_plan", "bench"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[131072, 262144])
    parser.add_argument("--layers", type=int, default=None, help="override the 70B shape's depth")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--time-budget", type=float, default=480.0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    dist.init_process_group("gloo" if args.cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.cpu:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        device, dtype = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))), torch.bfloat16
        torch.cuda.set_device(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"world": world, "torch": torch.__version__}
    if device.type == "cuda":
        result["device"] = torch.cuda.get_device_name(device)
    import transformers

    result["transformers"] = transformers.__version__
    if "check" in args.stages:
        result["check"] = stage_check(device, rank, world, dtype, 3000 if device.type == "cuda" else 120)
        log("check", json.dumps(result["check"]))
    if "hf_tp_plan" in args.stages and device.type == "cuda":
        result["hf_tp_plan"] = stage_hf_tp_plan(device, rank, world, dtype, out)
        log("hf_tp_plan", json.dumps(result["hf_tp_plan"]))
    if "bench" in args.stages:
        lengths = args.lengths if device.type == "cuda" else [300]
        result["bench"] = stage_bench(device, rank, world, dtype, lengths, args.steps, t0 + args.time_budget,
                                      args.layers)
    if rank == 0:
        (out / "tp.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
