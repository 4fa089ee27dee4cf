"""`snapkv serve`: an OpenAI-compatible server over SnapKV-compressed caches.

Example::

    snapkv serve --model smollm2 --budget 1024 --max-batch 16 --port 8000
    curl -s localhost:8000/v1/completions -H 'content-type: application/json' \\
        -d '{"model": "smollm2", "prompt": "Hello", "max_tokens": 8}'
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from snapkv.cli import parse_budget
from snapkv.config import POOLINGS, REDUCTIONS, SnapKVConfig

log = logging.getLogger("snapkv.serve")
BACKENDS: tuple[str, ...] = ("auto", "engine", "transformers")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `snapkv serve`."""
    p.add_argument("--model", default="smollm2", help="smollm2 (default), gemma3-270m, an HF folder or a .gguf")
    p.add_argument("--served-model-name", help="the model id clients send (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("SNAPKV_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $SNAPKV_API_KEY, else no key)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: float32 on CPU, else bf16")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="engine (batched, Llama-family), transformers (any model, not batched), auto (engine "
                        "when the model allows it)")
    g = p.add_argument_group("SnapKV defaults (requests override them in extra_body={'snapkv': {...}})")
    g.add_argument("--budget", type=parse_budget, default=1024, help="tokens kept per layer/head (default 1024)")
    g.add_argument("--window", type=int, default=32)
    g.add_argument("--kernel", type=int, default=31, help="odd pooling kernel of SnapKV's votes (the paper's is 7)")
    g.add_argument("--pooling", choices=POOLINGS, default="max")
    g.add_argument("--gqa-reduce", choices=REDUCTIONS, default="mean")
    g.add_argument("--layer-profile", choices=("uniform", "pyramid"), default="uniform")
    b = p.add_argument_group("batching and memory")
    b.add_argument("--max-batch", type=int, default=16, help="requests decoding at once (rows)")
    b.add_argument("--max-new-tokens", type=int, default=256, help="max_tokens when a request leaves it out")
    b.add_argument("--slot-tokens", type=int,
                   help="cache slots per row: kept prompt + max_tokens (default: budget + --max-new-tokens)")
    b.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row before 429")
    b.add_argument("--prefill-chunk", type=int, default=8192)
    b.add_argument("--doc-cache-bytes", type=int, default=256 * 1024**2,
                   help="bytes of compressed documents kept (LRU; 0 turns the document cache off)")
    b.add_argument("--doc-cache-min-tokens", type=int, default=256,
                   help="contexts at least this long use the document cache by default")
    b.add_argument("--doc-method", choices=("probe", "kvzip"), default="probe",
                   help="how documents are scored without their question: probe (a generic question votes, "
                        "default) or kvzip (context replay, about 3x the prefill's cost)")
    b.add_argument("--doc-kernel", type=int, default=31,
                   help="pooling width of the document method's scores (odd; default 31, the reuse measurements' "
                        "choice)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM before they are cancelled")
    p.add_argument("--log-level", default="info")


def _config(a: argparse.Namespace) -> SnapKVConfig:
    return SnapKVConfig(budget=a.budget, window=a.window, kernel=a.kernel, pooling=a.pooling, gqa_reduce=a.gqa_reduce)


def check_doc_args(a: argparse.Namespace) -> None:
    """``ValueError`` for bad document-method flags (before torch or the model load)."""
    if a.doc_method not in ("probe", "kvzip"):
        raise ValueError(f"--doc-method must be probe or kvzip, got {a.doc_method!r}")
    k = a.doc_kernel
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise ValueError(f"--doc-kernel must be a positive odd integer (1, 3, 5, ...), got {k!r}")
    if a.doc_method == "kvzip" and a.layer_profile != "uniform":
        raise ValueError("--doc-method kvzip selects with uniform layer budgets; use --layer-profile uniform")


