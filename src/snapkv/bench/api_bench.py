"""The documented API against the engine and the transformers path, in one run.

For each prompt length, on one model (random weights of a real shape by default):

* ``engine``: ``snapkv bench``'s engine point (:func:`snapkv.bench.measure.measure`, SnapKV budget);
* ``answer/auto``, ``answer/transformers``: :func:`snapkv.api.answer` with that backend;
* ``context/auto``, ``context/transformers``: :class:`snapkv.api.ContextCache` (context-only,
  ``probe=False``), one ``ask()`` after the context is compressed;
* ``probe/auto``: ``ContextCache``'s default reuse scorer (:class:`snapkv.methods.Probe`: the
  context plus a probe question compressed, the probe cut): its ``context_prefill_s`` against
  ``context/auto``'s is the query-agnostic scorer's cost.

Each row: the backend that ran, TTFT (answer: ``prefill_s``; context: compressing the context,
then feeding the question), decode ms/token (median step for the engine point; the answer's
decode seconds over its tokens after the first, graph capture excluded and reported), peak GiB
(``torch.cuda.max_memory_allocated`` since the row started). A character-level tokenizer
(:func:`char_tokenizer`, one token per character) turns random text into exactly the prompt
length. Out-of-memory is reported per row and the run carries on.

    python -m snapkv.bench.api_bench --model llama3-8b --lengths 32K,128K --budget 2048 --out runs/api
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import string
import time
from pathlib import Path
from typing import Any

import torch

from snapkv.api import ContextCache, answer
from snapkv.bench.measure import Options, Point, measure
from snapkv.bench.models import load_bench_model
from snapkv.bench.runner import _length, _list, environment
from snapkv.config import SnapKVConfig

GiB = 1024**3
QUESTION = "\nWhat is the key? "  # shorter than the window: the window does not widen
ROWS: tuple[str, ...] = ("engine", "answer/auto", "answer/transformers", "context/auto", "context/transformers",
                         "probe/auto", "probe/transformers")


def char_tokenizer(size: int = 0) -> Any:
    """A fast tokenizer with one token per printable ASCII character (ids 4..), eos ``</s>`` = 2.

    Built with ``tokenizers`` (no download); offsets, ``decode`` and specials behave as a real
    tokenizer's, so :func:`snapkv.api.split_prompt` works on it unchanged. ``size`` above 101
    adds Latin-1 and further characters so that ids up to ``size - 1`` each decode to one character.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for ch in string.printable:
        if ch not in "\r\x0b\x0c":
            vocab[ch] = len(vocab)
    extra = 0x00C0
    while len(vocab) < size:
        vocab[chr(extra)] = len(vocab)
        extra += 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def random_context(n: int, seed: int = 0) -> str:
    """``n`` random letters, digits and spaces (``n`` tokens with :func:`char_tokenizer`)."""
    rng = random.Random(seed + n)
    return "".join(rng.choice(string.ascii_letters + string.digits + "   ") for _ in range(n))


def _reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def _answer_row(ans: Any, ttft: float) -> dict[str, Any]:
    steps = max(1, len(ans.tokens) - 1)
    return dict(backend=ans.backend, ttft_s=ttft, decode_ms=1000.0 * ans.decode_s / steps, tokens=len(ans.tokens),
                capture_s=ans.capture_s, kept_tokens=ans.kept_tokens, kv_gib_kept=ans.kv_bytes_kept / GiB)


def measure_row(kind: str, model: torch.nn.Module, tok: Any, n: int, budget: int, new_tokens: int,
                opts: Options) -> dict[str, Any]:
    """One row of the table: ``kind`` in :data:`ROWS` at prompt length ``n``."""
    device = next(model.parameters()).device
    config = SnapKVConfig(budget=budget, window=opts.window, kernel=opts.kernel, pooling=opts.pooling)
    row: dict[str, Any] = dict(row=kind, length=n, budget=budget, status="ok")
    _reset(device)
    t0 = time.perf_counter()
    try:
        if kind == "engine":
            res = measure(model, Point("snapkv", n, 1, budget), opts)
            row.update(backend="engine", status=res.status, message=res.message, ttft_s=res.ttft_s,
                       decode_ms=res.decode_ms, capture_s=res.capture_s, kv_gib_kept=res.kept_kv_gib)
        elif kind.startswith("answer/"):
            context = random_context(n - len(QUESTION))
            ans = answer(model, tok, context, QUESTION, config, max_new_tokens=new_tokens, chat=False,
                         backend=kind.split("/")[1])
            row.update(_answer_row(ans, ans.prefill_s))
        elif kind.startswith(("context/", "probe/")):
            context = random_context(n - len(QUESTION))
            # context/: probe=False, plain context-only; probe/: the default Probe() (kernel 31)
            probe = None if kind.startswith("probe/") else False
            with ContextCache(model, tok, context, config, chat=False, probe=probe, backend=kind.split("/")[1]) as doc:
                ans = doc.ask(QUESTION, max_new_tokens=new_tokens)
                row.update(_answer_row(ans, ans.prefill_s), context_prefill_s=doc.prefill_s,
                           question_s=ans.prefill_s - doc.prefill_s)
        else:
            raise ValueError(f"row must be one of {ROWS}, got {kind!r}")
    except torch.OutOfMemoryError as err:
        row.update(status="oom", message=str(err).splitlines()[0][:300])
    except MemoryError as err:  # the engine's NotEnoughMemoryError, predicted before the prefill
        row.update(status="oom", message=str(err)[:300])
    except Exception as err:  # a broken row must not lose the others (e.g. a failed self-check)
        row.update(status="error", message=f"{type(err).__name__}: {err}"[:500])
    row["peak_gib"] = _peak(device)
    row["wall_s"] = time.perf_counter() - t0
    _reset(device)
    return row


