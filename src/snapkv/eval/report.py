"""Markdown report from ``records.jsonl``: mean scores with 95% confidence intervals.

Binary scores (0/1) get Wilson score intervals; partial scores a seeded percentile bootstrap.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

Z95 = 1.959963984540054
METHOD_ORDER = ("full", "snapkv", "snapkv-k31", "adakv", "pyramidkv", "kvzip", "kvzip-k31", "kvzip-span",
                "kvzip-span1024", "h2o", "streaming", "random")
MODE_TITLES = {
    "query": "query-aware (question inside the compressed prompt)",
    "context": "context-only (context compressed alone, question afterwards)",
    "probe": "context-only + generic probe window (the probe votes, the context's last window kept, probe dropped)",
    "probe-only": "context-only + generic probe window (the probe alone votes, then is dropped)",
}


def load_records(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """All records of the given JSONL files (or folders holding ``records.jsonl``).

    ``probe`` records made before the probe kept the context's last window (no
    ``probe_window`` field) ran what is now the ``probe-only`` mode and are read as such.
    """
    out: list[dict[str, Any]] = []
    for p in paths:
        p = Path(p)
        f = p / "records.jsonl" if p.is_dir() else p
        if f.exists():
            for line in f.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    rec = json.loads(line)
                    if rec.get("mode") == "probe" and "probe_window" not in rec:
                        rec["mode"] = "probe-only"
                    out.append(rec)
    return out


def wilson(k: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``k / n``."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap(scores: Sequence[float], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean (seeded, so reports are reproducible)."""
    n = len(scores)
    if n == 0:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(scores, k=n)) / n for _ in range(reps))
    return (means[int(0.025 * reps)], means[min(reps - 1, int(0.975 * reps))])


def interval(scores: Sequence[float]) -> tuple[float, float, float]:
    """``(mean, low, high)``: Wilson for 0/1 scores, bootstrap otherwise."""
    n = len(scores)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    mean = sum(scores) / n
    lo, hi = wilson(sum(scores), n) if all(s in (0.0, 1.0) for s in scores) else bootstrap(scores)
    return (mean, lo, hi)


def fmt(scores: Sequence[float]) -> str:
    """``"72 (55-85)"``: percent mean and 95% CI."""
    if not scores:
        return "-"
    m, lo, hi = interval(scores)
    return f"{100 * m:.0f} ({100 * lo:.0f}-{100 * hi:.0f})"


def budget_key(b: str) -> float:
    """Sort budgets: fractions by value, tokens by count, the full cache last."""
    if b == "full":
        return math.inf
    v = float(b)
    return v if v >= 1 else v * 1e6


def group(records: Iterable[dict[str, Any]], *fields: str) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """Records grouped by the values of ``fields``."""
    out: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        out[tuple(r[f] for f in fields)].append(r)
    return out


def retention(records: Sequence[dict[str, Any]], budget: str, mode: str = "query",
              method: str = "snapkv") -> tuple[float, float, float, int] | None:
    """Mean score of ``method`` over the full cache's, on paired samples, with a paired bootstrap CI."""
    full = {(r["task"], r["index"]): r["score"] for r in records if r["method"] == "full"}
    pairs = [(r["score"], full[(r["task"], r["index"])]) for r in records
             if r["method"] == method and r["mode"] == mode and r["budget"] == budget
             and (r["task"], r["index"]) in full]
    if not pairs or sum(f for _, f in pairs) == 0:
        return None
    ratio = sum(s for s, _ in pairs) / sum(f for _, f in pairs)
    rng = random.Random(0)
    boots = []
    for _ in range(2000):
        draw = rng.choices(pairs, k=len(pairs))
        den = sum(f for _, f in draw)
        if den > 0:
            boots.append(sum(s for s, _ in draw) / den)
    boots.sort()
    return ratio, boots[int(0.025 * len(boots))], boots[int(0.975 * len(boots)) - 1], len(pairs)


