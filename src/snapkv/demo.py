"""`snapkv demo`: the same questions answered with the full cache and with SnapKV, side by side.

Two tasks:

* ``passkey``: Landmark-attention passkey retrieval (the default model, SmolLM2-135M, answers it);
* ``essays``: factual questions about Paul Graham essays (real text; small models answer them wrongly
  even with the full cache, so this task defaults to the opt-in Qwen2.5-Coder-1.5B).

The table shows what SnapKV wins on any machine, the KV-cache memory; timings come in a second
table labelled with the machine's load during the run (on a busy machine they are not benchmarks).
Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import inspect
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

from snapkv.config import SnapKVConfig
from snapkv.data import essay
from snapkv.eval.tasks.haystack import NOISE
from snapkv.eval.tasks.passkey import ANSWER_PREFIX, DESCRIPTION, needle
from snapkv.eval.tasks.passkey import QUESTION as _ASK

TASKS: tuple[str, ...] = ("passkey", "essays")
#: The model each task uses unless ``--model`` says otherwise.
TASK_MODELS: dict[str, str] = {"passkey": "smollm2", "essays": "qwen2.5-coder-1.5b"}
#: The budget each task uses unless ``--budget`` says otherwise: about 4-5x compression of its prompts.
TASK_BUDGETS: dict[str, int] = {"passkey": 512, "essays": 256}

#: The passkey question with its answer prefix: Landmark's plain completion prompt (``snapkv eval``'s text).
QUESTION = _ASK + ANSWER_PREFIX


@dataclass(frozen=True)
class Sample:
    """One question about one document, and the strings any of which a right answer contains."""

    label: str
    context: str
    question: str
    expected: tuple[str, ...]

    def correct(self, text: str) -> bool:
        """Whether ``text`` holds one of the expected strings as a whole word (case-insensitive): "8" is not "2008"."""
        return any(re.search(rf"(?<!\w){re.escape(e)}(?!\w)", text, re.IGNORECASE) for e in self.expected)


#: Essay questions: (essay, question, accepted answers). The facts sit in the essay's body (words 100-360
#: of the 1,000 kept), not its end, so the cache must keep them. Qwen2.5-Coder-0.5B answers all five with
#: the full cache (measured 2026-11-30).
ESSAY_QUESTIONS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("submarine", "How much did the author's startup pay its PR firm each month?", ("16,000", "16000")),
    ("submarine", "In 18 months, in how many different publications did the PR firm get press hits?", ("60",)),
    ("boss", "According to the essay, groups of what size work well?", ("8", "eight")),
    ("vb", "How many weekends do you get with your 2 year old?", ("52", "fifty-two")),
    ("copy", "What was the author's major for most of college?", ("philosophy",)),
)
#: Essays are cut at the first sentence end after this many words (about 1,300 tokens): CPU prefill time.
ESSAY_WORDS = 1000


def passkey_context(tokenizer: Any, length: int, depth: float, key: int) -> str:
    """A Landmark-attention passkey context of about ``length`` tokens, the key at ``depth`` in [0, 1].

    The text of ``snapkv eval``'s passkey task (:mod:`snapkv.eval.tasks.passkey`), sized in
    whole filler sentences for :func:`snapkv.api.answer`, which takes text, not token ids.
    """
    line = needle(key)
    per = len(tokenizer(" " + NOISE, add_special_tokens=False)["input_ids"])
    fixed = len(tokenizer(f"{DESCRIPTION} {line} {QUESTION}", add_special_tokens=False)["input_ids"]) + 16
    n = max(1, (length - fixed) // per)
    before = round(n * depth)
    return "\n".join([DESCRIPTION, " ".join([NOISE] * before), line, " ".join([NOISE] * (n - before))])


def passkey_samples(tokenizer: Any, lengths: list[int], depths: list[float], seed: int = 0) -> list[Sample]:
    """One passkey sample per (length, depth), keys drawn from ``seed``."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        for d in depths:
            key = rng.randrange(10000, 100000)
            out.append(Sample(f"{n // 1024}K @ {d:.2f}" if n % 1024 == 0 else f"{n} @ {d:.2f}",
                              passkey_context(tokenizer, n, d, key), QUESTION, (str(key),)))
    return out


def essay_samples(limit: int | None = None) -> list[Sample]:
    """The essay questions of :data:`ESSAY_QUESTIONS` (the first ``limit``)."""
    return [Sample(name, essay(name, ESSAY_WORDS), q, answers) for name, q, answers in ESSAY_QUESTIONS[:limit]]


