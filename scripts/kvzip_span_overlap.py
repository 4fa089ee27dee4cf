"""How close span-limited KVzip's selection is to exact KVzip's, on real eval prompts (CPU).

Per sample (``snapkv.eval.tasks.make_sample``; the context only, as the eval's ``context``
mode compresses it): one prefill of the context into a :class:`ReplayCache`, then the exact
replay (``KVzip(chunk)``) and one span-limited replay per ``--spans`` entry, all on the same
KV (rolled back after each). Both score sets select like ``derive()`` does (top ``budget`` per
layer and KV head, the last ``window`` context tokens always kept), and the script reports
the fraction of the exact selection the span-limited one shares:

* ``overlap``: ``|kept_span & kept_exact| / budget`` averaged over layers and KV heads
  (``min_layer``: the worst layer's mean over heads);
* ``overlap_beyond_window``: the same without the ``window`` positions both always keep;
* ``replay_s``: each replay's seconds (CPU, so only a relative figure).

``--ref-chunks`` adds exact replays with other chunk sizes (``chunk{N}``): how much two exact
KVzip settings agree, the scale against which the span-limited overlap can be read.

Example (SmolLM2, 4K, budget 1024; minutes on one busy core)::

    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 15 python scripts/kvzip_span_overlap.py --model smollm2 \\
        --tasks passkey,niah_single_1,niah_single_2 --length 4096 --budget 1024 --spans 512,1024 \\
        --samples 1 --out results/kvzip/span_overlap_smollm2_4k.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from snapkv.core.selection import select_topk
from snapkv.integration.hf import cache_argument
from snapkv.methods.kvzip import DEFAULT_REPLAY_PROMPT, ReplayCache, kvzip_scores, replay_inputs


def kept_sets(scores: list[torch.Tensor], budget: int, window: int) -> list[torch.Tensor]:
    """Per layer ``[Hkv, L]`` bool: the positions ``select_topk`` keeps (batch row 0)."""
    out = []
    for s in scores:
        length = s.shape[-1]
        idx = select_topk(s, torch.tensor([min(budget, length)]), window).indices[0]  # [Hkv, budget]
        mask = torch.zeros(s.shape[1], length, dtype=torch.bool)
        mask.scatter_(1, idx.long().cpu(), True)
        out.append(mask)
    return out


def overlap(span: list[torch.Tensor], exact: list[torch.Tensor], budget: int, window: int) -> dict[str, Any]:
    """Shared fraction of the exact selection, per layer and head, averaged (see the module docstring)."""
    per_layer, beyond = [], []
    for a, b in zip(span, exact, strict=True):
        both = (a & b).sum(-1).double()  # [Hkv]
        per_layer.append(float((both / budget).mean()))
        beyond.append(float(((both - window) / (budget - window)).mean()))
    return {"overlap": round(sum(per_layer) / len(per_layer), 4), "min_layer": round(min(per_layer), 4),
            "overlap_beyond_window": round(sum(beyond) / len(beyond), 4),
            "per_layer": [round(x, 3) for x in per_layer]}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tasks", default="passkey,niah_single_1,niah_single_2")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--spans", default="512,1024")
    parser.add_argument("--sink", type=int, default=32)
    parser.add_argument("--ref-chunks", default="", help="exact replays with these chunk sizes, as a reference")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from snapkv.eval.runner import codec_for, load
    from snapkv.eval.tasks import make_sample

    spans = [int(x) for x in args.spans.split(",") if x]
    ref_chunks = [int(x) for x in args.ref_chunks.split(",") if x]
    model, tok = load(args.model)
    codec = codec_for(tok)
    prompt = list(codec.encode(DEFAULT_REPLAY_PROMPT)) + list(codec.tail)  # as snapkv.eval.methods.fit_replay
    result: dict[str, Any] = {"model": args.model, "length": args.length, "budget": args.budget,
                              "window": args.window, "chunk": args.chunk, "sink": args.sink, "samples": []}
    for task in args.tasks.split(","):
        for index in range(args.samples):
            sample = make_sample(task, codec, args.length, index)
            ids = torch.tensor([list(sample.context_ids)])
            n = ids.shape[1]
            longest = max(len(x) for c in [args.chunk, *ref_chunks] for x in replay_inputs(range(n), prompt, c, 8))
            cache = ReplayCache(model.config, n + longest)
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
            row: dict[str, Any] = {"task": task, "index": index, "context_tokens": n,
                                   "prefill_s": round(time.perf_counter() - t0, 1)}
            t0 = time.perf_counter()
            exact = kvzip_scores(model, ids, prompt, chunk=args.chunk, cache=cache)
            row["exact_replay_s"] = round(time.perf_counter() - t0, 1)
            kept_exact = kept_sets(exact, args.budget, args.window)
            for span in spans:
                t0 = time.perf_counter()
                scores = kvzip_scores(model, ids, prompt, chunk=args.chunk, cache=cache, span=span, sink=args.sink)
                sec = time.perf_counter() - t0
                row[f"span{span}"] = {"replay_s": round(sec, 1),
                                      **overlap(kept_sets(scores, args.budget, args.window), kept_exact,
                                                args.budget, args.window)}
            for c in ref_chunks:
                t0 = time.perf_counter()
                scores = kvzip_scores(model, ids, prompt, chunk=c, cache=cache)
                sec = time.perf_counter() - t0
                row[f"chunk{c}"] = {"replay_s": round(sec, 1),
                                    **overlap(kept_sets(scores, args.budget, args.window), kept_exact,
                                              args.budget, args.window)}
            result["samples"].append(row)
            print(json.dumps({k: (v if not isinstance(v, dict) else {x: y for x, y in v.items() if x != "per_layer"})
                              for k, v in row.items()}), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
    for key in [f"span{x}" for x in spans] + [f"chunk{c}" for c in ref_chunks]:
        rows = [r[key] for r in result["samples"]]
        result[f"mean_{key}"] = {k: round(sum(r[k] for r in rows) / len(rows), 4)
                                      for k in ("overlap", "overlap_beyond_window", "min_layer", "replay_s")}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k.startswith("mean")}, indent=1))


if __name__ == "__main__":
    main()
