"""Gemma 3 on the engine (the model's own layers) against the transformers path (issue 11, item 6).

A Gemma-3-4B text shape with random bf16 weights (34 layers, hidden 2560, 8 query / 4 KV heads of
256, MLP 10240, sliding window 1024 on 5 of every 6 layers, local RoPE base 1e4, global 1e6 with
linear factor 8, vocabulary 262208, tied embeddings). Per prompt length:

* ``hf``: transformers' own loop, full ``DynamicCache`` (sliding layers keep their window);
* ``hf+snapkv``: what ``model.generate`` users get: a :class:`SnapKVSession` (budget, window 32,
  kernel 7, max pooling), then one ``model(...)`` call per token over the compressed cache;
* ``engine``: :class:`~snapkv.generation.Engine` with the same settings (own layers, static
  cache, CUDA-graph decode).

TTFT, decode ms/token (median of CUDA-event-timed steps after a discarded warm-up) and peak GiB.
Before timing, a correctness check at 2K tokens: the engine's first logits against the model's
own forward, and the captured decode step against the eager one.

    python scripts/bench_gemma.py --out runs/gemma            # 32K and 128K on one H200
    python scripts/bench_gemma.py --modes engine+compile --no-check --out runs/gemma-compile   # compiled step
    python scripts/bench_gemma.py --tiny --device cpu --lengths 300 --steps 3   # smoke test
    python scripts/bench_gemma.py --modes engine,hf --lengths 32768 --attn-bench --profile --out runs/g

``--attn-bench``: the sliding layers' prefill attention of one 8192-query chunk at the end of a
32K prompt (this shape's heads, window 1024), by query blocks (``window_attention``, what the
engine runs) and as one masked call (``window_attention_ref``, before 2026-12-01): median ms of
CUDA-event-timed calls on random bf16 inputs, each against a float32 reference.
``--profile``: one more engine prefill at the first length under ``torch.profiler``, the kernels
with the most CUDA time in ``profile.txt``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from snapkv import SnapKVConfig, SnapKVSession
from snapkv.bench.measure import Options, Point, _peak, _reset, _reset_peak, _sync, measure, time_steps
from snapkv.generation import Engine
from snapkv.integration.hf import cache_argument

GIB = 1024**3


def gemma3_model(device: str, tiny: bool, layers: int | None) -> torch.nn.Module:
    """Gemma-3-4B text shape (or a tiny one) with random weights."""
    import transformers as tf

    shape = dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                 sliding_window=1024, max_position_embeddings=131072 + 4096)
    if tiny:
        shape.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                     sliding_window=64)
    if layers is not None:
        shape["num_hidden_layers"] = layers
    n = shape["num_hidden_layers"]
    config = tf.Gemma3TextConfig(
        **shape,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        tie_word_embeddings=True,
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.Gemma3ForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


def check(model: torch.nn.Module, config: SnapKVConfig, length: int) -> dict[str, float]:
    """Engine vs the model's own forward (first logits), and captured vs eager decode.

    Both the engine's and the model's own first logits are also compared with a float32 copy of
    the model (``*_vs_fp32``): in bf16 the two differ by their rounding (summation order), and
    neither is the exact one.
    """
    device = next(model.parameters()).device
    ids = torch.randint(4, 500, (1, length), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        ref = model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
        exact = copy.deepcopy(model).float()
        ref32 = exact(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
        del exact
        out = {"hf_vs_fp32": float((ref - ref32).norm() / ref32.norm())}
        for graph in (False, True) if device.type == "cuda" else (False,):
            engine = Engine(model, config, use_graph=graph)
            cache, first, _ = engine.prefill(ids, max_new_tokens=8)
            out["prefill_rel_err"] = float((first.float() - ref).norm() / ref.norm())
            out["engine_vs_fp32"] = float((first.float() - ref32).norm() / ref32.norm())
            runner = engine.runner(cache)
            runner.feed(first.argmax(-1))
            for _ in range(3):
                runner.step()
            out[f"decode_logits_graph={graph}"] = runner.logits.float().clone()
        if device.type == "cuda":
            a, b = out.pop("decode_logits_graph=False"), out.pop("decode_logits_graph=True")
            out["graph_vs_eager_rel_err"] = float((a - b).norm() / a.norm())
        else:
            out.pop("decode_logits_graph=False")
    return out


def compiled_engine_point(engine: Engine, length: int, opts: Options) -> dict:
    """``engine+compile``: an engine after :meth:`OwnLayers.compile_decode` (compiled, then captured).

    One engine serves every length: same cache shapes (budget + steps), so it compiles once.
    """
    from snapkv.generation.own_run import decode_step

    parts = engine.parts
    device = parts.device
    ids = torch.randint(4, parts.vocab_size, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
    _reset(device)
    res: dict[str, Any] = {"mode": "engine+compile", "length": length, "budget": engine.config.budget,
                           "status": "ok"}
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        cache, logits, _ = engine.prefill(ids, max_new_tokens=opts.warmup + opts.steps + 2)
        first = logits.argmax(-1)
        _sync(device)
        res["ttft_s"] = time.perf_counter() - t0
        state = cache.state()
        body, parts.compiled_body = parts.compiled_body, None
        ref = decode_step(parts, cache, first).float()  # the eager step, then undone
        parts.compiled_body = body
        cache.rewind(state)
        runner = engine.runner(cache)
        runner.feed(first)
        t1 = time.perf_counter()
        runner.capture()  # the warm-up steps compile
        res["capture_s"] = time.perf_counter() - t1
        runner.step()
        res["compiled_vs_eager_rel_err"] = float((runner.logits.float() - ref).norm() / ref.norm())
        for _ in range(opts.warmup):
            runner.step()
        res["decode_ms"] = statistics.median(time_steps(runner.step, opts.steps, device))
    res["peak_gib"] = _peak(device)[0]
    return res


def session_point(model: torch.nn.Module, length: int, config: SnapKVConfig, steps: int, warmup: int,
                  warm_prefill: bool = False) -> dict:
    """``hf+snapkv``: prefill through a SnapKVSession, then one forward per token over its cache."""
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().out_features
    ids = torch.randint(4, vocab, (1, length), generator=torch.Generator().manual_seed(length)).to(device)
    _reset(device)
    res: dict[str, Any] = {"mode": "hf+snapkv", "length": length, "budget": config.budget, "status": "ok"}
    try:
        with torch.inference_mode(), SnapKVSession(model, config) as session:
            if warm_prefill:  # one untimed prefill first (see Options.warm_prefill)
                model(input_ids=ids, logits_to_keep=1, **session.cache_kwargs(session.new_cache()))
                _sync(device)
                _reset_peak(device)
            cache = session.new_cache()
            _sync(device)
            t0 = time.perf_counter()
            out = model(input_ids=ids, logits_to_keep=1, **session.cache_kwargs(cache))
            state = {"tok": out.logits[:, -1].argmax(-1)}
            _sync(device)
            res["ttft_s"] = time.perf_counter() - t0
            del out
            key = cache_argument(model)

            def step() -> None:
                o = model(input_ids=state["tok"][:, None], **{key: cache})
                state["tok"] = o.logits[:, -1].argmax(-1)

            for _ in range(warmup):
                step()
            times = time_steps(step, steps, device)
            res["decode_ms"] = statistics.median(times)
    except torch.OutOfMemoryError as err:
        res["status"], res["message"] = "oom", str(err).splitlines()[0][:300]
    res["peak_gib"] = _peak(device)[0]
    return res


def attention_bench(device: str, chunk: int = 8192, length: int = 32768, reps: int = 5) -> dict:
    """Block-windowed vs one masked call on the sliding layers' shape (see ``--attn-bench``)."""
    from snapkv.generation.own_attention import window_attention, window_attention_ref

    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, 8, chunk, 256, device=device, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 4, length, 256, device=device, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 4, length, 256, device=device, dtype=torch.bfloat16, generator=g)
    scale, window = 256**-0.5, 1024
    rows = slice(chunk - 512, chunk)  # the float32 reference on the chunk's last 512 queries
    ref = window_attention_ref(q[:, :, rows].float(), k[:, :, : length].float(), v.float(), scale, window)
    out: dict[str, Any] = {"chunk": chunk, "length": length, "window": window}
    for name, fn in (("blocks", window_attention), ("one_masked_call", window_attention_ref)):
        res = fn(q, k, v, scale, window)
        err = ((res[:, :, rows].float() - ref).norm() / ref.norm()).item()
        times = []
        for _ in range(reps + 1):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(q, k, v, scale, window)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        out[name] = {"median_ms": statistics.median(times[1:]), "rel_err_vs_fp32": err}
    out["speedup"] = out["one_masked_call"]["median_ms"] / out["blocks"]["median_ms"]
    return out


