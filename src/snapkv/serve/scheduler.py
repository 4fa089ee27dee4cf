"""The scheduler: one thread owns the model; requests queue, get a row, decode together, leave.

Each loop turn: drop cancelled requests, put a finished prefill into its row, start the next
prefill if a row is free (in a worker thread when the backend allows it, so the running rows
keep decoding), then run one decode step for every busy row and hand each request its token.
Requests talk back through a callback (``on_event(kind, payload)``) called from this thread:
``("delta", text)``, ``("done", Completion)`` or ``("error", (status, message))``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from snapkv.serve.backend import Backend, Prefilled, PrefillJob
from snapkv.serve.sampling import SamplingParams, make_generator
from snapkv.serve.textstream import TextStream

log = logging.getLogger("snapkv.serve")
_ids = itertools.count()


class QueueFullError(RuntimeError):
    """The queue holds ``max_queue`` requests already."""


@dataclass
class Completion:
    """How a request ended."""

    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    kept_tokens: int
    cached_tokens: int
    ttft_s: float
    decode_s: float
    text: str


@dataclass(eq=False)
class Request:
    """One generation request and its progress (mutated by the scheduler thread only)."""

    job: PrefillJob
    params: SamplingParams
    on_event: Callable[[str, Any], None]
    tokenizer: Any = None  # None: no text (token ids only, e.g. benchmarks)
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    created: float = field(default_factory=time.perf_counter)
    tokens: list[int] = field(default_factory=list)
    row: int | None = None
    pre: Prefilled | None = None
    first_at: float | None = None
    token_times: list[float] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False

    def __post_init__(self) -> None:
        self.text = TextStream(self.tokenizer, self.params.stop) if self.tokenizer is not None else None
        self.gen = None


class Scheduler:
    """Continuous batching over a backend's rows.

    Args:
        backend: the model runner.
        max_queue: requests waiting for a row at most; more raise :class:`QueueFullError`.
        metrics: optional :class:`~snapkv.serve.metrics.ServerMetrics`.
    """

    def __init__(self, backend: Backend, *, max_queue: int = 64, metrics: Any = None) -> None:
        self.backend, self.max_queue, self.metrics = backend, max_queue, metrics
        self._cv = threading.Condition()
        self._pending: collections.deque[Request] = collections.deque()
        self._rows: dict[int, Request] = {}
        self._prefilling: tuple[Request, concurrent.futures.Future] | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="snapkv-prefill")
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="snapkv-scheduler", daemon=True)
        self._started = threading.Event()
        self.error: BaseException | None = None
        self.step_times: collections.deque[float] = collections.deque(maxlen=4096)  # last decode steps' seconds
        self.steps = 0  # decode steps run since start

    # -- public (any thread) ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the scheduler thread (warms up the backend first)."""
        self._thread.start()
        self._started.wait()
        if self.error is not None:
            raise self.error

    def submit(self, request: Request) -> None:
        """Queue a request; raises :class:`QueueFullError` when the queue is full."""
        with self._cv:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"{len(self._pending)} requests are waiting (--max-queue {self.max_queue})")
            self._pending.append(request)
            self._cv.notify()

    def cancel(self, request: Request) -> None:
        """Cancel a request (its row is freed before the next step)."""
        with self._cv:
            request.cancelled = True
            self._cv.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel what is queued or running, then stop the thread."""
        with self._cv:
            self._stopping = True
            for req in [*self._pending, *self._rows.values()]:
                req.cancelled = True
            if self._prefilling is not None:
                self._prefilling[0].cancelled = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._pool.shutdown(wait=True)

    def stats(self) -> dict[str, int]:
        """Counts and bytes now: queued, prefilling, busy and free rows, KV bytes held."""
        with self._cv:
            busy = len(self._rows) + (1 if self._prefilling is not None else 0)
            return {
                "queued": len(self._pending),
                "prefilling": int(self._prefilling is not None),
                "busy_rows": busy,
                "free_rows": self.backend.rows - busy,
                "rows": self.backend.rows,
                "kv_bytes_held": self.backend.held_bytes(),
            }

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.backend.warmup()
        except BaseException as err:  # reported by start()
            self.error = err
            self._started.set()
            return
        self._started.set()
        while True:
            with self._cv:
                if self._stopping and not (self._pending or self._rows or self._prefilling):
                    return
                if not (self._pending or self._rows or self._prefilling):
                    self._cv.wait(0.5)
                    continue
            try:
                self._turn()
            except Exception as err:  # a bug or a device fault: fail every request, keep serving
                log.exception("scheduler turn failed")
                self._fail_all(500, f"internal error: {err}")

    def _turn(self) -> None:
        self._reap_cancelled()
        self._collect_prefill()
        self._start_prefill()
        if self._rows:
            self._decode()
        elif self._prefilling is not None:
            concurrent.futures.wait([self._prefilling[1]], timeout=0.05)

    def _free_row(self) -> int | None:
        taken = set(self._rows) | ({self._prefilling[0].row} if self._prefilling else set())
        return next((r for r in range(self.backend.rows) if r not in taken), None)

    def _reap_cancelled(self) -> None:
        with self._cv:
            gone = [r for r in self._pending if r.cancelled]
            for r in gone:
                self._pending.remove(r)
        for r in gone:
            self._finish(r, "cancelled")
        for r in list(self._rows.values()):
            if r.cancelled:
                self._finish(r, "cancelled")

    def _start_prefill(self) -> None:
        with self._cv:
            if self._prefilling is not None or not self._pending:
                return
            row = self._free_row()
            if row is None:
                return
            req = self._pending.popleft()
            req.row = row
        if self.backend.concurrent_prefill:
            fut = self._pool.submit(self.backend.prefill, req.job)
        else:
            fut = concurrent.futures.Future()
            try:
                fut.set_result(self.backend.prefill(req.job))
            except Exception as err:
                fut.set_exception(err)
        with self._cv:
            self._prefilling = (req, fut)

    def _collect_prefill(self) -> None:
        if self._prefilling is None or not self._prefilling[1].done():
            return
        req, fut = self._prefilling
        with self._cv:
            self._prefilling = None
        err = fut.exception()
        if err is not None:
            status = 400 if isinstance(err, (ValueError, MemoryError)) else 500
            if status == 500:
                log.error("prefill of %s failed", req.id, exc_info=err)
            req.row = None
            self._emit(req, "error", (status, str(err)))
            req.done = True
            return
        pre: Prefilled = fut.result()
        req.pre = pre
        if req.cancelled:
            req.row = None
            self._finish(req, "cancelled")
            return
        req.gen = make_generator(req.params, self.backend.device)
        first = self.backend.first_token(pre, req.params, req.gen)
        req.first_at = time.perf_counter()
        if self._accept(req, first):  # the first token may already end it
            self.backend.load(req.row, pre)
            self._rows[req.row] = req
        req.pre = Prefilled(None, pre.logits[:0], pre.prompt_tokens, pre.kept_tokens, pre.cached_tokens)

    def _decode(self) -> None:
        inputs = {row: r.tokens[-1] for row, r in self._rows.items()}
        samplers = {row: (r.params, r.gen) for row, r in self._rows.items() if not r.params.greedy}
        t0 = time.perf_counter()
        out = self.backend.step(inputs, samplers)
        self.step_times.append(time.perf_counter() - t0)
        self.steps += 1
        if self.metrics is not None:
            self.metrics.observe_step(time.perf_counter() - t0, len(inputs))
        for row, tok in out.items():
            req = self._rows[row]
            if not self._accept(req, tok):
                self._finish(req, None)

    def _accept(self, req: Request, tok: int) -> bool:
        """Record one token; False when the request is finished (then it is finished here)."""
        now = time.perf_counter()
        req.token_times.append(now)
        if tok in req.params.eos_ids:
            self._finish(req, "stop")
            return False
        req.tokens.append(tok)
        if req.text is not None:
            delta = req.text.push(tok)
            if delta:
                self._emit(req, "delta", delta)
            if req.text.stopped:
                self._finish(req, "stop")
                return False
        else:
            self._emit(req, "token", tok)
        if len(req.tokens) >= req.params.max_tokens:
            self._finish(req, "length")
            return False
        return True

    def _finish(self, req: Request, reason: str | None) -> None:
        if req.done:
            return
        req.done = True
        if req.row is not None and self._rows.get(req.row) is req:
            del self._rows[req.row]
            self.backend.free(req.row)
        req.row = None
        reason = reason or "length"
        if req.text is not None and reason != "cancelled":
            rest = req.text.finish()
            if rest:
                self._emit(req, "delta", rest)
        pre = req.pre
        ttft = (req.first_at - req.created) if req.first_at else 0.0
        decode = (req.token_times[-1] - req.first_at) if req.first_at and req.token_times else 0.0
        comp = Completion(
            reason, pre.prompt_tokens if pre else len(req.job.ids), len(req.tokens),
            pre.kept_tokens if pre else 0, pre.cached_tokens if pre else 0, ttft, decode,
            req.text.text if req.text is not None else "",
        )
        n = len(req.token_times)
        rate = (n - 1) / decode if decode > 0 and n > 1 else 0.0
        log.info("%s: prompt %d tokens, kept %d, cached %d, TTFT %.3f s, %d tokens, %.1f tokens/s, %s",
                 req.id, comp.prompt_tokens, comp.kept_tokens, comp.cached_tokens, ttft, comp.completion_tokens,
                 rate, reason)
        if self.metrics is not None:
            self.metrics.observe_request(comp)
        self._emit(req, "done", comp)

    def _emit(self, req: Request, kind: str, payload: Any) -> None:
        try:
            req.on_event(kind, payload)
        except Exception:  # a listener that went away must not stop the others
            log.exception("event listener of %s failed", req.id)

    def _fail_all(self, status: int, message: str) -> None:
        with self._cv:
            reqs = [*self._pending, *self._rows.values()]
            self._pending.clear()
            if self._prefilling is not None:
                reqs.append(self._prefilling[0])
                self._prefilling = None
        for req in reqs:
            if req.row is not None and self._rows.get(req.row) is req:
                del self._rows[req.row]
                try:
                    self.backend.free(req.row)
                except Exception:
                    log.exception("freeing row %s failed", req.row)
            req.done = True
            self._emit(req, "error", (status, message))
