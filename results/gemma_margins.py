"""How close to a tie the full cache's answers are on the Gemma-3-270M reuse prompts (4K).

For every prompt of the reuse table (``results/reuse_4k_table.py``) that the full cache answers
right, greedy-decode the full cache again and record, at each generated token until the answer
is complete, the probability of the chosen token and of the runner-up; the prompt's margin is
the smallest gap. A reused cache (``Probe()``) that loses a prompt whose margin is a fraction of
a point has flipped a near-tie, not lost the needle. For prompts listed in ``--flip`` it also
records the first answer token's top-3 under ``Probe()`` at budgets 1024..3584 and under the
full cache in reuse order (context first, then the question).

Resumable, one JSON line per prompt in ``results/gemma3-4k-margins/margins.jsonl``:

    PYTHONPATH=src python results/gemma_margins.py [--flip passkey:0:9,passkey:1:4,niah_single_2:0:2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
OUT = HERE / "gemma3-4k-margins" / "margins.jsonl"


def _top(probs: torch.Tensor, codec, k: int = 3) -> list[tuple[str, float]]:
    v, i = probs.topk(k)
    return [(codec.decode([int(t)]), round(float(p), 4)) for p, t in zip(v, i, strict=True)]


def main() -> None:
    sys.path.insert(0, str(HERE))
    from reuse_4k_table import RUNS, merged

    from snapkv.config import SnapKVConfig
    from snapkv.eval import engine as E
    from snapkv.eval.methods import PROBE_TEXT
    from snapkv.eval.runner import codec_for, load
    from snapkv.eval.tasks import TASKS, make_sample
    from snapkv.integration.session import SnapKVSession

    ap = argparse.ArgumentParser()
    ap.add_argument("--flip", default="", help="task:seed:index list: also probe budgets and reuse order")
    args = ap.parse_args()
    flips = {tuple(x.split(":")) for x in args.flip.split(",") if x}
    name = next(k for k in RUNS if k.startswith("Gemma"))
    recs = merged(*RUNS[name], "1024")
    prompts = sorted({(r["task"], r["seed"], r["index"] % 1000) for r in recs
                      if r["method"] == "full" and r["score"] == 1.0})
    probe_score = {(r["task"], r["seed"], r["index"] % 1000): r["score"] for r in recs
                   if r["method"] == "snapkv-k31" and r["mode"] == "probe"}
    done = set()
    if OUT.exists():
        done = {(d["task"], d["seed"], d["index"]) for d in map(json.loads, OUT.read_text().splitlines())}
    torch.set_num_threads(1)
    model, tok = load("gemma3-270m")
    codec = codec_for(tok, "plain")
    for task, seed, index in prompts:
        if (task, seed, index) in done:
            continue
        s = make_sample(task, codec, 4096, index, seed)
        lc = len(s.context_ids)
        row = {"task": task, "seed": seed, "index": index, "probe_score": probe_score.get((task, seed, index))}
        with torch.no_grad(), SnapKVSession(model, SnapKVConfig(window=32), capture=True) as session:
            full = E.Prefill(model, session, s.input_ids)
            session.activate(full.cache)
            probs, toks, steps = full.logits[0].softmax(-1), [], []
            for i in range(s.max_new_tokens):
                top = probs.topk(2)
                toks.append(int(top.indices[0]))
                steps.append(round(float(top.values[0] - top.values[1]), 4))
                if TASKS[task].score(codec.decode(toks), s.answers) == 1.0:
                    break
                out = model(input_ids=E._ids([toks[-1]], "cpu"),
                            position_ids=E._positions(len(s.input_ids) + i, 1, "cpu"),
                            **session.cache_kwargs(full.cache))
                probs = out.logits[0, -1].float().softmax(-1)
            row.update(prediction=codec.decode(toks), margins=steps, margin=min(steps),
                       first=_top(full.logits[0].softmax(-1), codec))
            if (task, str(seed), str(index)) in flips:
                ctx = E.Prefill(model, session, s.context_ids)
                pids = list(codec.encode(PROBE_TEXT))
                pre = E.Prefill(model, session, list(s.context_ids) + pids)
                q = s.question_ids
                row["probe_first"] = {}
                for b in (1024, 2048, 3072, 3584):
                    pre.methods = {}
                    cache = E._derive(session, pre, E.Setting("snapkv-k31", "probe", b), 32, probe=len(pids))
                    E._cut_tail(cache, len(pids), ctx.cache)
                    session.activate(cache)
                    out = model(input_ids=E._ids(q, "cpu"), position_ids=E._positions(lc, len(q), "cpu"),
                                logits_to_keep=1, **session.cache_kwargs(cache))
                    row["probe_first"][b] = _top(out.logits[0, -1].float().softmax(-1), codec)
                ctx.cache.restore(ctx.snap)
                session.activate(ctx.cache)
                out = model(input_ids=E._ids(q, "cpu"), position_ids=E._positions(lc, len(q), "cpu"),
                            logits_to_keep=1, **session.cache_kwargs(ctx.cache))
                row["full_reuse_order_first"] = _top(out.logits[0, -1].float().softmax(-1), codec)
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
