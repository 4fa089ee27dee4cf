"""``snapkv eval``: generate tasks, run every method x mode x budget from one prefill per sample, record.

Records go to ``<out>/records.jsonl``, one line per (model, task, length, sample, method, mode,
budget), with the prompt hash, prediction, score, kept tokens and timings. A rerun with the
same arguments skips what is recorded (an interrupted run resumes; nothing is duplicated)
and refuses to mix in records whose prompt hash differs. ``report.md`` and PNG plots are
written from all records at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from snapkv.eval.methods import METHODS, MODES, applies, resolve_methods, resolve_modes
from snapkv.eval.tasks import TASKS, Codec, make_sample, resolve_tasks

#: Context windows of the named models (checked before loading anything).
KNOWN_CONTEXT: dict[str, int] = {"smollm2": 8192, "gemma3-270m": 32768}
KEY_FIELDS = ("model", "task", "length", "index", "method", "mode", "budget")


def parse_lengths(text: str) -> list[int]:
    """``"2k,4096"`` -> ``[2048, 4096]``."""
    out = []
    for part in text.split(","):
        p = part.strip().lower()
        if not p:
            continue
        mult = 1024 if p.endswith("k") else 1
        try:
            n = int(float(p.rstrip("k")) * mult)
        except ValueError as e:
            raise ValueError(f"length {part!r} is not a token count (e.g. 4096 or 4k)") from e
        if n < 64:
            raise ValueError(f"length must be at least 64 tokens, got {n}")
        out.append(n)
    return out


def parse_budgets(text: str) -> list[int | float]:
    """``"64,256,0.25"`` -> tokens (ints) and fractions of the prompt (floats in (0, 1))."""
    out: list[int | float] = []
    for part in text.split(","):
        p = part.strip()
        if not p:
            continue
        try:
            b: int | float = int(p) if p.isdigit() else float(p)
        except ValueError as e:
            raise ValueError(f"budget {part!r} is neither a token count nor a fraction") from e
        if isinstance(b, float) and not 0.0 < b < 1.0:
            raise ValueError(f"a fractional budget must lie strictly between 0 and 1, got {p}")
        out.append(b)
    return out


def check_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Validate every argument before any model work; ``ValueError`` says what is wrong."""
    tasks = resolve_tasks(args.tasks.split(","))
    methods = resolve_methods(args.methods.split(","))
    modes = resolve_modes(args.modes.split(","))
    lengths = parse_lengths(args.lengths)
    budgets = parse_budgets(args.budgets)
    if not lengths:
        raise ValueError("--lengths is empty")
    if any(m != "full" for m in methods) and not budgets:
        raise ValueError("--budgets is empty")
    for b in budgets:
        if isinstance(b, int):
            if b <= args.window:
                raise ValueError(f"budget {b} must exceed the observation window ({args.window})")
            if b >= min(lengths):
                raise ValueError(f"budget {b} tokens is not below the length {min(lengths)}: nothing would be evicted")
    limit = context_limit(args.model)
    if limit is not None and max(lengths) > limit:
        raise ValueError(f"length {max(lengths)} exceeds the context of {args.model} ({limit} tokens)")
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    return dict(tasks=tasks, methods=methods, modes=modes, lengths=lengths, budgets=budgets)


def context_limit(model: str) -> int | None:
    """The model's context window, from a table or its config file (no weights loaded)."""
    if model in KNOWN_CONTEXT:
        return KNOWN_CONTEXT[model]
    path = Path(model)
    cfg = path / "config.json" if path.is_dir() else None
    if cfg is not None and cfg.exists():
        data = json.loads(cfg.read_text())
        data = data.get("text_config", data)
        return data.get("max_position_embeddings")
    return None


#: What a ``probe`` record ran (``probe_window``): the probe voting, the context's last ``--window`` tokens kept.
PROBE_WINDOW = "probe+window"

#: ``--dtype`` choices: the weights' and activations' dtype on the CPU.
DTYPES: tuple[str, ...] = ("float32", "bfloat16")


def load(model: str, dtype: str = "float32") -> tuple[Any, Any]:
    """``(model, tokenizer)`` through :func:`snapkv.models.load_model`, weights in ``dtype``."""
    import torch

    from snapkv.models import load_model

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return load_model(model, device="cpu", dtype=getattr(torch, dtype))


