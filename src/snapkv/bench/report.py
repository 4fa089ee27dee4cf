"""Benchmark report: JSON, a markdown table, the targets' verdicts and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

K = 1024


def _tokens(n: int) -> str:
    if n >= K * K and n % (K * K) == 0:
        return f"{n // (K * K)}M"
    return f"{n // K}K" if n >= K and n % K == 0 else str(n)


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def _size(gib: float | None) -> str:
    """A GiB figure with a unit that shows it: MiB (or KiB) below 1 GiB, so small caches do not read 0.00."""
    if gib is None:
        return "-"
    if gib >= 1:
        return f"{gib:.2f} GiB"
    mib = gib * K
    return f"{mib:.1f} MiB" if mib >= 1 else f"{mib * K:.0f} KiB"


def find(results: list[dict[str, Any]], label: str, length: int, batch: int = 1) -> dict[str, Any] | None:
    """The result of one point, if it was measured."""
    for r in results:
        if r["label"] == label and r["length"] == length and r["batch"] == batch:
            return r
    return None


def targets(results: list[dict[str, Any]], floor_ms: float | None) -> list[dict[str, Any]]:
    """The issue's targets, each with what was measured and whether it was met."""
    out: list[dict[str, Any]] = []

    def add(name: str, goal: str, measured: str, met: bool | None, note: str = "") -> None:
        out.append({"target": name, "goal": goal, "measured": measured, "met": met, "note": note})

    snap = [r for r in results if r["label"] == "snapkv-2048" and r["batch"] == 1 and r["status"] == "ok"]
    if snap:
        worst = max(snap, key=lambda r: r["decode_ms"])
        lengths = ", ".join(_tokens(r["length"]) for r in sorted(snap, key=lambda r: r["length"]))
        add("decode, budget 2048, batch 1", "<= 7 ms/token at every length", f"max {worst['decode_ms']:.2f} ms "
            f"(at {_tokens(worst['length'])}; lengths {lengths})", worst["decode_ms"] <= 7.0)
        if floor_ms:
            ratio = worst["decode_ms"] / floor_ms
            add("decode vs weight floor", "<= 1.3x", f"{ratio:.2f}x of {floor_ms:.2f} ms", ratio <= 1.3)
    s128, h128 = find(results, "snapkv-2048", 128 * K), find(results, "hf", 128 * K)
    if s128 and h128 and s128["status"] == h128["status"] == "ok":
        ratio = h128["decode_ms"] / s128["decode_ms"]
        add("decode speed-up vs HF full cache at 128K", ">= 10x", f"{ratio:.1f}x ({h128['decode_ms']:.1f} -> "
            f"{s128['decode_ms']:.2f} ms)", ratio >= 10)
    if s128 and s128["status"] == "ok":
        share = s128.get("score_share")
        if share is not None:
            add("scoring share of prefill at 128K", "<= 2%", f"{100 * share:.2f}%", share <= 0.02)
        if s128.get("peak_gib") is not None:
            add("peak memory, 128K prompt", "<= 22 GiB", f"{s128['peak_gib']:.1f} GiB", s128["peak_gib"] <= 22)
    b8 = find(results, "snapkv-2048", 128 * K, 8)
    if b8 and b8["status"] == "ok":
        add("8 x 128K prompts, total decode", ">= 800 tokens/s", f"{b8['decode_tok_s']:.0f} tokens/s",
            b8["decode_tok_s"] >= 800)
    m1 = find(results, "snapkv-2048", 1024 * K)
    if m1:
        note = ""
        if m1.get("layers_run"):
            note = f"prefill through {m1['layers_run']} layers of the full-weight model"
        add("1M-token prompt on one GPU", "completes", m1["status"] + (f", peak {m1['peak_gib']:.1f} GiB"
            if m1.get("peak_gib") else ""), m1["status"] == "ok", note)
    return out