def profile_prefill(model: torch.nn.Module, config: SnapKVConfig, n: int, chunk: int, path: Path) -> None:
    """One engine prefill of ``n`` random tokens under torch.profiler; the top CUDA kernels to ``path``."""
    engine = Engine(model, config, prefill_chunk=chunk)
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=next(model.parameters()).device)
    engine.prefill(ids, max_new_tokens=1)  # warm
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine.prefill(ids, max_new_tokens=1)
        torch.cuda.synchronize()
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))


def run_point(model: torch.nn.Module, mode: str, n: int, config: SnapKVConfig, opts: Options,
              args: argparse.Namespace, compiled: Engine | None) -> dict:
    """One measurement (``engine+compile`` builds its engine on first use and hands it back)."""
    if mode == "engine":
        return {**measure(model, Point("snapkv", n, budget=args.budget), opts).to_dict(), "mode": "engine"}
    if mode == "hf":
        return measure(model, Point("hf", n), opts).to_dict()
    if mode == "hf+snapkv":
        return session_point(model, n, config, args.steps, args.warmup, args.warm_prefill)
    engine = compiled
    if engine is None:
        engine = Engine(model, config, prefill_chunk=opts.prefill_chunk)
        engine.parts.compile_decode()
    return {**compiled_engine_point(engine, n, opts), "engine": engine}


