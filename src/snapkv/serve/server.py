"""The server's state: model, tokenizer, backend, scheduler, document cache, limits.

:meth:`Server.prepare` turns a validated OpenAI request into a scheduler
:class:`~snapkv.serve.scheduler.Request`: it renders and tokenizes the prompt, finds the
document (context) part, merges the SnapKV settings and checks every limit, raising
:class:`~snapkv.serve.protocol.APIError` (400) naming the limit before any model work.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

from snapkv.api import DEFAULT_PROBE
from snapkv.config import SnapKVConfig
from snapkv.serve.backend import Backend, PrefillJob
from snapkv.serve.doc_cache import DocCache
from snapkv.serve.metrics import ServerMetrics
from snapkv.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from snapkv.serve.sampling import SamplingParams
from snapkv.serve.scheduler import Request, Scheduler

log = logging.getLogger("snapkv.serve")


@dataclass
class Limits:
    """What one request may ask for.

    Attributes:
        max_context: prompt plus generated tokens (the model's positions).
        max_prompt_tokens: longest prompt the device's memory can prefill.
        default_max_tokens: ``max_tokens`` when the request leaves it out (capped by the row's room).
        doc_min_tokens: contexts at least this long use the document cache unless the request says no.
    """

    max_context: int
    max_prompt_tokens: int
    default_max_tokens: int = 256
    doc_min_tokens: int = 256


class Server:
    """Everything the HTTP layer needs.

    Args:
        model_name: the id served under ``/v1/models`` (requests must name it).
        tokenizer: the model's tokenizer.
        eos_ids: token ids that end a generation.
        backend: the model runner.
        config: default SnapKV settings (requests override fields).
        limits: request limits.
        doc_cache: the document cache.
        max_queue: waiting requests at most (then 429).
        api_key: required bearer token, or None.
    """

    def __init__(self, model_name: str, tokenizer: Any, eos_ids: list[int], backend: Backend,
                 config: SnapKVConfig, limits: Limits, doc_cache: DocCache, *, max_queue: int = 64,
                 api_key: str | None = None) -> None:
        self.model_name, self.tokenizer, self.eos_ids = model_name, tokenizer, eos_ids
        self.backend, self.config, self.limits, self.doc_cache = backend, config, limits, doc_cache
        self.api_key = api_key
        self.metrics = ServerMetrics()
        self.scheduler = Scheduler(backend, max_queue=max_queue, metrics=self.metrics)
        self.metrics.bind(self.scheduler.stats, doc_cache)
        self.created = int(time.time())

    @classmethod
    def for_model(cls, model: Any, tokenizer: Any, model_name: str, backend: Backend, config: SnapKVConfig,
                  limits: Limits, doc_cache: DocCache, **kwargs: Any) -> Server:
        """A server for a transformers model (its eos ids from its generation config and tokenizer)."""
        return cls(model_name, tokenizer, eos_ids(model, tokenizer), backend, config, limits, doc_cache, **kwargs)

    def start(self) -> None:
        """Start the scheduler thread."""
        self.scheduler.start()

    def stop(self) -> None:
        """Cancel what is running and stop the scheduler."""
        self.scheduler.stop()
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def health(self) -> dict[str, Any]:
        """Liveness plus the counts tests and operators watch (rows, queue, bytes)."""
        return {"status": "ok", "model": self.model_name, "backend": self.backend.name,
                "slot_tokens": self.backend.slot_tokens, **self.scheduler.stats(),
                "doc_cache_bytes": self.doc_cache.bytes, "doc_cache_entries": len(self.doc_cache),
                "doc_cache_hits": self.doc_cache.hits, "doc_cache_misses": self.doc_cache.misses}

    # -- requests --------------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        """404 unless ``name`` is the served model."""
        if name != self.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def _config(self, body: ChatCompletionRequest | CompletionRequest) -> SnapKVConfig:
        opts = body.snapkv
        fields = {k: v for k, v in (opts.model_dump() if opts else {}).items()
                  if v is not None and k not in ("doc_cache", "context_prefix_chars")}
        try:
            return dataclasses.replace(self.config, **fields)
        except ValueError as err:
            name = str(err).split()[0]
            param = f"snapkv.{name}" if name in fields or name in ("budget", "window") else "snapkv"
            raise APIError(400, str(err), param=param, code="invalid_value") from None

    def _tokens(self, body: ChatCompletionRequest | CompletionRequest) -> tuple[list[int], int]:
        """Prompt ids and the length of the context part (0: none marked)."""
        tok = self.tokenizer
        opts = body.snapkv
        if isinstance(body, ChatCompletionRequest):
            if opts is not None and opts.context_prefix_chars is not None:
                raise APIError(400, "context_prefix_chars applies to /v1/completions; in a chat the context is "
                               "every message before the last user message", param="snapkv.context_prefix_chars")
            msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
            if getattr(tok, "chat_template", None) is None:
                raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
            cut = 0
            if users and msgs[users[-1]]["content"]:
                cut = text.rindex(msgs[users[-1]]["content"])
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        else:
            prompt = body.prompt
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
                if opts is not None and opts.context_prefix_chars is not None:
                    raise APIError(400, "context_prefix_chars needs a text prompt", param="snapkv.context_prefix_chars")
                return list(prompt), 0
            if isinstance(prompt, list):
                if len(prompt) != 1:
                    raise APIError(400, f"one prompt per request, got {len(prompt)}", param="prompt")
                prompt = prompt[0]
            cut = opts.context_prefix_chars if opts is not None and opts.context_prefix_chars else 0
            if cut > len(prompt):
                raise APIError(400, f"context_prefix_chars ({cut}) exceeds the prompt's {len(prompt)} characters",
                               param="snapkv.context_prefix_chars")
            enc = tok(prompt, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        context = next((i for i, (_, end) in enumerate(offsets) if end > cut), len(ids)) if cut else 0
        return ids, context

    def prepare(self, body: ChatCompletionRequest | CompletionRequest, on_event: Any) -> Request:
        """Validate and tokenize one request (400 naming the limit or parameter)."""
        self.check_model(body.model)
        config = self._config(body)
        stop = body.stops()
        ids, context = self._tokens(body)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt" if isinstance(body, CompletionRequest)
                           else "messages")
        opts = body.snapkv
        use_doc = opts.doc_cache if opts is not None and opts.doc_cache is not None else None
        if use_doc is None:
            use_doc = (opts is not None and opts.context_prefix_chars is not None) or (
                self.doc_cache.enabled and context >= self.limits.doc_min_tokens)
        if use_doc and not self.doc_cache.enabled:
            raise APIError(400, "the document cache is off (--doc-cache-bytes 0)", param="snapkv.doc_cache")
        if use_doc and not 0 < context < len(ids):
            raise APIError(400, f"the document cache needs a context followed by at least one token; this prompt "
                           f"has {context} context tokens of {len(ids)}", param="snapkv.doc_cache")
        context = context if use_doc else 0
        n, lim = len(ids), self.limits
        where = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
        if n >= lim.max_context:
            raise APIError(400, f"prompt of {n} tokens exceeds the model's context of {lim.max_context} tokens "
                           "(less one token to generate)", param=where, code="context_length_exceeded")
        if n > lim.max_prompt_tokens:
            raise APIError(400, f"prompt of {n} tokens exceeds the {lim.max_prompt_tokens} tokens this server's "
                           "free device memory can prefill", param=where, code="context_length_exceeded")
        try:
            slots = self.backend.row_slots(n, config, context)
        except ValueError as err:
            raise APIError(400, str(err), param="snapkv", code="invalid_value") from None
        room = min(self.backend.slot_tokens - slots, lim.max_context - n)
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        if room < 1:
            raise APIError(400, f"the prompt keeps {slots} tokens, which leaves no room to generate in a row of "
                           f"{self.backend.slot_tokens} slots (--slot-tokens); lower snapkv.budget", param=param,
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(lim.default_max_tokens, room)
        elif n + max_tokens > lim.max_context:
            raise APIError(400, f"prompt ({n}) + {param} ({max_tokens}) exceeds the model's context of "
                           f"{lim.max_context} tokens", param=param, code="context_length_exceeded")
        elif slots + max_tokens > self.backend.slot_tokens:
            raise APIError(400, f"kept prompt tokens ({slots}) + {param} ({max_tokens}) exceed the "
                           f"{self.backend.slot_tokens} tokens of a row (--slot-tokens); at most {room}",
                           param=param, code="context_length_exceeded")
        temperature = 1.0 if body.temperature is None else float(body.temperature)
        top_p = 1.0 if body.top_p is None else float(body.top_p)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=body.seed,
                                stop=stop, eos_ids=self.eos_ids)
        return Request(PrefillJob(ids, config, context), params, on_event, tokenizer=self.tokenizer)

    def probe_ids(self) -> list[int]:
        """Token ids of the probe question that compresses documents context-only."""
        return probe_ids(self.tokenizer)


def probe_ids(tokenizer: Any) -> list[int]:
    """Token ids of :data:`snapkv.api.DEFAULT_PROBE`."""
    return list(tokenizer(DEFAULT_PROBE, add_special_tokens=False)["input_ids"])


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a generation: the generation config's and the tokenizer's."""
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) is not None else None
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