def pick_backend(model: Any, wanted: str) -> tuple[str, str | None]:
    """``(backend, why the engine cannot run the model or None)``; ``engine`` on such a model raises."""
    from snapkv.generation import Engine
    from snapkv.generation.adapter import DecoderParts

    if wanted not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {wanted!r}")
    try:
        DecoderParts.from_model(model)  # the slot decode runs the hand-wired layout
        Engine(model, None)  # and its self-check against the model's own forward
        reason = None
    except ValueError as err:
        reason = str(err)
    if wanted == "engine" and reason is not None:
        raise ValueError(f"--backend engine cannot run this model: {reason}; use --backend transformers")
    if wanted == "auto":
        return ("engine" if reason is None else "transformers"), reason
    return wanted, reason


def build_server(model: Any, tokenizer: Any, a: argparse.Namespace) -> Any:
    """A :class:`~snapkv.serve.server.Server` for a loaded model and parsed flags."""
    from snapkv.serve.batcher import EngineBackend
    from snapkv.serve.doc_cache import DocCache
    from snapkv.serve.extend import doc_method, doc_token_ids
    from snapkv.serve.hf_backend import TransformersBackend
    from snapkv.serve.server import Limits, Server

    config = _config(a)
    for name in ("max_batch", "max_new_tokens", "max_queue", "prefill_chunk"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.doc_cache_bytes < 0:
        raise ValueError(f"--doc-cache-bytes must be >= 0, got {a.doc_cache_bytes}")
    check_doc_args(a)
    doc_scorer = doc_method(a.doc_method, a.doc_kernel)
    slot_tokens = a.slot_tokens
    if slot_tokens is None:
        if not isinstance(config.budget, int):
            raise ValueError("a fractional --budget needs --slot-tokens (rows are sized in tokens)")
        slot_tokens = config.budget + a.max_new_tokens
    if slot_tokens < 2:
        raise ValueError(f"--slot-tokens must be >= 2, got {slot_tokens}")
    kind, reason = pick_backend(model, a.backend)
    text = model.config.get_text_config(decoder=True)
    max_context = int(getattr(text, "max_position_embeddings", 0) or 1 << 20)
    doc_cache = DocCache(a.doc_cache_bytes if kind == "engine" else 0)
    if kind == "engine":
        backend = EngineBackend(model, rows=a.max_batch, slot_tokens=slot_tokens, doc_cache=doc_cache,
                                probe=doc_token_ids(doc_scorer, tokenizer), profile=a.layer_profile,
                                prefill_chunk=a.prefill_chunk, doc_method=doc_scorer)
        max_prompt = backend.max_prompt_tokens(max_context)
    else:
        backend = TransformersBackend(model, rows=a.max_batch, slot_tokens=slot_tokens)
        max_prompt = max_context
    log.info("backend %s%s: %d rows of %d slots, doc cache %d bytes (%s, kernel %d), prompts up to %d tokens",
             kind, f" (the engine cannot run this model: {reason})" if kind == "transformers" and reason else "",
             a.max_batch, slot_tokens, doc_cache.max_bytes, a.doc_method, a.doc_kernel, max_prompt)
    if kind == "transformers":
        log.info("backend transformers decodes one request at a time (not batched); no document cache")
    limits = Limits(max_context, max_prompt, a.max_new_tokens, a.doc_cache_min_tokens)
    return Server.for_model(model, tokenizer, a.served_model_name or a.model, backend, config, limits, doc_cache,
                            max_queue=a.max_queue, api_key=a.api_key)


def run(a: argparse.Namespace) -> int:
    """Load the model, build the server, serve until SIGTERM or Ctrl-C."""
    import uvicorn

    from snapkv.models import load_model
    from snapkv.serve.app import create_app

    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _config(a)  # bad settings fail before the model loads
    check_doc_args(a)
    import torch  # here, not at import: `snapkv serve --help` and argument errors answer at once

    dtype = getattr(torch, a.dtype) if a.dtype else (torch.float32 if a.device == "cpu" else torch.bfloat16)
    model, tokenizer = load_model(a.model, device=a.device, dtype=dtype)
    server = build_server(model, tokenizer, a)
    uvicorn.run(create_app(server), host=a.host, port=a.port, log_level=a.log_level.lower(),
                timeout_graceful_shutdown=a.shutdown_timeout)
    return 0
