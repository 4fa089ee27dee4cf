"""``snapkv bench``: run a sweep, print one line per point, write JSON, markdown and a plot.

The CLI wires ``snapkv bench`` to :func:`add_arguments` and :func:`run`; ``python -m
snapkv.bench.runner`` does the same on its own.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from snapkv.bench import report
from snapkv.bench.measure import MODES, Result, measure
from snapkv.bench.models import load_bench_model
from snapkv.bench.sweeps import Sweep, gpu_points, grid, preset, split_parts

GiB = 1024**3


def _length(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1024, "M": 1024 * 1024}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 4096, 16K, 1M)") from None


def _list(kind: Any):
    def parse(text: str) -> list:
        return [kind(t) for t in text.split(",") if t.strip()]

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``snapkv bench``'s options to ``parser``."""
    parser.add_argument("--preset", choices=("gpu", "cpu", "quick"), default=None,
                        help="sweep preset (default: gpu when CUDA is available, else cpu)")
    parser.add_argument("--model", default=None, help="random shape (llama3-8b, tiny-llama, ...) or offline model")
    parser.add_argument("--model-layers", type=int, default=None, help="override the model's depth")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--lengths", type=_list(_length), default=None, help="prompt lengths, e.g. 4K,16K,1M")
    parser.add_argument("--batches", type=_list(int), default=None, help="batch sizes, e.g. 1,8")
    parser.add_argument("--budgets", type=_list(int), default=None, help="SnapKV budgets, e.g. 1024,2048,4096")
    parser.add_argument("--modes", type=_list(str), default=None, help=f"subset of {','.join(MODES)}")
    parser.add_argument("--max-length", type=_length, default=None, help="gpu preset: longest prompt")
    parser.add_argument("--hf-max-tokens", type=_length, default=None, help="skip hf above this many batch tokens")
    parser.add_argument("--part", type=int, choices=(1, 2), default=None,
                        help="gpu preset: part 1 (batch 1 to 128K, 8 x 128K) or part 2 (the rest)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="merge these bench.json files into one report under --out (no model is run)")
    parser.add_argument("--partial-layers", type=int, default=4,
                        help="layers the 1M prefill runs through (of the full-weight model); 0: all")
    parser.add_argument("--whole-layer-gib", type=float, default=None,
                        help="prefill attends over a whole layer at once when its queries and output fit "
                             "in this many GiB (default 4 on CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps per point")
    parser.add_argument("--warmup", type=int, default=None, help="decode steps discarded before timing")
    parser.add_argument("--prefill-chunk", type=int, default=None, help="prefill rows per chunk")
    parser.add_argument("--window", type=int, default=None, help="SnapKV observation window")
    parser.add_argument("--attention-backend", default=None, help="prefill attention: flash, cudnn or ref")
    parser.add_argument("--no-graph", action="store_true", help="decode eagerly (no CUDA graph)")
    parser.add_argument("--no-fused", action="store_true", help="decode without the fused Triton kernels")
    parser.add_argument("--no-warmup", action="store_true",
                        help="measure cold (no discarded warm-up run; CPU runs never warm up)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; points left when it runs out are reported as skipped")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/bench-<time>)")


def _sweep(args: argparse.Namespace, device: torch.device) -> Sweep:
    name = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    sweep = preset(name)
    if name == "gpu" and args.max_length:
        sweep.points = gpu_points(args.max_length, args.partial_layers)
    elif name == "gpu":
        sweep.points = gpu_points(partial_layers_1m=args.partial_layers)
    if name == "gpu":
        sweep.points = split_parts(sweep.points, args.part)
    if args.lengths or args.batches or args.budgets or args.modes:
        base = sweep.points
        sweep.points = grid(
            args.lengths or sorted({p.length for p in base}),
            args.batches or sorted({p.batch for p in base}),
            args.budgets or sorted({p.budget for p in base if p.budget}) or [2048],
            args.modes or MODES,
            hf_max_tokens=args.hf_max_tokens,
            partial_layers={n: args.partial_layers for n in (args.lengths or [])
                            if n >= 1024 * 1024 and args.partial_layers},
        )
    elif args.hf_max_tokens:
        sweep.points = [p for p in sweep.points if p.mode != "hf" or p.length * p.batch <= args.hf_max_tokens]
    o = sweep.options
    for attr, val in (("steps", args.steps), ("warmup", args.warmup), ("prefill_chunk", args.prefill_chunk),
                      ("window", args.window), ("backend", args.attention_backend)):
        if val is not None:
            setattr(o, attr, val)
    if args.no_graph:
        o.use_graph = False
    if args.no_fused:
        o.fused = False
    if args.whole_layer_gib is not None:
        o.whole_layer_bytes = int(args.whole_layer_gib * GiB)
    if args.model:
        sweep.model = args.model
    if args.model_layers:
        sweep.model_layers = args.model_layers
    return sweep