def _markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    def f(x: Any, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    lines = [f"# Documented API vs engine vs transformers ({meta.get('device')})", "",
             f"model {meta.get('model')}, torch {meta.get('torch')}, transformers {meta.get('transformers')}, "
             f"{meta.get('date')}", "",
             "| row | backend | prompt | status | TTFT s | context s | decode ms/token | capture s | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r.get('backend', '-')} | {r['length']} | {r['status']} | "
                     f"{f(r.get('ttft_s'), '.2f')} | {f(r.get('context_prefill_s'), '.2f')} | "
                     f"{f(r.get('decode_ms'), '.2f')} | {f(r.get('capture_s'), '.2f')} | "
                     f"{f(r.get('peak_gib'), '.1f')} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the API benchmark."""
    parser.add_argument("--model", default="llama3-8b", help="random shape or offline model (bench/models.py)")
    parser.add_argument("--model-layers", type=int, default=None, help="override the model's depth")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--lengths", type=_list(_length), default=[32 * 1024, 128 * 1024], help="e.g. 32K,128K")
    parser.add_argument("--budget", type=int, default=2048, help="SnapKV budget (tokens per layer and KV head)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per answer")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps of the engine row")
    parser.add_argument("--rows", type=_list(str), default=list(ROWS), help=f"subset of {','.join(ROWS)}")
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; later rows are skipped")
    parser.add_argument("--out", type=Path, required=True, help="output folder (api_bench.json, api_bench.md)")


def run(args: argparse.Namespace) -> int:
    """Measure every row at every length; write JSON and markdown under ``args.out``."""
    bad = [r for r in args.rows if r not in ROWS]
    if bad:
        raise ValueError(f"rows must be among {ROWS}, got {bad}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t_start = time.perf_counter()
    model, description = load_bench_model(args.model, device=device, num_layers=args.model_layers)
    tok = char_tokenizer()
    meta = environment(device, model, description)
    meta.update(budget=args.budget, new_tokens=args.new_tokens, question=QUESTION,
                command="python -m snapkv.bench.api_bench " + " ".join(
                    f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None))
    opts = Options(steps=args.steps)
    print(f"# {meta['device']} | {description} | torch {meta['torch']} | transformers {meta['transformers']}",
          flush=True)
    t0 = time.perf_counter()  # warm-up (discarded): Triton JIT, cuBLAS/cuDNN handles, the self-check
    for kind in args.rows if device.type == "cuda" else ():
        measure_row(kind, model, tok, min(2048, min(args.lengths)), min(args.budget, 1024), 4, opts)
    meta["warmup_s"] = time.perf_counter() - t0
    from snapkv.generation import Engine
    from snapkv.generation.answer import engine_refusal

    if engine_refusal(model) is None:  # the self-check's error on this model and dtype (tolerance margin)
        try:
            meta["self_check_error"] = Engine(model, None).self_check_error
        except ValueError as err:
            meta["self_check_error"] = str(err)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for n in args.lengths:
        for kind in args.rows:
            if args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
                row = dict(row=kind, length=n, budget=args.budget, status="skipped", message="time budget used up")
            else:
                row = measure_row(kind, model, tok, n, args.budget, args.new_tokens, opts)
            rows.append(row)
            print(json.dumps(row), flush=True)
            (args.out / "api_bench.json").write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    md = _markdown(meta, rows)
    (args.out / "api_bench.md").write_text(md)
    print(md)
    return 0 if all(r["status"] in ("ok", "oom", "skipped") for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m snapkv.bench.api_bench``."""
    parser = argparse.ArgumentParser(prog="python -m snapkv.bench.api_bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
