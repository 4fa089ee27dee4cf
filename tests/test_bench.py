"""``snapkv bench`` on CPU with a tiny random model: points, out-of-memory reporting, the report."""

from __future__ import annotations

import argparse
import json

import pytest

from snapkv.bench import report, runner
from snapkv.bench.measure import Options, Point, measure
from snapkv.bench.models import random_model
from snapkv.bench.sweeps import gpu_points, grid, preset, split_parts
from snapkv.generation import NotEnoughMemoryError

K = 1024


def _run(tmp_path, *extra: str) -> dict:
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    args = parser.parse_args(["--preset", "quick", "--device", "cpu", "--out", str(tmp_path), *extra])
    assert runner.run(args) == 0
    return json.loads((tmp_path / "bench.json").read_text())


def test_quick_sweep_writes_json_markdown_and_plot(tmp_path):
    data = _run(tmp_path, "--lengths", "200", "--batches", "1,2", "--budgets", "48", "--steps", "3")
    labels = {(r["label"], r["batch"]) for r in data["results"]}
    assert labels == {(m, b) for m in ("hf", "full", "snapkv-48") for b in (1, 2)}
    assert all(r["status"] == "ok" for r in data["results"])
    snap = next(r for r in data["results"] if r["label"] == "snapkv-48" and r["batch"] == 2)
    assert snap["decode_ms"] > 0 and snap["ttft_s"] > 0 and snap["kept_kv_gib"] < snap["kv_gib"]
    assert 0 <= snap["score_share"] < 1
    md = (tmp_path / "bench.md").read_text()
    assert "| snapkv-48 | 2 | 200 | ok |" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return  # the plot is optional
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_gpu_preset_parts_cover_every_point_once():
    pts = gpu_points()
    one, two = split_parts(pts, 1), split_parts(pts, 2)
    assert len(one) + len(two) == len(pts) and not set(one) & set(two)
    assert max(p.length for p in one) == 128 * K and any(p.batch == 8 and p.length == 128 * K for p in one)
    assert max(p.length for p in two) == 1024 * K


def test_merge_reports(tmp_path):
    a = _run(tmp_path / "a", "--lengths", "64", "--modes", "full", "--steps", "2")
    b = _run(tmp_path / "b", "--lengths", "96", "--modes", "full", "--steps", "2")
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    args = parser.parse_args(["--merge", str(tmp_path / "a" / "bench.json"), str(tmp_path / "b" / "bench.json"),
                              "--out", str(tmp_path / "m")])
    assert runner.run(args) == 0
    merged = json.loads((tmp_path / "m" / "bench.json").read_text())
    assert len(merged["results"]) == len(a["results"]) + len(b["results"])


def test_time_budget_skips_the_rest(tmp_path):
    data = _run(tmp_path, "--lengths", "64,128", "--modes", "full", "--steps", "2", "--time-budget", "0")
    assert {r["status"] for r in data["results"]} == {"skipped"}


def test_out_of_memory_is_reported_not_raised(monkeypatch):
    import snapkv.generation.generate as gen

    def refuse(*args, **kwargs):
        raise NotEnoughMemoryError("needs 99 GiB. Would fit: budget=2048", 99, 1, "budget=2048")

    monkeypatch.setattr(gen, "check_fits", refuse)
    model = random_model("tiny-llama", dtype=__import__("torch").float32)
    res = measure(model, Point("full", 64), Options(steps=2, warmup=1, window=8))
    assert res.status == "oom" and "Would fit" in res.message and res.decode_ms is None


def test_partial_depth_point_estimates_full_depth():
    model = random_model("tiny-llama", dtype=__import__("torch").float32, num_layers=4)
    res = measure(model, Point("snapkv", 300, 1, 64, layers=2), Options(steps=2, warmup=1, window=8, prefill_chunk=64))
    assert res.status == "ok" and res.layers_run == 2
    assert res.ttft_full_depth_est_s > 0 and res.decode_ms > 0


def test_lengths_parse_with_suffixes():
    assert runner._length("16K") == 16 * K and runner._length("1M") == K * K and runner._length("4096") == 4096
    with pytest.raises(argparse.ArgumentTypeError):
        runner._length("lots")


def test_presets_cover_the_issue_grid():
    pts = gpu_points()
    lengths = {p.length for p in pts}
    assert {4 * K, 128 * K, 512 * K, 1024 * K} <= lengths
    assert {p.batch for p in pts} == {1, 2, 4, 8}
    assert {p.budget for p in pts if p.mode == "snapkv"} == {1024, 2048, 4096}
    assert any(p.mode == "snapkv" and p.batch == 8 and p.length == 128 * K for p in pts)
    assert next(p for p in pts if p.length == 1024 * K and p.mode == "snapkv").layers
    cpu = preset("cpu")
    assert cpu.model == "smollm2" and {p.label for p in cpu.points} == {"full", "snapkv-1024"}
    with pytest.raises(ValueError, match="modes"):
        grid([8], modes=("nope",))


def test_targets_verdicts():
    def row(label, n, b=1, **kw):
        base = dict(label=label, length=n, batch=b, status="ok", decode_ms=6.0, peak_gib=20.0, score_share=0.01,
                    decode_tok_s=1000.0, layers_run=None)
        return {**base, **kw}

    results = [row("snapkv-2048", 128 * K), row("hf", 128 * K, decode_ms=75.0), row("snapkv-2048", 4 * K),
               row("snapkv-2048", 128 * K, 8, decode_tok_s=700.0), row("snapkv-2048", 1024 * K, layers_run=4)]
    verdicts = {v["target"]: v for v in report.targets(results, floor_ms=5.3)}
    assert verdicts["decode, budget 2048, batch 1"]["met"]
    assert verdicts["decode vs weight floor"]["met"] is True  # 6.0 / 5.3 = 1.13
    assert verdicts["decode speed-up vs HF full cache at 128K"]["met"]  # 12.5x
    assert verdicts["8 x 128K prompts, total decode"]["met"] is False
    assert "4 layers" in verdicts["1M-token prompt on one GPU"]["note"]
