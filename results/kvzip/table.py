"""The KVzip table of docs/RESULTS.md from results/kvzip/records.jsonl (complete samples only)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from snapkv.eval.report import fmt

HERE = Path(__file__).parent
ROWS = [("full", "query"), ("snapkv", "query"), ("snapkv-k31", "query"), ("snapkv", "context"),
        ("snapkv-k31", "context"), ("snapkv", "probe"), ("snapkv-k31", "probe"), ("kvzip", "context")]


def main() -> None:
    recs = [json.loads(line) for line in (HERE / "records.jsonl").read_text().splitlines()]
    per_sample = defaultdict(list)
    for r in recs:
        per_sample[(r["task"], r["index"])].append(r)
    need = max(len(v) for v in per_sample.values())
    done = {k for k, v in per_sample.items() if len(v) == need}
    recs = [r for r in recs if (r["task"], r["index"]) in done]
    tasks = sorted({r["task"] for r in recs})
    counts = {t: sum(1 for k in done if k[0] == t) for t in tasks}
    print(f"complete samples: {len(done)} ({', '.join(f'{t} {n}' for t, n in counts.items())})\n")
    budgets = ["256", "512"]
    print("| method | mode | " + " | ".join(budgets) + " | " + " | ".join(f"{t} @256" for t in tasks) + " |")
    print("|---|---|" + "---|" * (len(budgets) + len(tasks)))
    for m, mode in ROWS:
        cells = []
        for b in budgets if m != "full" else ["full"] * len(budgets):
            # task average per sample index: scores of the three tasks are averaged as report.py does
            xs = [r["score"] for r in recs if r["method"] == m and r["mode"] == mode and r["budget"] == b]
            cells.append(fmt(xs) + f" (n={len(xs)})")
        per_task = []
        b = "full" if m == "full" else "256"
        for t in tasks:
            xs = [r["score"] for r in recs if r["method"] == m and r["mode"] == mode and r["budget"] == b
                  and r["task"] == t]
            per_task.append(fmt(xs))
        print(f"| {m} | {mode} | " + " | ".join(cells) + " | " + " | ".join(per_task) + " |")
    d = defaultdict(list)
    for r in recs:
        if r["method"] == "kvzip" and r["budget"] == "256":
            d["kvzip_derive_s"].append(r["derive_s"])
    print("\nkvzip replay (derive) seconds, budget 256 rows:", sorted(d["kvzip_derive_s"]))


if __name__ == "__main__":
    main()


def pool_table() -> None:
    """kvzip vs kvzip-k31 on niah_single_2 (results/kvzip/pool)."""
    path = HERE / "pool" / "records.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    by = defaultdict(list)
    for r in recs:
        by[r["index"]].append(r)
    done = {i for i, v in by.items() if len(v) == max(len(x) for x in by.values())}
    print(f"\nniah_single_2, complete samples: {len(done)}\n")
    print("| method | 256 | 512 |\n|---|---|---|")
    for m in ("kvzip", "kvzip-k31"):
        cells = [fmt([r["score"] for r in recs if r["index"] in done and r["method"] == m and r["budget"] == b])
                 for b in ("256", "512")]
        print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    pool_table()