def _methods(rs: Sequence[dict[str, Any]]) -> list[str]:
    present = {r["method"] for r in rs}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def summary_tables(records: Sequence[dict[str, Any]]) -> list[str]:
    """Per model and length: the task-average score of each method x mode x budget."""
    lines: list[str] = []
    for (model, length), rs in sorted(group(records, "model", "length").items()):
        tasks = sorted({r["task"] for r in rs})
        budgets = sorted({r["budget"] for r in rs if r["budget"] != "full"}, key=budget_key)
        full = [r["score"] for r in rs if r["method"] == "full"]
        counts = {t: len({r["index"] for r in rs if r["task"] == t and r["method"] == "full"}) for t in tasks}
        lines += [f"### {model} at {length} tokens: average over {', '.join(tasks)}", "",
                  "Samples per task: " + ", ".join(f"{t} {n}" for t, n in counts.items())
                  + f". Full cache: **{fmt(full)}** (n={len(full)}).", "",
                  "| method | mode | " + " | ".join(budgets) + " |", "|---|---|" + "---|" * len(budgets)]
        for mode in ("query", "context", "probe", "probe-only"):
            for m in _methods(rs):
                if m == "full":
                    continue
                cells = [[r["score"] for r in rs if r["method"] == m and r["mode"] == mode and r["budget"] == b]
                         for b in budgets]
                if any(cells):
                    lines.append(f"| {m} | {mode} | " + " | ".join(fmt(c) for c in cells) + " |")
        lines.append("")
        quarter = str(length // 4)
        for m in _methods(rs):
            ret = retention(rs, quarter, method=m) if m != "full" else None
            if ret is not None:
                r_, lo, hi, n = ret
                lines.append(f"* {m} query-aware at {quarter} tokens (4x compression) keeps **{100 * r_:.1f}%** of "
                             f"the full cache's average score (paired bootstrap 95% CI {100 * lo:.0f}-"
                             f"{100 * hi:.0f}%, n={n}).")
        lines.append("")
    return lines


def detail_tables(records: Sequence[dict[str, Any]]) -> list[str]:
    """Per model, length and mode: every task x method x budget."""
    lines: list[str] = []
    for (model, length, mode), rs in sorted(group(records, "model", "length", "mode").items()):
        if mode == "query" and all(r["method"] == "full" for r in rs):
            continue
        allrs = [r for r in records if r["model"] == model and r["length"] == length]
        tasks = sorted({r["task"] for r in allrs})
        lines += [f"#### {model}, {length} tokens, {MODE_TITLES.get(mode, mode)}", "",
                  "| method | budget | " + " | ".join(tasks) + " | avg |", "|---|---|" + "---|" * (len(tasks) + 1)]
        full = [r for r in allrs if r["method"] == "full"]
        rows = [("full", "full", full)] if full else []
        for (m, b), g in sorted(group([r for r in rs if r["method"] != "full"], "method", "budget").items(),
                                key=lambda kv: (METHOD_ORDER.index(kv[0][0]) if kv[0][0] in METHOD_ORDER else 99,
                                                budget_key(kv[0][1]))):
            rows.append((m, b, g))
        for m, b, g in rows:
            cells = [fmt([r["score"] for r in g if r["task"] == t]) for t in tasks]
            lines.append(f"| {m} | {b} | " + " | ".join(cells) + f" | {fmt([r['score'] for r in g])} |")
        lines.append("")
    return lines


def timing_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """Median prefill and per-setting derive/decode seconds per model and length."""
    lines = ["| model | length | prefill s (median) | derive s | decode s | settings per prefill |",
             "|---|---|---|---|---|---|"]
    for (model, length), rs in sorted(group(records, "model", "length").items()):
        def med(xs: list[float]) -> float:
            xs = sorted(xs)
            return xs[len(xs) // 2] if xs else math.nan

        pre = med([r["prefill_s"] for r in rs if r["method"] == "full"])
        per = len(rs) / max(1, len([r for r in rs if r["method"] == "full"]))
        lines.append(f"| {model} | {length} | {pre:.1f} | {med([r['derive_s'] for r in rs]):.2f} | "
                     f"{med([r['decode_s'] for r in rs]):.2f} | {per:.0f} |")
    return lines + [""]


def render(records: Sequence[dict[str, Any]]) -> str:
    """The whole markdown report."""
    if not records:
        return "# snapkv eval report\n\nNo records yet.\n"
    lines = ["# snapkv eval report", "", "Scores in percent, mean (95% CI): Wilson for 0/1 task scores, "
             "bootstrap for partial-match scores and task averages.", "", "## Summary", ""]
    lines += summary_tables(records)
    lines += ["## Per task", ""] + detail_tables(records) + ["## Timings (CPU)", ""] + timing_lines(records)
    return "\n".join(lines)


def write_report(out: Path, extra: Sequence[Path] = ()) -> Path:
    """Write ``report.md`` and the plots for the records in ``out`` (and ``extra`` folders)."""
    out = Path(out)
    records = load_records([out, *extra])
    path = out / "report.md"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(render(records), encoding="utf-8")
    if records:
        from snapkv.eval.plots import plot_all

        plot_all(records, out)
    return path