def copy_bandwidth(device: torch.device, gib: float = 2.0) -> float | None:
    """Device-to-device copy rate, bytes/s (bytes read plus written), median of 5; None off CUDA."""
    if device.type != "cuda":
        return None
    n = int(gib * GiB) // 2
    src = torch.randn(n // 2, device=device, dtype=torch.bfloat16).repeat(2)
    dst = torch.empty_like(src)
    times = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize(device)
        times.append(a.elapsed_time(b) / 1000.0)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / sorted(times[2:])[len(times[2:]) // 2]


def linear_floor_ms(model: torch.nn.Module, batch: int = 1, reps: int = 20) -> float | None:
    """Milliseconds to run every ``nn.Linear`` of the model once on ``batch`` rows, replayed as one
    CUDA graph: what reading the weights costs through cuBLAS, without anything else of a step."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return None
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    dtype = linears[0].weight.dtype
    with torch.inference_mode():
        inputs = [torch.randn(batch, m.in_features, device=device, dtype=dtype) for m in linears]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for m, x in zip(linears, inputs, strict=True):
                m(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for m, x in zip(linears, inputs, strict=True):
                m(x)
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
    del graph, inputs
    torch.cuda.empty_cache()
    return sorted(times)[len(times) // 2]


def warm_up(model: torch.nn.Module, sweep: Sweep) -> float:
    """Run each mode once on a short prompt and the scoring kernel at each swept length (discarded):
    one-time compilation (Triton JIT, cuBLAS/cuDNN handles) stays out of the measured points."""
    from snapkv.bench.measure import Point

    t0 = time.perf_counter()
    device = next(model.parameters()).device
    opts = sweep.options
    short = min(4096, min(p.length for p in sweep.points))
    for mode in sorted({p.mode for p in sweep.points}):
        budget = min((p.budget for p in sweep.points if p.budget), default=None) if mode == "snapkv" else None
        measure(model, Point(mode, short, 1, budget), opts)
    if device.type == "cuda" and any(p.mode == "snapkv" for p in sweep.points):
        from snapkv.kernels.dispatch import reduced_window_votes

        cfg = model.config.get_text_config(decoder=True)
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = next(model.parameters()).dtype
        with torch.inference_mode():
            q = torch.randn(1, cfg.num_attention_heads, opts.window, d, device=device, dtype=dtype)
            for n in sorted({p.length for p in sweep.points if p.mode == "snapkv"}):
                k = torch.randn(1, cfg.num_key_value_heads, n, d, device=device, dtype=dtype)
                reduced_window_votes(q, k, None, scaling=d**-0.5)
                del k
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return time.perf_counter() - t0


def command_line(argv: list[str]) -> str:
    """The command as typed: ``snapkv bench ...`` from the CLI (whose argv holds ``bench``) or the module."""
    rest = argv[1:]
    if rest[:1] == ["bench"]:  # `snapkv bench ...`: the subcommand is already in argv
        rest = rest[1:]
    return " ".join(["snapkv", "bench", *rest])


def environment(device: torch.device, model: torch.nn.Module, description: str) -> dict[str, Any]:
    """Device, versions, date and the model for the report."""
    import transformers

    meta: dict[str, Any] = {
        "model": description,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(sys.argv),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["device"] = f"{props.name}, {props.total_memory / GiB:.1f} GiB, {props.multi_processor_count} SMs"
        meta["capacity_gib"] = props.total_memory / GiB
        meta["cuda"] = torch.version.cuda
        bw = copy_bandwidth(device)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        if bw:
            meta["copy_tb_s"] = bw / 1e12
            meta["floor_ms"] = 1000.0 * weights / bw
            meta["floor_note"] = f"{weights / 1e9:.2f} GB of weights at the measured copy rate {bw / 1e12:.2f} TB/s"
        meta["linear_floor_ms"] = linear_floor_ms(model)
        meta["linear_floor_b8_ms"] = linear_floor_ms(model, batch=8)
    else:
        meta["device"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return meta


def _line(r: Result) -> str:
    dec = "-" if r.decode_ms is None else f"{r.decode_ms:.2f}"
    ttft = "-" if r.ttft_s is None else f"{r.ttft_s:.2f}"
    peak = "-" if r.peak_gib is None else f"{r.peak_gib:.1f}"
    extra = f"  {r.message[:140]}" if r.status != "ok" else ""
    return (f"{r.label:>12} b={r.batch} n={r.length:>8}  {r.status:>7}  ttft {ttft:>7} s  decode {dec:>7} ms  "
            f"peak {peak:>5} GiB  ({r.wall_s:.1f} s){extra}")


def run(args: argparse.Namespace) -> int:
    """Run the sweep ``args`` describe; returns the exit status (0 when every point ran or OOMed)."""
    if args.merge:
        out_dir = args.out or Path("runs") / "bench-merged"
        paths = report.merge_files(args.merge, out_dir)
        print(paths["md"].read_text())
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    sweep = _sweep(args, device)
    out_dir = args.out or Path("runs") / f"bench-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    t_start = time.perf_counter()
    model, description = load_bench_model(sweep.model, device=device, num_layers=sweep.model_layers)
    meta = environment(device, model, description)
    meta["preset"] = sweep.name
    meta["options"] = vars(sweep.options)
    print(f"# {meta['device']} | {description} | torch {meta['torch']} | transformers {meta['transformers']}",
          flush=True)
    if not args.no_warmup and device.type == "cuda":
        meta["warmup_s"] = warm_up(model, sweep)
        print(f"# warm-up (discarded): {meta['warmup_s']:.1f} s", flush=True)
    results: list[dict[str, Any]] = []
    errors = 0
    for point in sweep.points:
        if args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
            res = Result(point.mode, point.label, point.length, point.batch, point.budget, status="skipped",
                         message="time budget of the run used up")
        else:
            try:
                res = measure(model, point, sweep.options)
            except Exception as err:  # a broken point must not lose the rest of the sweep
                errors += 1
                res = Result(point.mode, point.label, point.length, point.batch, point.budget, status="error",
                             message=f"{type(err).__name__}: {err}")
            print(_line(res), flush=True)
        results.append(res.to_dict())
        report.write(out_dir, meta, results, with_plot=False)  # keep what was measured if the run is cut short
    paths = report.write(out_dir, meta, results)
    print()
    print(paths["md"].read_text())
    print("written:", ", ".join(str(p) for p in paths.values()))
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m snapkv.bench.runner``."""
    parser = argparse.ArgumentParser(prog="snapkv bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
