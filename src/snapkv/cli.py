"""The `snapkv` command: demo, generate, eval, bench. It parses arguments and calls the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from snapkv.config import POOLINGS, REDUCTIONS, SnapKVConfig


def _budget(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            msg = f"budget must be tokens (int) or a fraction in (0, 1], got {text!r}"
            raise argparse.ArgumentTypeError(msg) from None


def _add_config(p: argparse.ArgumentParser, budget: int | float) -> None:
    g = p.add_argument_group("SnapKV")
    g.add_argument("--budget", type=_budget, default=budget, help="tokens kept per layer/head (int) or fraction kept")
    g.add_argument("--window", type=int, default=32, help="observation window (default 32)")
    g.add_argument("--kernel", type=int, default=7, help="odd pooling kernel (default 7)")
    g.add_argument("--pooling", choices=POOLINGS, default="max")
    g.add_argument("--gqa-reduce", choices=REDUCTIONS, default="mean")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="smollm2 (default), gemma3-270m, an HF folder or a .gguf")
    p.add_argument("--device", default="cpu")
    p.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2)")


def _config(a: argparse.Namespace) -> SnapKVConfig:
    return SnapKVConfig(budget=a.budget, window=a.window, kernel=a.kernel, pooling=a.pooling, gqa_reduce=a.gqa_reduce)


def _cmd_demo(a: argparse.Namespace) -> int:
    from snapkv.demo import demo_table, run_demo
    from snapkv.models import load_model

    config = _config(a)
    model, tok = load_model(a.model, device=a.device, attn_implementation=a.attn)
    rows = run_demo(model, tok, a.lengths, a.depths, config, seed=a.seed)
    print(demo_table(rows, config))
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    from snapkv.api import answer
    from snapkv.models import load_model

    config = _config(a)
    context = open(a.prompt_file).read() if a.prompt_file not in (None, "-") else sys.stdin.read()
    question = a.question or ""
    if not question:  # the prompt's own end is the question: split at the last window
        context, question = context, ""
    model, tok = load_model(a.model, device=a.device, attn_implementation=a.attn)
    res = answer(model, tok, context, question or "\n", config, max_new_tokens=a.max_new_tokens,
                 compress=not a.full)
    fields = {
        "answer": res.text, "prompt_tokens": res.prompt_tokens, "kept_tokens": res.kept_tokens,
        "kv_bytes_full": res.kv_bytes_full, "kv_bytes_kept": res.kv_bytes_kept,
        "prefill_s": round(res.prefill_s, 4), "decode_ms_per_token": round(res.decode_ms_per_token, 2),
    }
    if a.json:
        print(json.dumps(fields))
    else:
        print(res.text)
        print("\n".join(f"  {k}: {v}" for k, v in fields.items() if k != "answer"), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `snapkv` command."""
    parser = argparse.ArgumentParser(prog="snapkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="passkey retrieval, full cache vs SnapKV, on the default model")
    _add_model(demo)
    _add_config(demo, 512)
    demo.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    demo.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)

    gen = sub.add_parser("generate", help="answer a prompt from a file or stdin with a compressed cache")
    _add_model(gen)
    _add_config(gen, 1024)
    gen.add_argument("prompt_file", nargs="?", default="-", help="file holding the context (default: stdin)")
    gen.add_argument("--question", help="question placed after the context, inside the observation window")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--full", action="store_true", help="use the full cache (for comparison)")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(func=_cmd_generate)

    for name, module, text in (("eval", "snapkv.eval.runner", "offline long-context evaluation suite"),
                               ("bench", "snapkv.bench.runner", "speed and memory benchmark"),
                               ("serve", "snapkv.serve.cli", "OpenAI-compatible server over compressed caches")):
        try:
            mod = __import__(module, fromlist=["add_arguments", "run"])
        except ImportError:
            continue
        p = sub.add_parser(name, help=text)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `snapkv` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"snapkv {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
