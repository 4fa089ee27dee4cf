"""The "Reuse at 4x" tables of docs/RESULTS.md from results/{smollm2,gemma3}-4k-{probe-tail,reuse}.

The reuse runs add the reuse modes: ``*-4k-probe-tail`` the probe as ``Probe()`` keeps it since
2026-12-01 (mode ``probe``: the probe votes, the context's last 32 tokens kept) beside the probe
alone (``probe-only``), ``*-4k-reuse`` the earlier reuse run, whose ``probe`` records (made before
records had a ``probe_window``) are the probe alone and are read as ``probe-only``. The
query-aware rows (and SmolLM2's context-only SnapKV) of the same prompts come from the earlier
runs (results/smollm2-4k, results/gemma3-4k), merged here for the prompts the reuse runs reached,
after checking that the prompt hashes agree. Where two runs hold the same setting of a prompt,
the first folder's record is used. ``gemma3-4k-probe-tail-s1`` adds Gemma prompts drawn with seed 1
(indices counted from 1000 here), with their own full-cache and query-aware records.
Each row says its prompt count. Scores: percent mean with a 95% interval (``report.fmt``:
Wilson for 0/1 scores); "of full": the row's summed score over the full cache's on the same
prompts, with a paired bootstrap 95% interval (``report.retention``).

    PYTHONPATH=src python results/reuse_4k_table.py
"""

from __future__ import annotations

from pathlib import Path

from snapkv.eval.report import fmt, load_records, retention

HERE = Path(__file__).parent
RUNS = {"SmolLM2-135M-Instruct": ([HERE / "smollm2-4k-probe-tail", HERE / "smollm2-4k-reuse"], HERE / "smollm2-4k"),
        "Gemma-3-270M (base, plain prompts)": ([HERE / "gemma3-4k-probe-tail", HERE / "gemma3-4k-probe-tail-s1",
                                                HERE / "gemma3-4k-reuse"], HERE / "gemma3-4k")}
KEY = ("task", "index", "method", "mode", "budget")
ROWS = [("full", "query", "reference: full cache"),
        ("snapkv", "query", "query-aware (question in the window)"),
        ("snapkv-k31", "query", "query-aware, kernel 31"),
        ("snapkv", "context", "reuse: context-only"),
        ("snapkv-k31", "context", "reuse: context-only, kernel 31"),
        ("snapkv", "probe-only", "reuse: probe alone"),
        ("snapkv-k31", "probe-only", "reuse: probe alone, kernel 31 (the default until 2026-12-01)"),
        ("snapkv", "probe", "reuse: probe + the context's last 32 tokens"),
        ("snapkv-k31", "probe", "reuse: probe + last 32, kernel 31 (`Probe()`, the default)"),
        ("kvzip", "context", "reuse: KVzip replay"),
        ("kvzip-k31", "context", "reuse: KVzip replay, kernel 31")]


def _read(folder: Path) -> list[dict]:
    recs = load_records([folder])  # old probe records come back as probe-only
    for r in recs:
        r["index"] += 1000 * r.get("seed", 0)  # other seeds' prompts are other prompts (index 1000+ for seed 1)
    return recs


def merged(folders: list[Path], earlier: Path, budget: str) -> list[dict]:
    """The reuse runs' records plus the earlier run's at ``budget`` (and full) on the same prompts."""
    recs: list[dict] = []
    prompts: dict[tuple, str] = {}
    have: set[tuple] = set()
    for folder in folders:
        for r in _read(folder):
            where, key = (r["task"], r["index"]), tuple(r[k] for k in KEY)
            if prompts.setdefault(where, r["prompt_hash"]) != r["prompt_hash"]:
                raise ValueError(f"{folder}: prompt {where} differs from another reuse run's")
            if key not in have:
                have.add(key)
                recs.append(r)
    for r in _read(earlier):
        where = (r["task"], r["index"])
        if where not in prompts or r["budget"] not in (budget, "full") or tuple(r[k] for k in KEY) in have:
            continue
        if r["prompt_hash"] != prompts[where]:
            raise ValueError(f"{earlier}: prompt {where} differs from the reuse run's")
        recs.append(r)
    return recs


def table(name: str, folders: list[Path], earlier: Path, budget: str = "1024") -> list[str]:
    """Markdown lines of one model's table."""
    recs = merged(folders, earlier, budget)
    if not recs:
        return [f"{name}: no records yet", ""]
    out: list[str] = []
    tasks = sorted({r["task"] for r in recs})
    counts = {t: len({r["index"] for r in recs if r["task"] == t}) for t in tasks}
    length = recs[0]["length"]
    ctx = sorted({r["context_tokens"] for r in recs})
    out.append(f"#### {name}, {length} tokens ({ctx[0]}-{ctx[-1]} context tokens), budget {budget} "
          f"(4x): up to {sum(counts.values())} prompts ({', '.join(f'{t} {n}' for t, n in counts.items())})\n")
    out.append("| method | mode | | average | " + " | ".join(tasks) + " | of full (paired) |")
    out.append("|---|---|---|---|" + "---|" * len(tasks) + "---|")
    for m, mode, label in ROWS:
        b = "full" if m == "full" else budget
        rows = [r for r in recs if r["method"] == m and r["mode"] == mode and r["budget"] == b]
        if not rows:
            continue
        cells = [fmt([r["score"] for r in rows]) + f" (n={len(rows)})"]
        cells += [fmt([r["score"] for r in rows if r["task"] == t]) for t in tasks]
        ret = retention(recs, budget, mode, m) if m != "full" else None
        of = f"{100 * ret[0]:.0f}% ({100 * ret[1]:.0f}-{100 * ret[2]:.0f})" if ret else "-"
        out.append(f"| {m} | {mode} | {label} | " + " | ".join(cells) + f" | {of} |")
    return [*out, ""]


def render() -> str:
    """Both models' tables (the ``generated:reuse4k`` block of docs/RESULTS.md)."""
    return "\n".join(line for name, (folders, earlier) in RUNS.items() for line in table(name, folders, earlier))


def main() -> None:
    print(render())


if __name__ == "__main__":
    main()