def validate(task: str, lengths: list[int], depths: list[float], max_new_tokens: int) -> None:
    """``ValueError`` naming the parameter for bad demo settings (no model needed)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if any(n < 64 for n in lengths):
        raise ValueError(f"lengths must be prompt sizes of at least 64 tokens, got {lengths}")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must lie in [0, 1] (0: needle at the start, 1: at the end), got {depths}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


@dataclass
class DemoRow:
    """One sample answered with the full cache and with SnapKV."""

    sample: Sample
    full: Any  # snapkv.api.Answer
    snap: Any

    def correct(self, a: Any) -> bool:
        """Whether answer ``a`` is right."""
        return self.sample.correct(a.text)


@dataclass
class DemoRun:
    """The rows and the conditions they were measured under."""

    rows: list[DemoRow]
    config: SnapKVConfig
    model: str
    backend: str
    load_avg: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at the start and the end
    cores: int = 1
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def answer_options(backend: str) -> dict[str, Any]:
    """Keyword arguments selecting ``backend`` for :func:`snapkv.api.answer`.

    ``auto`` or ``transformers`` pass nothing to an ``answer()`` without a ``backend`` parameter (it
    runs the transformers path); asking for ``engine`` there raises ``ValueError``.
    """
    from snapkv.api import answer

    if "backend" in inspect.signature(answer).parameters:
        return {"backend": backend}
    if backend == "engine":
        raise ValueError("backend 'engine' needs a snapkv.api.answer() with a backend option, which this "
                         "installed version lacks; use --backend transformers")
    return {}


def runs_on_engine(model: Any, backend: str) -> bool:
    """Whether ``answer(backend=...)`` will run the engine (False with an api that has no engine dispatch)."""
    try:
        from snapkv.generation.answer import resolve_backend
    except ImportError:
        return False
    return resolve_backend(model, backend) == "engine"


def run_demo(
    model: Any, tokenizer: Any, samples: list[Sample], config: SnapKVConfig, *, chat: bool | None,
    max_new_tokens: int = 8, backend: str = "auto", model_name: str = "", progress: bool = True,
) -> DemoRun:
    """Answer every sample with both caches; per-sample and per-phase (per-layer prefill) progress on stderr."""
    from tqdm import tqdm

    from snapkv.api import answer
    from snapkv.progress import prefill_progress

    opts: dict[str, Any] = {"chat": chat, "max_new_tokens": max_new_tokens, **answer_options(backend)}
    cores = os.cpu_count() or 1
    start_load, t0 = os.getloadavg()[0], time.perf_counter()
    layer_bars = progress and not runs_on_engine(model, backend)  # the engine's prefill runs no layer modules
    rows = []
    bar = tqdm(samples, desc="demo", unit="sample", disable=not progress)
    for s in bar:
        got = {}
        for phase, compress in (("full cache", False), ("SnapKV", True)):
            bar.set_postfix_str(f"{s.label}: {phase}")
            with prefill_progress(model, f"  prefill ({phase})", enabled=layer_bars, position=1):
                got[phase] = answer(model, tokenizer, s.context, s.question, config, compress=compress, **opts)
        rows.append(DemoRow(s, got["full cache"], got["SnapKV"]))
    backends = {getattr(a, "backend", "transformers") for r in rows for a in (r.full, r.snap)}
    return DemoRun(rows, config, model_name, "/".join(sorted(backends)), (start_load, os.getloadavg()[0]), cores,
                   time.perf_counter() - t0)


def _short(text: str, n: int = 28) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= n else text[: n - 1] + "…")


def _mark(row: DemoRow, a: Any, n: int = 28) -> str:
    """ok/MISS and the answer, shortened around the expected string when that is where it appears."""
    text = " ".join(a.text.split())
    for e in row.sample.expected:
        i = text.lower().find(e.lower())
        if i + len(e) > n:  # found past the cut: show the words around it
            return ("ok " if row.correct(a) else "MISS ") + repr("…" + text[max(0, i - 12): i + len(e) + 8] + "…")
    return ("ok " if row.correct(a) else "MISS ") + _short(text, n)


def demo_table(run: DemoRun) -> str:
    """Markdown: answers and KV memory per sample, totals, then timings labelled with the machine's load."""
    c, mib = run.config, 1 / 2**20
    out = [
        f"model {run.model}, backend {run.backend}; SnapKV budget={c.budget} window={c.window} kernel={c.kernel} "
        f"pooling={c.pooling}",
        "",
        "| sample | prompt tokens | expected | full cache answer | SnapKV answer | kept tokens per layer/head "
        "| KV MiB full -> SnapKV |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in run.rows:
        f, s = r.full, r.snap
        ratio = f.kv_bytes_full / s.kv_bytes_kept if s.kv_bytes_kept else float("nan")
        out.append(f"| {r.sample.label} | {f.prompt_tokens} | {r.sample.expected[0]} | {_mark(r, f)} | {_mark(r, s)} "
                   f"| {s.kept_tokens} | {f.kv_bytes_full * mib:.1f} -> {s.kv_bytes_kept * mib:.1f} "
                   f"({ratio:.1f}x smaller) |")
    n = len(run.rows)
    acc_f = sum(r.correct(r.full) for r in run.rows)
    acc_s = sum(r.correct(r.snap) for r in run.rows)
    full_b = sum(r.full.kv_bytes_full for r in run.rows)
    kept_b = sum(r.snap.kv_bytes_kept for r in run.rows)
    out += ["", f"accuracy: full cache {acc_f}/{n}, SnapKV {acc_s}/{n}; KV cache kept by SnapKV: "
                f"{kept_b * mib:.1f} of {full_b * mib:.1f} MiB ({100 * kept_b / max(1, full_b):.0f}%)"]
    out += ["", *timing_table(run)]
    return "\n".join(out)


def timing_table(run: DemoRun) -> list[str]:
    """Prefill and decode times, headed by the load the machine was under while they were measured."""
    busy = max(run.load_avg) / run.cores
    head = (f"Timings ({run.backend} backend; 1-minute load average {run.load_avg[0]:.1f} -> {run.load_avg[1]:.1f} "
            f"on {run.cores} cores; demo wall time {run.wall_s:.0f} s)")
    if busy > 0.5:
        head += (": the machine was busy with other work, so these are loaded-machine times, not benchmarks; "
                 "the KV memory above is exact either way")
    out = [head + ":", "", "| sample | prefill s full / SnapKV | decode ms/token full / SnapKV |", "|---|---|---|"]
    for r in run.rows:
        f, s = r.full, r.snap
        out.append(f"| {r.sample.label} | {f.prefill_s:.2f} / {s.prefill_s:.2f} | "
                   f"{f.decode_ms_per_token:.1f} / {s.decode_ms_per_token:.1f} |")
    return out
