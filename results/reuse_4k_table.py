"""The "Reuse at 4x" tables of docs/RESULTS.md from results/{smollm2,gemma3}-4k-reuse (complete samples only).

A sample counts once every (method, mode) of the run has its record, so every row is on the
same prompts. Scores: percent mean with a 95% interval (``report.fmt``: Wilson for 0/1
scores); "of full": the row's summed score over the full cache's on the same prompts, with a
paired bootstrap 95% interval (``report.retention``).

    PYTHONPATH=src python results/reuse_4k_table.py
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from snapkv.eval.report import fmt, retention

HERE = Path(__file__).parent
RUNS = {"SmolLM2-135M-Instruct": HERE / "smollm2-4k-reuse",
        "Gemma-3-270M (base, plain prompts)": HERE / "gemma3-4k-reuse"}
ROWS = [("full", "query", "reference: full cache"),
        ("snapkv", "query", "query-aware (question in the window)"),
        ("snapkv-k31", "query", "query-aware, kernel 31"),
        ("snapkv", "context", "reuse: context-only"),
        ("snapkv-k31", "context", "reuse: context-only, kernel 31"),
        ("snapkv", "probe", "reuse: probe"),
        ("snapkv-k31", "probe", "reuse: probe, kernel 31 (the new default)"),
        ("kvzip", "context", "reuse: KVzip replay"),
        ("kvzip-k31", "context", "reuse: KVzip replay, kernel 31")]


def complete(recs: list[dict]) -> list[dict]:
    """Records of the samples that hold every (method, mode, budget) of the run."""
    per = defaultdict(set)
    for r in recs:
        per[(r["task"], r["index"])].add((r["method"], r["mode"], r["budget"]))
    need = set().union(*per.values())
    done = {k for k, v in per.items() if v == need}
    return [r for r in recs if (r["task"], r["index"]) in done]


def table(name: str, folder: Path, budget: str = "1024") -> None:
    path = folder / "records.jsonl"
    if not path.exists():
        return
    recs = complete([json.loads(line) for line in path.read_text().splitlines()])
    if not recs:
        print(f"{name}: no complete sample yet\n")
        return
    tasks = sorted({r["task"] for r in recs})
    counts = {t: len({r["index"] for r in recs if r["task"] == t}) for t in tasks}
    length = recs[0]["length"]
    ctx = sorted({r["context_tokens"] for r in recs})
    print(f"### {name}, {length} tokens ({ctx[0]}-{ctx[-1]} context tokens), budget {budget} "
          f"(4x): {sum(counts.values())} prompts ({', '.join(f'{t} {n}' for t, n in counts.items())})\n")
    print("| method | mode | | average | " + " | ".join(tasks) + " | of full (paired) |")
    print("|---|---|---|---|" + "---|" * len(tasks) + "---|")
    for m, mode, label in ROWS:
        b = "full" if m == "full" else budget
        rows = [r for r in recs if r["method"] == m and r["mode"] == mode and r["budget"] == b]
        if not rows:
            continue
        cells = [fmt([r["score"] for r in rows]) + f" (n={len(rows)})"]
        cells += [fmt([r["score"] for r in rows if r["task"] == t]) for t in tasks]
        ret = retention(recs, budget, mode, m) if m != "full" else None
        of = f"{100 * ret[0]:.0f}% ({100 * ret[1]:.0f}-{100 * ret[2]:.0f})" if ret else "-"
        print(f"| {m} | {mode} | {label} | " + " | ".join(cells) + f" | {of} |")
    print()


def main() -> None:
    for name, folder in RUNS.items():
        table(name, folder)


if __name__ == "__main__":
    main()
