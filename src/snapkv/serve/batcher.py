"""The engine backend: continuous batching of compressed caches over one captured decode step.

Every request gets a row of a :class:`~snapkv.serve.slots.SlotKVCache` for its whole life.
Its prompt is prefilled alone by the engine's layer-bounded prefill into a 1-row static cache
(in a worker thread, on its own CUDA stream, while the other rows keep decoding on a
high-priority stream), then copied into its row between two decode steps. The decode step is
the engine's :class:`~snapkv.generation.DecodeRunner` (one CUDA graph on a GPU, eager on CPU;
the fused kernels with per-row K/V writes where the model allows them) run over all rows at
once; free rows ride along masked and their outputs are ignored.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import torch

from snapkv.config import SnapKVConfig
from snapkv.generation.adapter import DecoderParts
from snapkv.generation.attention import default_prefill_backend
from snapkv.generation.decode import DecodeRunner
from snapkv.generation.generate import Engine
from snapkv.generation.memory import available_bytes, plan
from snapkv.generation.prefill import kept_per_layer, prefill
from snapkv.methods.probe import Probe
from snapkv.serve.backend import Prefilled, PrefillJob
from snapkv.serve.doc_cache import DocCache, doc_key
from snapkv.serve.extend import (
    DocMethod,
    check_doc_method,
    compress_context,
    context_slots,
    extend,
    method_for,
    new_row_cache,
)
from snapkv.serve.sampling import SamplingParams, sample_token
from snapkv.serve.slots import SlotKVCache, slot_ops

log = logging.getLogger("snapkv.serve")


class EngineBackend:
    """Batched decoding of per-request compressed caches with the engine.

    Args:
        model: a Llama-family ``*ForCausalLM`` the engine runs (else ``ValueError``).
        rows: concurrent requests (decode batch).
        slot_tokens: slots per row: a request's kept prompt tokens plus its ``max_tokens``.
        doc_cache: the document cache (``max_bytes=0`` disables it).
        probe: token ids the document method reads after a context (``doc_token_ids``): the
            probe question's, or the replay instruction's for KVzip.
        doc_method: how documents are scored context-only (``Probe`` or ``KVzip``, see
            :func:`~snapkv.serve.extend.doc_method`); default ``Probe()`` (SnapKV kernel 31).
        profile: ``"uniform"`` or ``"pyramid"`` layer budgets.
        prefill_chunk: prefill query rows per step.
        use_graph: capture the decode step as a CUDA graph (default: on CUDA).
        whole_layer_bytes: the prefill's whole-layer attention allowance (default 4 GiB on CUDA).
        fused: fused decode operations (Triton on CUDA, torch twins elsewhere) with per-row K/V
            writes; default: on CUDA when Triton imports and the model allows it.
    """

    name = "engine"
    concurrent_prefill = True

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        rows: int,
        slot_tokens: int,
        doc_cache: DocCache,
        probe: list[int],
        profile: str = "uniform",
        prefill_chunk: int = 8192,
        use_graph: bool | None = None,
        whole_layer_bytes: int | None = None,
        fused: bool | None = None,
        doc_method: DocMethod | None = None,
    ) -> None:
        self.doc_method = Probe() if doc_method is None else doc_method
        check_doc_method(self.doc_method, profile)
        self.parts = DecoderParts.from_model(model)  # ValueError for models the engine cannot run
        # The engine's construction-time self-check (its logits against the model's own forward): a model
        # with the Llama layout but another forward is refused here, not served wrong.
        Engine(model, None, use_graph=use_graph, fused=fused)
        if rows < 1:
            raise ValueError(f"rows (--max-batch) must be >= 1, got {rows}")
        self.rows, self.slot_tokens = rows, slot_tokens
        self.device = self.parts.device
        self.doc_cache, self.probe, self.profile, self.chunk = doc_cache, probe, profile, prefill_chunk
        self.attn_backend = default_prefill_backend(self.device)
        cuda = self.device.type == "cuda"
        self.whole_layer_bytes = (4 * 1024**3 if cuda else 0) if whole_layer_bytes is None else whole_layer_bytes
        p = self.parts
        self.slots = SlotKVCache(p.num_layers, rows, p.num_kv_heads, p.head_dim, slot_tokens,
                                 dtype=p.dtype, device=self.device)
        self.runner = DecodeRunner(p, self.slots, use_graph=use_graph, fused=fused)
        if self.runner.ops is not None:  # before capture: the graph records these operations
            self.runner.ops = slot_ops(self.runner.ops)
        self._decode_stream = torch.cuda.Stream(self.device, priority=-1) if cuda else None
        self._prefill_stream = torch.cuda.Stream(self.device) if cuda else None
        self._prefill_lock = threading.Lock()  # one prefill at a time
        if cuda:  # the slots were initialised on this thread's stream; the scheduler thread decodes on another
            torch.cuda.synchronize(self.device)

    # -- planning --------------------------------------------------------------------------------
    def row_slots(self, prompt_tokens: int, config: SnapKVConfig, context_tokens: int) -> int:
        """Slots a request's kept prompt takes in its row."""
        layers = self.parts.num_layers
        if context_tokens:
            return context_slots(config, context_tokens, len(self.probe), layers, self.profile,
                                 self.doc_method) + (
                prompt_tokens - context_tokens)
        return max(kept_per_layer(config, prompt_tokens, layers, self.profile))

    def max_prompt_tokens(self, limit: int) -> int:
        """The longest prompt (at most ``limit``) whose prefill fits the device's free memory now."""
        free = available_bytes(self.device)
        if free is None:
            return limit
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            need = plan(self.parts, [mid], self.slot_tokens, self.chunk, self.whole_layer_bytes).total
            lo, hi = (mid, hi) if need <= free else (lo, mid - 1)
        return lo

    # -- the scheduler's calls -------------------------------------------------------------------
    def _decode_ctx(self) -> Any:
        return torch.cuda.stream(self._decode_stream) if self._decode_stream is not None else contextlib.nullcontext()

    def warmup(self) -> None:
        """Capture the decode graph (CUDA) before any prefill runs in another thread."""
        with self._decode_ctx():
            self.runner.capture()

    def prefill(self, job: PrefillJob) -> Prefilled:
        """Prefill one request into a 1-row static cache (any thread; on its own stream on CUDA)."""
        ctx = torch.cuda.stream(self._prefill_stream) if self._prefill_stream is not None else contextlib.nullcontext()
        t0 = time.perf_counter()
        with self._prefill_lock, ctx, torch.inference_mode():
            if job.context_tokens:
                cache, logits, cached = self._prefill_with_document(job)
            else:
                (cache, logits), cached = self._prefill_plain(job), 0
            ready = None
            if self._prefill_stream is not None:
                ready = torch.cuda.Event()
                ready.record(self._prefill_stream)
        kept = max(max(row) for row in cache.kept) if cache.kept else 0
        return Prefilled(cache, logits, len(job.ids), round(kept), cached, ready, time.perf_counter() - t0)

    def _prefill_plain(self, job: PrefillJob) -> tuple[Any, torch.Tensor]:
        n = len(job.ids)
        cache = new_row_cache(self.parts, kept_per_layer(job.config, n, self.parts.num_layers, self.profile))
        row = torch.tensor(job.ids, dtype=torch.long, device=self.device)
        logits, _ = prefill(self.parts, [row], cache, config=job.config, method=method_for(job.config),
                            layer_profile=self.profile, chunk=self.chunk, backend=self.attn_backend,
                            whole_layer_bytes=self.whole_layer_bytes)
        return cache, logits[0]

    def _prefill_with_document(self, job: PrefillJob) -> tuple[Any, torch.Tensor, int]:
        context = job.ids[: job.context_tokens]
        key = doc_key(context, job.config, self.profile, repr((self.doc_method, self.probe)))
        entry = self.doc_cache.get(key)
        cached = job.context_tokens if entry is not None else 0
        if entry is None:
            entry = compress_context(self.parts, context, self.probe, job.config, profile=self.profile,
                                     chunk=self.chunk, backend=self.attn_backend,
                                     whole_layer_bytes=self.whole_layer_bytes, method=self.doc_method)
            self.doc_cache.put(key, entry)
        cache, logits = extend(self.parts, entry, job.ids[job.context_tokens :], self.attn_backend)
        return cache, logits, cached

    def _wait(self, pre: Prefilled) -> None:
        if pre.ready is not None:
            self._decode_stream.wait_event(pre.ready)

    def first_token(self, pre: Prefilled, params: SamplingParams, gen: torch.Generator | None) -> int:
        """The first generated token, from the prefill's logits."""
        with self._decode_ctx():
            self._wait(pre)
            return int(sample_token(pre.logits, params, gen))

    def load(self, row: int, pre: Prefilled) -> None:
        """Copy a prefilled request into ``row`` (between decode steps)."""
        with self._decode_ctx():
            self._wait(pre)
            self.slots.load_row(row, pre.state)
            if self._decode_stream is not None:  # the copies read memory the prefill stream allocated
                for t in (pre.state.keys, pre.state.values, pre.state.bias, pre.state.first, pre.logits):
                    t.record_stream(self._decode_stream)

    def free(self, row: int) -> None:
        """Release ``row``."""
        with self._decode_ctx():
            self.slots.free_row(row)

    @torch.inference_mode()
    def step(self, inputs: dict[int, int], samplers: dict[int, tuple[SamplingParams, Any]]) -> dict[int, int]:
        """One decode step of every row; returns the next token of each row in ``inputs``."""
        with self._decode_ctx():
            feed = [0] * self.rows
            for row, tok in inputs.items():
                feed[row] = tok
            self.runner.feed(torch.tensor(feed, dtype=torch.long).to(self.device, non_blocking=True))
            nxt = self.runner.step().clone()  # greedy tokens of every row
            for row, (params, gen) in samplers.items():
                nxt[row] = sample_token(self.runner.logits[row], params, gen)
            out = nxt.tolist()  # the one host sync of the step
        self.slots.note_step()
        return {row: out[row] for row in inputs}

    def held_bytes(self) -> int:
        """KV bytes of the busy rows' slots."""
        return self.slots.held_bytes()
