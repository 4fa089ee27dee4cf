"""Load test of the serve scheduler in-process (no HTTP): continuous batching of SnapKV vs full caches.

For each prompt length and cache (SnapKV budget, and the full cache as baseline) and each
concurrency N, N requests of random token ids arrive at once. Prefills run one at a time in
the prefill worker while the rows already prefilled keep decoding, so:

* TTFT p50/p99 is measured under that load (queueing behind other prefills included);
* inter-token latency (ITL) p50/p99 "while requests arrive" covers the rows' tokens emitted
  while later requests were still prefilling; "steady" ITL and decode tokens/s are measured
  over ``--steady-steps`` steps once every request has its first token;
* peak memory is ``torch.cuda.max_memory_allocated``.

``--fill-from-document`` lengths fill the rows from one document (one prefill, then document
cache hits with distinct question suffixes): the decode work per row is the same as for
distinct documents (the compressed cache has the same size), the N prefills are not repeated.
The repeated-document TTFT is a miss then a hit of the same document, each alone.

Example (one H200, about 8 minutes)::

    python scripts/bench_serve.py --model llama3-8b --device cuda --out results/serve
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from snapkv.bench.models import load_bench_model
from snapkv.config import SnapKVConfig
from snapkv.generation.adapter import DecoderParts
from snapkv.generation.memory import MARGIN_BYTES, available_bytes, cache_bytes, plan
from snapkv.serve.backend import PrefillJob
from snapkv.serve.batcher import EngineBackend
from snapkv.serve.doc_cache import DocCache
from snapkv.serve.sampling import SamplingParams
from snapkv.serve.scheduler import Request, Scheduler


def _probe(vocab: int) -> list[int]:
    """24 probe question ids (random weights: any ids do the same work)."""
    return [(1000 + i) % vocab for i in range(24)]


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


class _Sink:
    def __init__(self) -> None:
        self.times: list[float] = []
        self.done = threading.Event()
        self.error: Any = None

    def __call__(self, kind: str, payload: Any) -> None:
        if kind == "token":
            self.times.append(time.perf_counter())
        elif kind == "done":
            self.done.set()
        elif kind == "error":
            self.error = payload
            self.done.set()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fit_rows(parts: DecoderParts, slot: int, length: int, chunk: int, wb: int, reserve: int) -> int:
    """Rows of ``slot`` tokens that fit beside one prefill of ``length`` and ``reserve`` bytes."""
    free = available_bytes(parts.device)
    if free is None:
        return 1 << 30
    work = plan(parts, [length], length, chunk, wb).prefill_work_bytes
    left = free - work - reserve - 2 * MARGIN_BYTES
    return max(0, int(left // (cache_bytes(parts, 1, slot) * 1.02)))


def run_config(model: Any, a: argparse.Namespace, length: int, budget: int | None, counts: list[int],
               fill: bool, deadline: float) -> list[dict[str, Any]]:
    """Every concurrency of one (length, cache) pair on one backend."""
    parts = DecoderParts.from_model(model)
    device = parts.device
    config = SnapKVConfig(budget=budget, window=a.window) if budget else SnapKVConfig(budget=1.0, window=a.window)
    kept = min(budget, length) if budget else length
    slot = kept + (a.fill_max_tokens + 16 if fill else a.max_tokens)
    wb = 4 * 1024**3 if device.type == "cuda" else 0
    doc_bytes = 2 * parts.num_layers * parts.num_kv_heads * parts.head_dim * kept * 2 * 2 if fill else 0
    fit = _fit_rows(parts, slot, length, a.prefill_chunk, wb, doc_bytes)
    rows = min(max(counts), fit)
    out: list[dict[str, Any]] = []
    label = f"snapkv-{budget}" if budget else "full"
    if rows < 1:
        return [{"length": length, "cache": label, "n": counts[0], "fits": False, "rows_that_fit": fit}]
    backend = EngineBackend(model, rows=rows, slot_tokens=slot, doc_cache=DocCache(doc_bytes),
                            probe=_probe(parts.vocab_size), prefill_chunk=a.prefill_chunk)
    sched = Scheduler(backend, max_queue=max(counts) + 1)
    sched.start()
    g = torch.Generator().manual_seed(length)
    doc = torch.randint(0, parts.vocab_size, (length,), generator=g).tolist()
    if rows < max(counts) and rows not in counts:  # also the largest concurrency that fits
        counts = sorted({c for c in counts if c < rows} | {rows} | {c for c in counts if c > rows})
    try:
        for n in counts:
            if n > rows:
                out.append({"length": length, "cache": label, "n": n, "fits": False, "rows_that_fit": fit})
                break
            if time.monotonic() > deadline:
                out.append({"length": length, "cache": label, "n": n, "skipped": "time budget"})
                break
            out.append(_one(sched, backend, doc, config, n, kept, slot, fill, a, label, length, g))
            print(json.dumps(out[-1]), flush=True)
    finally:
        sched.stop()
        del sched, backend
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _one(sched: Scheduler, backend: EngineBackend, doc: list[int], config: SnapKVConfig, n: int, kept: int,
         slot: int, fill: bool, a: argparse.Namespace, label: str, length: int, g: torch.Generator) -> dict:
    device = backend.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sinks, reqs = [], []
    t0 = time.perf_counter()
    for _ in range(n):
        if fill:
            suffix = torch.randint(0, backend.parts.vocab_size, (16,), generator=g).tolist()
            job = PrefillJob(doc + suffix, config, context_tokens=length)
        else:
            ids = torch.randint(0, backend.parts.vocab_size, (length,), generator=g).tolist()
            job = PrefillJob(ids, config)
        room = slot - backend.row_slots(len(job.ids), config, job.context_tokens)
        sink = _Sink()
        req = Request(job, SamplingParams(max_tokens=room, temperature=0.0), sink)
        sinks.append(sink)
        reqs.append(req)
        sched.submit(req)
    while not all(s.times or s.done.is_set() for s in sinks):
        time.sleep(0.005)
    t_all = time.perf_counter()
    steps0 = sched.steps
    tokens0 = sum(len(s.times) for s in sinks)
    live = [kept + len(s.times) for s in sinks if not s.done.is_set()]  # cache tokens per row now
    while sched.steps - steps0 < a.steady_steps and not all(s.done.is_set() for s in sinks):
        time.sleep(0.005)
    t_end = time.perf_counter()
    tokens1 = sum(len(s.times) for s in sinks)
    active = sum(1 for s in sinks if not s.done.is_set())
    for r in reqs:
        sched.cancel(r)
    for s in sinks:
        s.done.wait(60)
    errors = [s.error for s in sinks if s.error]
    ttft = [s.times[0] - t0 for s in sinks if s.times]
    itl_arrival, itl_steady = [], []
    for s in sinks:
        for x, y in zip(s.times, s.times[1:], strict=False):
            (itl_arrival if y <= t_all else itl_steady if y <= t_end else []).append(y - x)
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    while sched.stats()["busy_rows"]:
        time.sleep(0.01)
    return {
        "length": length, "cache": label, "n": n, "fits": True, "filled_from_document": fill,
        "kept_tokens": kept, "slot_tokens": slot, "rows_allocated": backend.rows,
        "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
        "itl_while_arriving_p50_ms": _ms(_pct(itl_arrival, 50)),
        "itl_while_arriving_p99_ms": _ms(_pct(itl_arrival, 99)),
        "itl_steady_p50_ms": _ms(_pct(itl_steady, 50)), "itl_steady_p99_ms": _ms(_pct(itl_steady, 99)),
        "decode_tokens_per_s": (tokens1 - tokens0) / (t_end - t_all) if t_end > t_all else None,
        "rows_decoding_in_steady_phase": active, "mean_cache_tokens_per_row_at_steady_start":
            sum(live) / len(live) if live else None, "peak_gib": peak, "errors": errors,
    }


def _ms(x: float | None) -> float | None:
    return None if x is None else 1000 * x


def repeated_document(model: Any, a: argparse.Namespace, length: int, budget: int) -> dict[str, Any]:
    """TTFT of a new document (miss: context-only compression with the probe) and of the same one again (hit)."""
    parts = DecoderParts.from_model(model)
    kept = min(budget, length)
    doc_bytes = 2 * parts.num_layers * parts.num_kv_heads * parts.head_dim * kept * 2 * 2
    backend = EngineBackend(model, rows=1, slot_tokens=kept + 64 + a.max_tokens, doc_cache=DocCache(doc_bytes),
                            probe=_probe(parts.vocab_size), prefill_chunk=a.prefill_chunk)
    sched = Scheduler(backend, max_queue=2)
    sched.start()
    g = torch.Generator().manual_seed(7 + length)
    doc = torch.randint(0, parts.vocab_size, (length,), generator=g).tolist()
    config = SnapKVConfig(budget=budget, window=a.window)
    out: dict[str, Any] = {"length": length, "budget": budget}
    try:
        for name in ("new_document", "repeated_document"):
            sink = _Sink()
            q = torch.randint(0, parts.vocab_size, (32,), generator=g).tolist()
            t0 = time.perf_counter()
            sched.submit(Request(PrefillJob(doc + q, config, context_tokens=length), SamplingParams(max_tokens=2,
                                 temperature=0.0), sink))
            sink.done.wait(600)
            out[f"{name}_ttft_s"] = sink.times[0] - t0 if sink.times else None
            if sink.error:
                out[f"{name}_error"] = sink.error
        if out.get("new_document_ttft_s") and out.get("repeated_document_ttft_s"):
            out["repeated_over_new"] = out["repeated_document_ttft_s"] / out["new_document_ttft_s"]
    finally:
        sched.stop()
        del sched, backend
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(json.dumps(out), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b", help="a shape of snapkv.bench.models (random weights) or a model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-layers", type=int, help="override the depth (smoke runs)")
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--fill-from-document", type=int, nargs="*", default=[131072],
                   help="lengths whose rows are filled from one document (document-cache hits)")
    p.add_argument("--counts", type=int, nargs="+", default=[1, 8, 16, 32],
                   help="concurrencies with distinct prompts (each one prefilled)")
    p.add_argument("--fill-counts", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256],
                   help="concurrencies of the lengths filled from one document")
    p.add_argument("--full-counts", type=int, nargs="+", default=[1, 8, 16],
                   help="concurrencies of the full-cache baseline (distinct prefills)")
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=4096,
                   help="slot room for generated tokens per row (covers the arrival phase of distinct prefills)")
    p.add_argument("--fill-max-tokens", type=int, default=512, help="the same for rows filled from a document")
    p.add_argument("--full-fill", action="store_true",
                   help="fill the full-cache rows from the document too (its --fill-counts): both caches then start "
                        "their decode phase together, with every row at its kept prompt, for a like-for-like decode "
                        "throughput")
    p.add_argument("--steady-steps", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=8192)
    p.add_argument("--time-budget-s", type=float, default=540.0, help="skip what is left after this long")
    p.add_argument("--out", default="results/serve")
    a = p.parse_args(argv)
    start = time.monotonic()
    deadline = start + a.time_budget_s
    model, desc = load_bench_model(a.model, device=a.device, num_layers=a.num_layers)
    results: dict[str, Any] = {"model": desc, "device": str(a.device), "args": vars(a), "runs": [], "repeated": []}
    if torch.cuda.is_available() and a.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        results["elapsed_s"] = time.monotonic() - start
        (out_dir / "bench_serve.json").write_text(json.dumps(results, indent=2))

    for length in a.lengths:
        fill = length in (a.fill_from_document or [])
        results["runs"] += run_config(model, a, length, a.budget, a.fill_counts if fill else a.counts, fill,
                                      deadline)
        save()
        if time.monotonic() < deadline:
            results["repeated"].append(repeated_document(model, a, length, a.budget))
            save()
        full_fill = fill and a.full_fill
        results["runs"] += run_config(model, a, length, None, a.fill_counts if full_fill else a.full_counts,
                                      full_fill, deadline)
        save()
    print(f"wrote {out_dir / 'bench_serve.json'} in {time.monotonic() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