def main() -> None:
    """Parse arguments, check, measure, write JSON and a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny Gemma 3 shape (CPU smoke test)")
    p.add_argument("--layers", type=int, default=None, help="override the depth")
    p.add_argument("--lengths", default="32768,131072", help="prompt lengths, comma-separated")
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--modes", default="engine,hf,hf+snapkv", help="of engine, hf, hf+snapkv, engine+compile")
    p.add_argument("--no-check", action="store_true", help="skip the 2K correctness check")
    p.add_argument("--check-length", type=int, default=2048)
    p.add_argument("--out", type=Path, default=Path("runs/gemma"))
    p.add_argument("--prefill-chunk", type=int, default=8192)
    p.add_argument("--attn-bench", action="store_true", help="time the sliding layers' prefill attention")
    p.add_argument("--profile", action="store_true", help="profile one engine prefill at the first length")
    p.add_argument("--warm-prefill", action="store_true",
                   help="time TTFT on a second prefill of the prompt (every path; the first is untimed)")
    args = p.parse_args()
    if (args.attn_bench or args.profile) and args.device != "cuda":
        p.error("--attn-bench and --profile time CUDA kernels: they need --device cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    lengths = [int(x) for x in args.lengths.split(",")]
    modes = args.modes.split(",")
    t0 = time.perf_counter()
    model = gemma3_model(args.device, args.tiny, args.layers)
    config = SnapKVConfig(budget=min(args.budget, args.check_length // 2), window=32, kernel=7, pooling="max")
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                              "torch": torch.__version__, "transformers": __import__("transformers").__version__,
                              "shape": "gemma3-4b text (random bf16)" if not args.tiny else "tiny gemma3",
                              "warm_prefill": args.warm_prefill,
                              "layers": model.config.num_hidden_layers, "rows": []}
    if not args.no_check:
        try:
            report["check"] = check(model, config, args.check_length)
        except Exception as err:  # recorded; the measurements still run
            traceback.print_exc()
            report["check"] = {"status": "error", "message": f"{type(err).__name__}: {err}"[:500]}
        print("check", report["check"], flush=True)
    if args.attn_bench:
        report["window_attention"] = attention_bench(args.device)
        print("window_attention", report["window_attention"], flush=True)
    config = SnapKVConfig(budget=args.budget, window=32, kernel=7, pooling="max")
    opts = Options(steps=args.steps, warmup=args.warmup, prefill_chunk=args.prefill_chunk, window=32, kernel=7,
                   pooling="max", warm_prefill=args.warm_prefill)
    compiled = None
    for n in lengths:
        for mode in modes:
            if mode not in ("engine", "hf", "engine+compile", "hf+snapkv"):
                raise ValueError(f"unknown mode {mode!r}")
            try:
                row = run_point(model, mode, n, config, opts, args, compiled)
            except Exception as err:  # recorded in the report, and the other points still run
                traceback.print_exc()
                row = {"mode": mode, "length": n, "status": "error", "message": f"{type(err).__name__}: {err}"[:500]}
                _reset(next(model.parameters()).device)
            if mode == "engine+compile" and compiled is None:
                compiled = row.pop("engine", None)
            row = {k: row.get(k) for k in ("mode", "length", "budget", "status", "message", "ttft_s", "decode_ms",
                                             "peak_gib", "phase_ms", "capture_s", "compiled_vs_eager_rel_err")}
            report["rows"].append(row)
            (args.out / "gemma.json").write_text(json.dumps(report, indent=1))  # kept if a later point is cut
            print(json.dumps(row), f"({time.perf_counter() - t0:.0f} s)", flush=True)
    lines = ["| prompt | path | TTFT s | decode ms/token | peak GiB | hf / this | hf+snapkv / this |",
             "|---|---|---|---|---|---|---|"]
    for n in lengths:
        rows = [r for r in report["rows"] if r["length"] == n]
        base = {r["mode"]: r["decode_ms"] for r in rows if r["mode"].startswith("hf") and r["decode_ms"]}
        for r in rows:
            ms = r["decode_ms"]
            ratios = [f"{base[m] / ms:.1f}x" if ms and m in base and r["mode"].startswith("engine") else ""
                      for m in ("hf", "hf+snapkv")]
            cells = [f.format(v) if v is not None else r["status"]
                     for v, f in ((r["ttft_s"], "{:.2f}"), (ms, "{:.2f}"), (r["peak_gib"], "{:.1f}"))]
            lines.append(f"| {n} | {r['mode']} | {' | '.join(cells + ratios)} |")
    table = "\n".join(lines)
    print(table)
    if args.profile:
        profile_prefill(model, config, lengths[0], args.prefill_chunk, args.out / "profile.txt")
    (args.out / "gemma.json").write_text(json.dumps(report, indent=1))
    (args.out / "gemma.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
