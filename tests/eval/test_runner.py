"""Runner: bad input fails before model work, a tiny smoke run, resumption without duplicates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from snapkv.eval import runner
from snapkv.eval.engine import Setting, evaluate_sample
from snapkv.eval.tasks import make_sample

from .helpers import byte_codec, eval_args, tiny_gemma3, tiny_llama


def _no_model(name: str):  # pragma: no cover - must never run
    raise AssertionError("model work before validation")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tasks", "passkey,bogus"], "unknown task 'bogus'"),
        (["--methods", "snapkv,magic"], "unknown method 'magic'"),
        (["--modes", "query,sideways"], "unknown mode 'sideways'"),
        (["--lengths", "16k"], "exceeds the context of smollm2"),
        (["--lengths", "2k", "--budgets", "64,2048"], "not below the length 2048"),
        (["--budgets", "1.5"], "strictly between 0 and 1"),
        (["--budgets", "16"], "must exceed the observation window"),
        (["--lengths", "lots"], "not a token count"),
    ],
)
def test_bad_input_fails_before_model_work(monkeypatch, capsys, argv, message) -> None:
    monkeypatch.setattr(runner, "load", _no_model)
    assert runner.run(eval_args(*argv)) == 2
    assert message in capsys.readouterr().err


def _smoke_args(out: Path, *extra: str):
    return eval_args("--model", "tiny", "--tasks", "passkey,niah_single_1", "--lengths", "400",
                     "--budgets", "48,0.25", "--samples", "1", "--window", "8", "--max-new-tokens", "2",
                     "--methods", "full,snapkv,adakv,streaming,h2o",
                     "--modes", "query,context,probe", "--out", str(out), "--no-progress", *extra)


def test_smoke_run_and_resume(tmp_path: Path) -> None:
    model, codec = tiny_llama(), byte_codec(chat=True)
    args = _smoke_args(tmp_path)
    plan = runner.check_plan(args)
    n = runner.run_plan(args, plan, model, codec)
    per_sample = 1 + 4 * 2 * 2 + 2 * 2  # full; 4 methods x 2 budgets x (query, context); probe: snapkv, adakv
    assert n == 2 * per_sample
    path = tmp_path / "records.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert len({runner.RecordFile.key(r) for r in recs}) == len(recs) == n
    assert {r["method"] for r in recs if r["mode"] == "probe"} == {"snapkv", "adakv"}  # not H2O's accumulated votes
    for r in recs:
        assert 0.0 <= r["score"] <= 1.0 and r["prompt_hash"]
        assert r["kept_tokens"] <= 400
        if r["method"] != "full" and r["budget"] == "48" and r["mode"] != "probe":
            assert r["kept_tokens"] == 48
    # rerun: nothing new
    assert runner.run_plan(args, plan, model, codec) == 0
    # interruption: the last record half-written, another one missing
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]) + lines[-2][:25])
    assert runner.run_plan(args, plan, model, codec) == 2
    again = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(again) == n and len({runner.RecordFile.key(r) for r in again}) == n
    # changed prompts are refused, not mixed in
    with pytest.raises(ValueError, match="prompt hash"):
        runner.run_plan(_smoke_args(tmp_path, "--seed", "5"), plan, model, codec)
    with pytest.raises(ValueError, match="max-new-tokens"):
        runner.run_plan(_smoke_args(tmp_path, "--max-new-tokens", "3"), plan, model, codec)
    # report and plots from the records
    from snapkv.eval.report import write_report

    report = write_report(tmp_path).read_text()
    assert "95% CI" in report and "| snapkv | query |" in report
    assert (tmp_path / "acc_tiny_400.png").exists()


def _predictions(model, codec, sample, settings, separate_context=False) -> list[tuple[str, float]]:
    return [(o.prediction, o.kept_tokens) for o, _ in evaluate_sample(
        model, codec, sample, settings, window=8, max_new_tokens=4, separate_context=separate_context)]


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gemma3])
def test_context_prefix_view_matches_context_prefill(make_model) -> None:
    model, codec = make_model(), byte_codec()
    sample = make_sample("passkey", codec, 300, 1)
    settings = [Setting(m, "context", b) for m in ("snapkv", "h2o") for b in (40, 0.5)]
    a = _predictions(model, codec, sample, settings)
    b = _predictions(model, codec, sample, settings, separate_context=True)
    assert a == b


def test_full_cache_matches_plain_greedy() -> None:
    model, codec = tiny_llama(), byte_codec()
    sample = make_sample("niah_single_1", codec, 500, 0)
    (pred, kept), = _predictions(model, codec, sample, [Setting("full", "query", None)])
    ids = torch.tensor([list(sample.input_ids)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert pred == codec.decode([t for t in out[0, 500:].tolist() if t != 0]) and kept == 500


def test_probe_mode_on_sliding_model_keeps_context_only() -> None:
    model, codec = tiny_gemma3(), byte_codec()
    sample = make_sample("passkey", codec, 300, 0)
    (pred, kept), = _predictions(model, codec, sample, [Setting("snapkv", "probe", 40)])
    assert kept == 40 and isinstance(pred, str)