def codec_for(tok: Any, prompt_format: str = "auto") -> Codec:
    """The task codec of a Hugging Face tokenizer in the requested prompt format."""
    return Codec.from_hf(tok, chat=None if prompt_format == "auto" else prompt_format == "chat")


class RecordFile:
    """Append-only JSONL of finished settings, keyed for resumption."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[tuple[Any, ...], str] = {}
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            good = []
            for line in lines:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interruption: dropped and redone
                if not line.endswith("\n"):
                    continue
                good.append(line)
                self.done[self.key(rec)] = self.signature(rec)
            if len(good) != len(lines):
                path.write_text("".join(good), encoding="utf-8")

    @staticmethod
    def signature(rec: dict[str, Any]) -> str:
        """What must match for a record to count as done: prompt hash, decode cap, window, dtype, probe window.

        ``probe`` records made before the probe kept the context's last ``window`` tokens too
        (no ``probe_window`` field) do not match today's.
        """
        sig = f"{rec['prompt_hash']}/{rec.get('max_new_tokens')}/{rec.get('window')}"
        dtype = rec.get("dtype", "float32")  # records from before --dtype ran in float32
        if dtype != "float32":
            sig += f"/{dtype}"
        if rec.get("mode") == "probe":
            sig += f"/probe-window={rec.get('probe_window', 'probe only')}"  # probe-only: a mode of its own
        return sig

    @staticmethod
    def key(rec: dict[str, Any]) -> tuple[Any, ...]:
        """The resumption key of a record."""
        return tuple(rec[k] for k in KEY_FIELDS)

    def append(self, rec: dict[str, Any]) -> None:
        """Write one record and flush it to disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[self.key(rec)] = self.signature(rec)


def settings_for(methods: Sequence[str], modes: Sequence[str], budgets: Sequence[int | float]) -> list[Any]:
    """Every (method, mode, budget) evaluated per sample, full cache first."""
    from snapkv.eval.engine import Setting

    out = [Setting("full", "query", None)] if "full" in methods else []
    for mode in modes:
        for m in methods:
            if m != "full" and applies(m, mode):
                out += [Setting(m, mode, b) for b in budgets]
    return out


