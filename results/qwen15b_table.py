"""The 1.5B tables of docs/RESULTS.md from results/qwen1.5b-8k (float32), results/qwen1.5b-bf16-8k{,-s1}
and results/qwen1.5b-bf16-4k.

One table per run (the dtype or length differs, so their prompts are not pooled): every method x
mode at 4x (budget 2048 of 8K, 1024 of 4K; KVzip in context mode, 4K only), percent mean with a
95% interval (``report.fmt``, Wilson for 0/1 scores)
and the paired share of the full cache's score (``report.retention``, bootstrap 95% interval).
The float32 run's ``probe`` records predate the probe's tail and are shown as ``probe-only``.

    PYTHONPATH=src python results/qwen15b_table.py
"""

from __future__ import annotations

from pathlib import Path

from snapkv.eval.report import fmt, load_records, retention

HERE = Path(__file__).parent
RUNS = {"8K, bfloat16, seed 1 (2026-12-01)": (HERE / "qwen1.5b-bf16-8k-s1", "2048"),
        "8K, bfloat16, seed 0 (2026-12-01; the float32 run's first prompts again)": (HERE / "qwen1.5b-bf16-8k", "2048"),
        "8K, float32, seed 0 (2026-11-30)": (HERE / "qwen1.5b-8k", "2048"),
        "4K, bfloat16, seed 0 (2026-12-01)": (HERE / "qwen1.5b-bf16-4k", "1024")}
METHODS = [("snapkv", "SnapKV, kernel 7"), ("snapkv-k31", "SnapKV, kernel 31 (default)"),
           ("adakv", "AdaKV (head-adaptive, kernel 7)"), ("kvzip", "KVzip (context replay)")]
MODES = [("query", "query-aware"), ("context", "context-only"), ("probe", "probe + last 32 (`Probe()`)"),
         ("probe-only", "probe alone")]


def table(name: str, folder: Path, budget: str) -> list[str]:
    """Markdown lines of one run's table."""
    recs = load_records([folder]) if folder.exists() else []  # old probe records come back as probe-only
    if not recs:
        return [f"{name}: no records", ""]
    full = [r for r in recs if r["method"] == "full"]
    tasks = sorted({r["task"] for r in full})
    counts = ", ".join(f"{t} {sum(r['task'] == t for r in full)}" for t in tasks)
    out = [f"#### {name}: {len(full)} prompts ({counts}), full cache {fmt([r['score'] for r in full])}", "",
           "| method | " + " | ".join(label for _, label in MODES) + " |", "|---|" + "---|" * len(MODES)]
    for m, label in METHODS:
        if not any(r["method"] == m for r in recs):
            continue
        cells = []
        for mode, _ in MODES:
            rows = [r for r in recs if r["method"] == m and r["mode"] == mode and r["budget"] == budget]
            if not rows:
                cells.append("-")
                continue
            ret = retention(recs, budget, mode, m)
            of = f"; {100 * ret[0]:.0f}% of full ({100 * ret[1]:.0f}-{100 * ret[2]:.0f})" if ret else ""
            cells.append(f"{fmt([r['score'] for r in rows])}, n={len(rows)}{of}")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*out, ""]


def render() -> str:
    """Every run's table (the ``generated:qwen15b`` block of docs/RESULTS.md)."""
    return "\n".join(line for name, (folder, budget) in RUNS.items()
                     for line in table(name, folder, budget))


def main() -> None:
    print(render())


if __name__ == "__main__":
    main()