def markdown(meta: dict[str, Any], results: list[dict[str, Any]], verdicts: list[dict[str, Any]]) -> str:
    """A markdown report: environment, the table of points, and the targets."""
    lines = [f"# snapkv bench: {meta.get('preset', '')}", ""]
    for key in ("device", "model", "torch", "transformers", "triton", "cuda", "date", "command"):
        if key in meta:
            lines.append(f"- {key}: {meta[key]}")
    if meta.get("floor_ms"):
        lines.append(f"- weight-bandwidth floor: {meta['floor_ms']:.2f} ms/token ({meta.get('floor_note', '')})")
    if meta.get("linear_floor_ms"):
        lines.append(f"- every nn.Linear once, one CUDA graph (cuBLAS weight reads alone): "
                     f"{meta['linear_floor_ms']:.2f} ms at batch 1, {meta.get('linear_floor_b8_ms') or 0:.2f} ms at 8")
    if meta.get("warmup_s"):
        lines.append(f"- warm-up run discarded before measuring: {meta['warmup_s']:.1f} s")
    lines += ["", "| mode | batch | prompt | status | TTFT s | prefill tok/s | decode ms/token (p10-p90) | "
              "decode tok/s | peak GiB | KV alloc / kept | score % of prefill | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        note = r.get("message", "")[:160]
        if r.get("layers_run"):
            note = (f"prefill through {r['layers_run']} layers; full-depth TTFT est. "
                    f"{_f(r.get('ttft_full_depth_est_s'), '.0f')} s; decode over all layers (later ones copied)")
        dec = "-" if r.get("decode_ms") is None else (
            f"{r['decode_ms']:.2f} ({r['decode_ms_p10']:.2f}-{r['decode_ms_p90']:.2f})")
        share = None if r.get("score_share") is None else 100 * r["score_share"]
        kv = "-" if r.get("kv_gib") is None else f"{_size(r['kv_gib'])} / {_size(r['kept_kv_gib'])}"
        lines.append(
            f"| {r['label']} | {r['batch']} | {_tokens(r['length'])} | {r['status']} | {_f(r.get('ttft_s'))} | "
            f"{_f(r.get('prefill_tok_s'), '.0f')} | {dec} | {_f(r.get('decode_tok_s'), '.0f')} | "
            f"{_f(r.get('peak_gib'), '.1f')} | {kv} | {_f(share, '.2f')} | {note} |"
        )
    if verdicts:
        lines += ["", "| target | goal | measured | met | note |", "|---|---|---|---|---|"]
        for v in verdicts:
            met = {True: "yes", False: "**no**", None: "-"}[v["met"]]
            lines.append(f"| {v['target']} | {v['goal']} | {v['measured']} | {met} | {v['note']} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path, capacity_gib: float | None = None) -> bool:
    """Decode latency, TTFT and peak memory versus prompt length (batch 1); False without matplotlib.

    A prefill run through only the first layers shows its estimated full-depth TTFT (hollow marker);
    out-of-memory points are crosses on the device's capacity line.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    labels = sorted({r["label"] for r in results}, key=lambda s: (s != "hf", s != "full", s))
    for label in labels:
        rows = sorted((r for r in results if r["label"] == label and r["batch"] == 1), key=lambda r: r["length"])
        ok = [r for r in rows if r["status"] == "ok"]
        color = None
        for ax, key in zip(axes, ("decode_ms", "ttft_s", "peak_gib"), strict=True):
            pts = [(r["length"], r[key]) for r in ok if r.get(key) is not None and not (key == "ttft_s"
                                                                                      and r.get("layers_run"))]
            if pts:
                (line,) = ax.plot(*zip(*pts, strict=True), marker="o", label=label, color=color)
                color = line.get_color()
        est = [(r["length"], r["ttft_full_depth_est_s"]) for r in ok if r.get("ttft_full_depth_est_s")]
        if est:
            axes[1].plot(*zip(*est, strict=True), marker="o", linestyle="none", markerfacecolor="none",
                         color=color, label=f"{label} (est. full depth)")
        oom = [r["length"] for r in rows if r["status"] == "oom"]
        if oom and capacity_gib:
            axes[2].plot(oom, [capacity_gib] * len(oom), marker="x", linestyle="none", color=color,
                         markersize=9, label=f"{label} out of memory")
    if capacity_gib:
        axes[2].axhline(capacity_gib, color="grey", linestyle="--", linewidth=1)
    titles = ("decode ms/token (batch 1)", "time to first token, s", "peak GPU memory, GiB")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(
    out_dir: Path, meta: dict[str, Any], results: list[dict[str, Any]], with_plot: bool = True
) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.md`` and (``with_plot``) ``bench.png`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    verdicts = targets(results, meta.get("floor_ms"))
    paths = {"json": out_dir / "bench.json", "md": out_dir / "bench.md"}
    paths["json"].write_text(json.dumps({"meta": meta, "results": results, "targets": verdicts}, indent=1))
    paths["md"].write_text(markdown(meta, results, verdicts))
    if with_plot and plot(results, out_dir / "bench.png", meta.get("capacity_gib")):
        paths["png"] = out_dir / "bench.png"
    return paths


def merge_files(paths: list[Path], out_dir: Path) -> dict[str, Path]:
    """One report from several ``bench.json`` files of the same device and model (parts of a sweep).

    Points are kept in file order; a point that appears in several files keeps its first result.
    """
    metas, results, seen = [], [], set()
    for path in paths:
        data = json.loads(Path(path).read_text())
        metas.append(data["meta"])
        for r in data["results"]:  # a point measured twice keeps its first measurement
            key = (r["label"], r["length"], r["batch"])
            if key not in seen:
                seen.add(key)
                results.append(r)
    meta = dict(metas[0])
    meta["command"] = " ; ".join(m.get("command", "") for m in metas)
    meta["date"] = " ; ".join(sorted({m.get("date", "") for m in metas}))
    for key in ("device", "model", "torch", "transformers"):
        if len({m.get(key) for m in metas}) > 1:
            meta[key] = " / ".join(str(m.get(key)) for m in metas)
    return write(out_dir, meta, results)
