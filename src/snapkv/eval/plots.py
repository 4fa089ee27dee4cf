"""PNG plots (matplotlib, Agg backend): accuracy versus budget, needle heatmaps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from snapkv.eval.report import METHOD_ORDER, budget_key, group


def _order(method: str) -> tuple[int, str]:
    """Plot order: :data:`METHOD_ORDER`, then methods it does not list by name."""
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)

COLORS = {"snapkv": "tab:blue", "snapkv-k31": "tab:red", "adakv": "tab:cyan", "pyramidkv": "tab:purple",
          "h2o": "tab:green", "streaming": "tab:orange", "random": "tab:gray", "kvzip": "tab:brown",
          "kvzip-k31": "tab:olive"}
STYLES = {"query": "-", "context": ":", "probe": "--", "probe-only": "-."}
NEEDLE_TASKS = ("passkey", "niah_single_1", "niah_single_2", "niah_single_3")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def accuracy_vs_budget(records: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Mean score against kept tokens: one column per task (and the average), one row per mode."""
    plt = _plt()
    tasks = sorted({r["task"] for r in records}) + ["average"]
    modes = [m for m in STYLES if any(r["mode"] == m and r["method"] != "full" for r in records)]
    fig, axes = plt.subplots(len(modes), len(tasks), figsize=(3.3 * len(tasks), 2.7 * len(modes) + 0.8),
                             squeeze=False, sharex=True, sharey=True)
    for i, mode in enumerate(modes):
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            rs = records if task == "average" else [r for r in records if r["task"] == task]
            full = [r["score"] for r in rs if r["method"] == "full"]
            if full:
                ax.axhline(100 * _mean(full), color="black", lw=1.2, ls="--", label="full cache")
            sel = [r for r in rs if r["method"] != "full" and r["mode"] == mode]
            for (m,), g in sorted(group(sel, "method").items(), key=lambda kv: _order(kv[0][0])):
                by = sorted(group(g, "budget").items(), key=lambda kv: budget_key(kv[0][0]))
                xs = [_mean([r["kept_tokens"] for r in rr]) for _, rr in by]
                ys = [100 * _mean([r["score"] for r in rr]) for _, rr in by]
                ax.plot(xs, ys, marker="o", ms=3.5, lw=1.4, color=COLORS.get(m), label=m)
            ax.set_xscale("log", base=2)
            ax.set_ylim(-4, 104)
            ax.grid(alpha=0.3)
            if i == 0:
                n = len([r for r in rs if r["method"] == "full"])
                ax.set_title(f"{task} (n={n} prompts)", fontsize=10)
            if j == 0:
                ax.set_ylabel(f"{mode}\nscore (%)", fontsize=9)
            if i == len(modes) - 1:
                ax.set_xlabel("kept prompt tokens", fontsize=9)
    labels: dict[str, Any] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            labels.setdefault(lab, h)
    fig.legend(list(labels.values()), list(labels), loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def needle_heatmaps(records: Sequence[dict[str, Any]], path: Path, task: str, budget: str,
                    methods: Sequence[str] = ("snapkv", "snapkv-k31"), mode: str = "query") -> Path | None:
    """Depth x length heatmaps of the mean score: full cache beside each of ``methods`` at ``budget``."""
    plt = _plt()
    rs = [r for r in records if r["task"] == task and r.get("depth") is not None]
    panels = [("full cache", [r for r in rs if r["method"] == "full"])]
    for m in methods:
        g = [r for r in rs if r["method"] == m and r["mode"] == mode and r["budget"] == budget]
        if g:
            panels.append((f"{m} {mode} @ {budget}", g))
    if not panels[0][1] or len(panels) < 2:
        return None
    lengths = sorted({r["length"] for r in rs})
    depths = sorted({r["depth"] for r in rs})
    fig, axes = plt.subplots(1, len(panels), figsize=(3 + 1.3 * len(lengths) * len(panels), 3.8), squeeze=False)
    for ax, (name, g) in zip(axes.flat, panels, strict=True):
        grid, counts = [], []
        for d in depths:
            row, crow = [], []
            for n in lengths:
                cell = [r["score"] for r in g if r["depth"] == d and r["length"] == n]
                row.append(100 * _mean(cell))
                crow.append(len(cell))
            grid.append(row)
            counts.append(crow)
        im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                v = grid[i][j]
                ax.text(j, i, "-" if math.isnan(v) else f"{v:.0f}\nn={counts[i][j]}", ha="center", va="center",
                        fontsize=8)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("needle depth" if name == "full cache" else "")
        ax.set_title(name, fontsize=10)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="score (%)")
    fig.suptitle(f"{records[0]['model']}: {task}", fontsize=11)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_all(records: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """Every plot for these records, written under ``out``; returns the paths."""
    out = Path(out)
    paths: list[Path] = []
    for (model, length), rs in sorted(group(records, "model", "length").items()):
        paths.append(accuracy_vs_budget(rs, out / f"acc_{model}_{length}.png", f"{model}, {length}-token prompts"))
    for (model,), rs in group(records, "model").items():
        per_length = [{r["budget"] for r in g if r["method"] == "snapkv" and r["mode"] == "query"}
                      for g in group(rs, "length").values()]
        common = sorted(set.intersection(*per_length) if per_length else set(), key=budget_key)
        for task in NEEDLE_TASKS:
            for b in common:  # budgets measured at every length of this model
                p = needle_heatmaps(rs, out / f"needle_{model}_{task}_{b}.png", task, b)
                if p is not None:
                    paths.append(p)
    return paths