def run_plan(args: argparse.Namespace, plan: dict[str, Any], model: Any, codec: Codec) -> int:
    """Evaluate everything not yet recorded; returns the number of new records."""
    from tqdm.auto import tqdm

    from snapkv.eval.engine import evaluate_sample

    records = RecordFile(Path(args.out) / "records.jsonl")
    settings = settings_for(plan["methods"], plan["modes"], plan["budgets"])
    jobs = []
    for length in plan["lengths"]:
        for index in range(args.samples):  # sample-major: a cut-short run leaves every task equally sampled
            for task in plan["tasks"]:
                sample = make_sample(task, codec, length, index, args.seed)
                todo = []
                cap = min(sample.max_new_tokens, args.max_new_tokens or sample.max_new_tokens)
                for st in settings:
                    sig = RecordFile.signature({"prompt_hash": sample.prompt_hash, "max_new_tokens": cap,
                                                "window": args.window, "dtype": args.dtype, "mode": st.mode,
                                                "probe_window": PROBE_WINDOW})
                    key = (args.model, task, length, index, st.method, st.mode, st.budget_label)
                    old = records.done.get(key)
                    if old is not None and old != sig:
                        raise ValueError(
                            f"{records.path} holds {key} made with prompt hash/decode cap/window {old}, now {sig}: "
                            "prompts or settings changed (seed, tokenizer, task code, --max-new-tokens, --window, "
                            "--dtype, the probe's window); use another --out"
                        )
                    if old is None:
                        todo.append(st)
                if todo:
                    jobs.append((sample, todo))
    total = sum(len(t) for _, t in jobs)
    written = 0
    with tqdm(total=total, desc="eval", unit="setting", disable=args.no_progress, file=sys.stderr) as bar:
        for sample, todo in jobs:
            bar.set_postfix_str(f"{sample.task}@{sample.length} #{sample.index}")
            for out, prefill_s in evaluate_sample(model, codec, sample, todo, window=args.window,
                                                  max_new_tokens=args.max_new_tokens):
                st = out.setting
                rec = {
                    "model": args.model, "task": sample.task, "length": sample.length, "index": sample.index,
                    "method": st.method, "mode": st.mode, "budget": st.budget_label,
                    "prompt_hash": sample.prompt_hash, "seed": args.seed, "window": args.window, "dtype": args.dtype,
                    **({"probe_window": PROBE_WINDOW} if st.mode == "probe" else {}),
                    "depth": sample.depth, "context_tokens": len(sample.context_ids),
                    "max_new_tokens": min(sample.max_new_tokens, args.max_new_tokens or sample.max_new_tokens),
                    "answers": list(sample.answers), "prediction": out.prediction,
                    "score": TASKS[sample.task].score(out.prediction, sample.answers),
                    "kept_tokens": round(out.kept_tokens, 1), "new_tokens": out.new_tokens,
                    "prefill_s": round(prefill_s, 3), "derive_s": round(out.derive_s, 3),
                    "decode_s": round(out.decode_s, 3), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
                records.append(rec)
                written += 1
                bar.update(1)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``snapkv eval``."""
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3-270m, an HF folder or a .gguf file")
    parser.add_argument("--tasks", default="passkey,niah_single_1,niah_single_2",
                        help=f"comma list of {sorted(TASKS)} or groups all, ruler, niah")
    parser.add_argument("--lengths", default="2k", help="prompt lengths in tokens, e.g. 2k,4k,8192")
    parser.add_argument("--budgets", default="64,128,256,512,1024",
                        help="kept tokens per layer and head (ints) or fractions of the prompt (floats < 1)")
    parser.add_argument("--methods", default="full,snapkv,pyramidkv,streaming,random,h2o",
                        help="comma list of " + ", ".join(METHODS) + " (or all)")
    parser.add_argument("--modes", default="query,context", help=f"comma list of {list(MODES)}")
    parser.add_argument("--samples", type=int, default=5, help="samples per task and length")
    parser.add_argument("--seed", type=int, default=0, help="task generation seed")
    parser.add_argument("--window", type=int, default=32, help="SnapKV observation window")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="cap on generated tokens per answer")
    parser.add_argument("--out", default="results/eval", help="folder for records.jsonl, report.md and plots")
    parser.add_argument("--prompt-format", choices=("auto", "chat", "plain"), default="auto",
                        help="chat template framing (auto: when the tokenizer has one) or plain text")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="weights and activations on the CPU (bfloat16: about 2x faster matmuls where the CPU "
                             "has AVX512-BF16/AMX; every setting of a run, the full cache too, uses it)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--report-only", action="store_true", help="only rebuild report and plots from records")
    parser.add_argument("--include", default="", help="comma list of other result folders merged into the report")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--hitrate", action="store_true",
                        help="measure the per-layer hit rate of window votes (paper section 3) instead of scores")
    parser.add_argument("--hitrate-tokens", type=int, default=16, help="generated tokens whose attention is checked")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``snapkv eval``; returns a process exit code."""
    try:
        plan = check_plan(args)
    except ValueError as e:
        print(f"snapkv eval: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if args.hitrate:
        import torch

        from snapkv.eval.hitrate import run_hitrate

        if args.threads:
            torch.set_num_threads(args.threads)
        model, tok = load(args.model, args.dtype)
        for length in plan["lengths"]:
            codec = codec_for(tok, args.prompt_format)
            png = run_hitrate(model, codec, Path(args.model).name, plan["tasks"], length, args.samples, out,
                              window=args.window, new_tokens=args.hitrate_tokens, seed=args.seed)
            print(f"snapkv eval: hit rates in {png}", file=sys.stderr)
        return 0
    if not args.report_only:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        model, tok = load(args.model, args.dtype)
        n = run_plan(args, plan, model, codec_for(tok, args.prompt_format))
        print(f"snapkv eval: {n} new records in {out / 'records.jsonl'}", file=sys.stderr)
    from snapkv.eval.report import write_report

    write_report(out, [Path(p) for p in args.include.split(",") if p])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m snapkv.eval.runner``."""
    parser = argparse.ArgumentParser(prog="snapkv eval", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
