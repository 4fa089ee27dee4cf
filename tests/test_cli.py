"""The `snapkv` command answers at once; the demo table; the offline model files (assembly, hashes, cache keys)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from snapkv import models
from snapkv.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _run_light(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it sets ``result``; returns it with the heavy modules it imported."""
    script = textwrap.dedent(code) + textwrap.dedent("""
        import json, sys
        heavy = sorted(m for m in ("torch", "transformers", "snapkv.api", "snapkv.bench.runner") if m in sys.modules)
        print(json.dumps({"result": result, "heavy": heavy}))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bad_budget_is_refused_with_status_2_without_importing_torch(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("some context")
    got = _run_light(f"""
        import contextlib, io
        from snapkv.cli import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["generate", "--budget", "16", {str(doc)!r}])
        result = [rc, err.getvalue()]
    """)
    rc, err = got["result"]
    assert rc == 2
    assert "budget must be greater than window (32)" in err
    assert got["heavy"] == []


def test_help_lists_every_subcommand_and_imports_none_of_them():
    got = _run_light("""
        import contextlib, io
        from snapkv.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                main(["--help"])
            except SystemExit as e:
                code = e.code
        result = [code, out.getvalue()]
    """)
    code, text = got["result"]
    assert code == 0
    for name in COMMANDS:
        assert name in text
    assert got["heavy"] == []


@pytest.mark.parametrize(("command", "default"),
                         [("generate", "(default: 1024)"), ("demo", "(default: 512 for passkey, 256 for essays)")])
def test_help_shows_defaults(command, default, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--budget BUDGET tokens kept per layer and KV head" in text and default in text
    assert "(default: 32)" in text and "(default: auto)" in text


def test_only_the_chosen_subcommand_module_is_imported():
    got = _run_light("""
        from snapkv.cli import build_parser
        args = build_parser(["generate", "x.txt"]).parse_args(["generate", "x.txt"])
        result = [args.command, args.budget, args.backend]
    """)
    assert got["result"] == ["generate", 1024, "auto"]
    assert got["heavy"] == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "{missing}"], "prompt_file: no such file"),
        (["generate", "{empty}"], "is empty"),
        (["generate", "{doc}", "--kernel", "4"], "kernel must be a positive odd integer"),
        (["generate", "{doc}", "--budget", "1.5"], "budget as a fraction must lie in (0, 1]"),
        (["generate", "{doc}", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["generate", "{doc}", "--question", "  "], "question must be non-empty"),
        (["generate", "{doc}", "--model", "no-such-model"], "model must be one of"),
        (["generate", "{doc}", "--device", "gpu"], "device must be"),
        (["generate", "{doc}", "--head-budget", "adaptive", "--alpha", "1.5"], "alpha must lie in [0, 1]"),
        (["demo", "--depths", "1.5"], "depths must lie in [0, 1]"),
        (["demo", "--lengths", "10"], "lengths must be"),
        (["demo", "--window", "0"], "window must be an integer >= 1"),
    ],
)
def test_bad_input_is_one_line_and_status_2(argv, message, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "doc.txt").write_text("a document")
    paths = {"missing": tmp_path / "missing.txt", "empty": tmp_path / "empty.txt", "doc": tmp_path / "doc.txt"}
    assert main([a.format(**paths) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--budget", "lots"])
    assert e.value.code == 2
    assert "budget must be tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--backend", "vllm"])
    assert e.value.code == 2


def test_missing_model_extra_is_named_before_any_model_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(models, "_PARTED", {**models._PARTED, "qwen2.5-coder-1.5b": _spec("absent-part", b"x", 2)})
    assert main(["demo", "--task", "essays", "--model", "qwen2.5-coder-1.5b"]) == 2
    err = capsys.readouterr().err
    assert "needs the optional extra 'fake'" in err and 'pip install -e ".[fake]"' in err


def test_demo_essays_questions_are_in_their_essays():
    from snapkv.demo import ESSAY_QUESTIONS, essay_samples

    samples = essay_samples()
    assert len(samples) == len(ESSAY_QUESTIONS) >= 5
    for s in samples:
        assert s.expected[0] in s.context  # the answer is stated in the essay
        # ...and not at its end, where SnapKV's window always keeps it
        assert s.context.index(s.expected[0]) < 0.9 * len(s.context)


def _answer(text: str, prompt: int, kept: int | None, per_token: int = 100):
    from snapkv.api import Answer

    return Answer(text=text, tokens=[1, 2, 3], prompt_tokens=prompt, kept_tokens=kept, kv_bytes_full=per_token * prompt,
                  kv_bytes_kept=per_token * (kept or prompt), prefill_s=1.5, decode_s=0.2)


def test_demo_table_shows_memory_accuracy_and_load_labelled_timings():
    from snapkv.config import SnapKVConfig
    from snapkv.demo import DemoRow, DemoRun, Sample, demo_table

    s1 = Sample("submarine", "ctx", "q?", ("16,000",))
    s2 = Sample("vb", "ctx", "q?", ("52",))
    rows = [DemoRow(s1, _answer("$16,000 a month", 2000, None), _answer("$16,000", 2000, 512)),
            DemoRow(s2, _answer("52 weekends", 3000, None), _answer("about 20", 3000, 512))]
    busy = DemoRun(rows, SnapKVConfig(budget=512), "qwen", "transformers", (3.5, 4.0), 2, 60.0)
    text = demo_table(busy)
    assert "accuracy: full cache 2/2, SnapKV 1/2" in text
    assert "(3.9x smaller)" in text and "(5.9x smaller)" in text
    assert "ok '$16,000'" in text and "MISS 'about 20'" in text
    assert "not benchmarks" in text and "load average 3.5 -> 4.0 on 2 cores" in text
    assert "backend transformers" in text
    idle = DemoRun(rows, SnapKVConfig(budget=512), "qwen", "engine", (0.1, 0.2), 2, 60.0)
    assert "not benchmarks" not in demo_table(idle)


def test_prefill_progress_counts_prefill_layers_and_removes_its_hooks():
    import torch

    from snapkv.progress import decoder_layers, prefill_progress
    from tests.tiny_models import tiny_model

    model = tiny_model("llama")
    layers = decoder_layers(model)
    with torch.no_grad(), prefill_progress(model, "prefill") as bar:
        model(torch.tensor([[1, 2, 3, 4]]))
        assert bar.n == len(layers)
        model(torch.tensor([[5]]))  # a decode step does not move it
        assert bar.n == len(layers)
    assert all(not layer._forward_hooks for layer in layers)


# --- model files: parts, hashes, the dequantized cache ----------------------------------------------------------


def _spec(prefix: str, blob: bytes, parts: int) -> models.PartedGGUF:
    return models.PartedGGUF("fake.gguf", prefix, "0", parts, hashlib.sha256(blob).hexdigest(), "fake")


def _fake_parts(root: Path, prefix: str, blob: bytes, parts: int) -> None:
    size = -(-len(blob) // parts)
    for i in range(1, parts + 1):
        d = root / f"{prefix.replace('-', '_')}{i}" / "data"
        d.mkdir(parents=True)
        (d.parent / "__init__.py").write_text("")
        (d / f"part{i:02d}.bin").write_bytes(blob[(i - 1) * size: i * size])


def test_parted_gguf_assembles_in_order_and_checks_the_hash(tmp_path, monkeypatch):
    blob = os.urandom(3000)
    _fake_parts(tmp_path / "site", "snapkv-test-part", blob, 3)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("SNAPKV_CACHE", str(tmp_path / "cache"))
    path = models.parted_gguf(_spec("snapkv-test-part", blob, 3))
    assert path.read_bytes() == blob
    assert path == tmp_path / "cache" / "gguf" / "fake.gguf"
    assert models.parted_gguf(_spec("snapkv-test-part", blob, 3)) == path  # reused, hash remembered


def test_assemble_refuses_a_wrong_hash_and_leaves_nothing(tmp_path):
    parts = [tmp_path / "a", tmp_path / "b"]
    parts[0].write_bytes(b"abc")
    parts[1].write_bytes(b"def")
    target = tmp_path / "out" / "m.gguf"
    with pytest.raises(ValueError, match="sha256 of the assembled m.gguf"):
        models.assemble(parts, target, hashlib.sha256(b"abcdeX").hexdigest())
    assert not target.exists() and list(target.parent.iterdir()) == []
    assert models.assemble(parts, target, hashlib.sha256(b"abcdef").hexdigest()).read_bytes() == b"abcdef"


def test_missing_parts_name_the_extra(tmp_path, monkeypatch):
    blob = os.urandom(100)
    _fake_parts(tmp_path, "snapkv-half-part", blob, 2)
    (tmp_path / "snapkv_half_part2" / "data" / "part02.bin").unlink()
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"needs the optional extra 'fake'.*part02.bin is missing"):
        models.part_files(_spec("snapkv-half-part", blob, 2))


def test_dequantized_cache_is_keyed_by_content_and_hashes_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SNAPKV_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "venv1" / "m.gguf", tmp_path / "venv2" / "m.gguf"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(b"same weights")
    assert models.dequantized_dir(a) == models.dequantized_dir(b)  # one copy for every venv
    calls = []
    monkeypatch.setattr(models, "_hash_file", lambda path, progress=None: calls.append(path) or "0" * 64)
    models.file_sha256(a)
    assert calls == []  # remembered in index.json
    a.write_bytes(b"other weights")
    assert models.file_sha256(a) == "0" * 64 and calls == [a]  # size/mtime changed: hashed again


def test_cache_report_marks_old_path_keyed_copies(tmp_path, capsys, monkeypatch):
    for name in ("SmolLM2-135M-Instruct.Q4_1-dd1349aad393", "SmolLM2-135M-Instruct.Q4_1-sha256-0123456789abcdef"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    monkeypatch.setenv("SNAPKV_CACHE", str(tmp_path))
    report = {c.path.name: c.content_keyed for c in models.cache_report()}
    assert report == {"SmolLM2-135M-Instruct.Q4_1-dd1349aad393": False,
                      "SmolLM2-135M-Instruct.Q4_1-sha256-0123456789abcdef": True}
    assert main(["models"]) == 0
    assert "(old, keyed by path)" in capsys.readouterr().out
    assert main(["models", "--clean"]) == 0
    assert [c.path.name for c in models.cache_report()] == ["SmolLM2-135M-Instruct.Q4_1-sha256-0123456789abcdef"]


def test_build_parser_adds_options_only_for_the_chosen_subcommand():
    parser = build_parser(["demo"])
    assert not hasattr(parser.parse_args(["demo"]), "budget")  # per task: run_demo fills it in
    assert parser.parse_args(["demo"]).task == "passkey"
    assert parser.parse_args(["demo", "--budget", "300"]).budget == 300


def test_bench_report_names_the_command_once_and_shows_small_caches():
    from snapkv.bench.report import _size
    from snapkv.bench.runner import command_line

    assert command_line(["/venv/bin/snapkv", "bench", "--preset", "quick"]) == "snapkv bench --preset quick"
    assert command_line(["runner.py", "--preset", "quick"]) == "snapkv bench --preset quick"
    assert (_size(3 / 1024), _size(2 / 1024**2), _size(1.5)) == ("3.0 MiB", "2 KiB", "1.50 GiB")


def test_long_question_is_refused_from_tokens_before_the_model_loads(tmp_path, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load for a refused question")

    monkeypatch.setattr(models, "load_model", no_model)
    doc = tmp_path / "doc.txt"
    doc.write_text("a document " * 50)
    question = "why " * 60
    assert main(["generate", str(doc), "--question", question, "--budget", "48", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "budget (48) must exceed the observation window, which widens to the question's" in err


def test_backend_is_passed_when_the_api_takes_it_and_engine_is_never_dropped_silently():
    import inspect

    from snapkv.api import answer
    from snapkv.demo import answer_options

    if "backend" in inspect.signature(answer).parameters:
        assert answer_options("engine") == {"backend": "engine"}
        assert answer_options("auto") == {"backend": "auto"}
    else:
        with pytest.raises(ValueError, match="backend 'engine' needs"):
            answer_options("engine")
        assert answer_options("auto") == answer_options("transformers") == {}


def test_demo_runs_end_to_end_on_the_default_model(capsys):
    assert main(["demo", "--lengths", "400", "--depths", "0.5", "--budget", "128", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "model smollm2, backend " in out and "| 128 |" in out
    assert "accuracy: full cache 1/1" in out and "x smaller" in out and "Timings (" in out
