"""Accuracy of document-cache reuse (context-only, probe-scored) against query-aware compression.

Passkey prompts (``snapkv.demo``) through the serve scheduler in-process: the same prompt is
answered with the full cache, with query-aware SnapKV (the question inside the window) and from
the document cache (the context compressed alone with the probe, the question fed after it).

Example (CPU, SmolLM2, a few minutes)::

    python scripts/serve_doc_accuracy.py --samples 8 --length 1500 --budgets 128 256
"""

from __future__ import annotations

import argparse
import json
import random
import threading

from snapkv.config import SnapKVConfig
from snapkv.demo import QUESTION, passkey_context
from snapkv.models import load_model
from snapkv.serve.backend import PrefillJob
from snapkv.serve.batcher import EngineBackend
from snapkv.serve.doc_cache import DocCache
from snapkv.serve.sampling import SamplingParams
from snapkv.serve.scheduler import Request, Scheduler
from snapkv.serve.server import eos_ids, probe_ids


def _ask(sched: Scheduler, tok, eos: list[int], ids: list[int], config: SnapKVConfig,
         context: int) -> tuple[str, float]:
    done, out = threading.Event(), {}

    def sink(kind, payload):
        if kind in ("done", "error"):
            out["r"] = payload
            done.set()

    params = SamplingParams(max_tokens=8, temperature=0.0, eos_ids=eos)
    sched.submit(Request(PrefillJob(ids, config, context), params, sink, tokenizer=tok))
    done.wait(600)
    r = out["r"]
    return (r.text, r.ttft_s) if hasattr(r, "text") else (f"error {r}", 0.0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--length", type=int, default=1500)
    p.add_argument("--budgets", type=int, nargs="+", default=[128, 256])
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    model, tok = load_model(a.model)
    rng = random.Random(a.seed)
    backend = EngineBackend(model, rows=2, slot_tokens=a.length + 64, doc_cache=DocCache(1 << 30),
                            probe=probe_ids(tok))
    sched = Scheduler(backend)
    sched.start()
    eos = eos_ids(model, tok)
    score: dict[str, int] = {}
    ttfts: dict[str, list[float]] = {}
    try:
        for i in range(a.samples):
            key = rng.randrange(10000, 100000)
            ctx = passkey_context(tok, a.length, (i + 0.5) / a.samples, key)
            prompt = ctx + "\n\n" + QUESTION
            enc = tok(prompt, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            n_ctx = next(j for j, (_, end) in enumerate(enc["offset_mapping"]) if end > len(ctx))
            runs = {"full": (SnapKVConfig(budget=1.0, window=a.window), 0)}
            for b in a.budgets:
                runs[f"query_aware_{b}"] = (SnapKVConfig(budget=b, window=a.window), 0)
                runs[f"doc_cache_{b}"] = (SnapKVConfig(budget=b, window=a.window), n_ctx)
            ttft = {}
            for name, (cfg, context) in runs.items():
                text, ttft[name] = _ask(sched, tok, eos, ids, cfg, context)
                score[name] = score.get(name, 0) + (str(key) in text)
            b = a.budgets[-1]  # the same document again: a document-cache hit
            text, ttft["doc_cache_hit"] = _ask(sched, tok, eos, ids, SnapKVConfig(budget=b, window=a.window), n_ctx)
            score["doc_cache_hit"] = score.get("doc_cache_hit", 0) + (str(key) in text)
            for name, t in ttft.items():
                ttfts.setdefault(name, []).append(t)
            print(json.dumps({"sample": i, "tokens": len(ids), **score,
                              "ttft_s": {k: round(v, 3) for k, v in ttft.items()}}), flush=True)
    finally:
        sched.stop()
    median = {k: sorted(v)[len(v) // 2] for k, v in ttfts.items()}
    print(json.dumps({"model": a.model, "length": a.length, "samples": a.samples, "correct": score,
                      "median_ttft_s": median}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
