"""The decode loop as a token stream: eos ids, stop strings, per-row finish, text pieces.

:func:`decode_stream` drives a :class:`~snapkv.generation.decode.DecodeRunner` from the logits
of the last fed position and yields one :class:`StreamStep` per generated position. The next
step is launched before the host reads the current tokens (copied to pinned memory ahead of
it), so the device runs the next step while the host does its bookkeeping (one step may be
computed past the end and discarded).

Stop strings are matched on decoded text at the host, as OpenAI's API does: the output is cut
before the stop string, and text that could still grow into one is held back until it cannot.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from snapkv.generation.decode import DecodeRunner
from snapkv.generation.sampling import SamplingParams, sample_with


@dataclass
class StreamStep:
    """What one decode position produced, per row.

    Attributes:
        step: 0 for the token from the prefill (or extend), then 1, 2, ...
        tokens: the token of each row, None for rows that had already finished.
        text: the new text of each row (held back while it may start a stop string; empty
            without a tokenizer).
        finished: per row None while it runs; ``"stop"`` or ``"length"`` at the step it ends.
    """

    step: int
    tokens: list[int | None]
    text: list[str]
    finished: list[str | None]


class RowText:
    """Incremental text of one row, with stop strings (host side).

    Decodes the row's whole token list each push (``O(n^2)`` characters for ``n`` tokens:
    fine for answers; the tokenizer needs the whole list to join pieces correctly).
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters already handed out

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; ``(new text, hit a stop string)``. After a hit, ``text`` ends before it."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            cut = max(min(hits), self.sent)
            self.text = text[:cut]
            return self._emit(cut), True
        self.text = text
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            hold = max(hold, 1)
        return self._emit(len(text) - hold), False

    def flush(self) -> str:
        """Everything not yet handed out (the row finished without a stop string)."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece = self.text[self.sent : upto]
        self.sent = upto
        return piece


def check_stop(stop: str | Sequence[str] | None, tokenizer: Any) -> list[str]:
    """Validated stop strings (a list), before any model work."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    if stops and tokenizer is None:
        raise ValueError("stop strings need tokenizer= (they are matched on the decoded text)")
    return stops


def eos_list(eos_token_id: int | Sequence[int] | None) -> list[int]:
    """Eos ids as a validated list."""
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise ValueError(f"eos_token_id must be an id >= 0 or a list of them, got {eos_token_id!r}")
    return ids


def decode_stream(
    runner: DecodeRunner,
    logits: torch.Tensor,
    *,
    max_new_tokens: int,
    params: SamplingParams,
    eos: Sequence[int] = (),
    stop: Sequence[str] = (),
    tokenizer: Any = None,
    on_logits: Callable[[torch.Tensor], None] | None = None,
    sync: Callable[[], None] = lambda: None,
) -> Iterator[StreamStep]:
    """Yield the steps of up to ``max_new_tokens`` positions per row, starting from ``logits [B, V]``.

    ``runner`` holds a cache whose last fed position produced ``logits``; each further
    position is one :meth:`~DecodeRunner.step`. ``on_logits`` receives each position's logits
    (a view, valid until the next step). Rows finish on an eos id, a stop string (needs
    ``tokenizer``) or the length; the loop ends when every row has finished.
    """
    device = logits.device
    gen = params.generator(device)
    b = logits.shape[0]
    eos_set = set(eos)
    texts = [RowText(tokenizer, stop) for _ in range(b)] if tokenizer is not None else None
    finished: list[str | None] = [None] * b
    with torch.inference_mode():  # never across a yield: the consumer runs outside it
        tok = sample_with(logits, params, gen)
        if on_logits is not None:
            on_logits(logits)
    cuda = device.type == "cuda"
    with torch.inference_mode(False):
        host_buf = torch.empty(b, dtype=torch.long, pin_memory=cuda)  # this step's tokens, for the host
    for step in range(max_new_tokens):
        with torch.inference_mode():
            host_buf.copy_(tok, non_blocking=cuda)  # queued before the next step: not held up by it
            ready = torch.cuda.Event() if cuda else None
            if ready is not None:
                ready.record()
            if step + 1 < max_new_tokens:  # launch the next position before reading this one
                runner.feed(tok)
                runner.step()
                if params.greedy:
                    tok = runner.next_tokens
                else:
                    tok = sample_with(runner.logits, params, gen)
                if on_logits is not None:
                    on_logits(runner.logits)
        if ready is not None:
            ready.synchronize()  # only the copy; the next step keeps running
        host = host_buf.tolist()
        out = StreamStep(step, [None] * b, [""] * b, [None] * b)
        for r in range(b):
            if finished[r] is not None:
                continue
            t = host[r]
            out.tokens[r] = t
            reason, hit = None, False
            if t in eos_set:
                reason = "stop"
            elif texts is not None:
                out.text[r], hit = texts[r].push(t)
                reason = "stop" if hit else None
            if reason is None and step + 1 == max_new_tokens:
                reason = "length"
            if reason is not None:
                if texts is not None and not hit:  # text held back for a stop string that never came
                    out.text[r] += texts[r].flush()
                finished[r] = out.finished[r] = reason
        yield out
        if all(f is not None for f in finished):
            break
    sync()


class Stream:
    """An iterable of :class:`StreamStep`; after the last one, :attr:`output` holds the result.

    ``close()`` stops generating (e.g. when a client disconnects); the cache keeps what was
    written so far.
    """

    def __init__(self, steps: Iterator[StreamStep], finish: Callable[[list[StreamStep]], Any]) -> None:
        self._steps, self._finish = steps, finish
        self.output: Any = None
        self.t0 = time.perf_counter()

    def __iter__(self) -> Iterator[StreamStep]:
        seen: list[StreamStep] = []
        for step in self._steps:
            seen.append(step)
            yield step
        self.output = self._finish(seen)

    def close(self) -> None:
        """Stop the generation; :attr:`output` stays None."""
        close = getattr(self._steps, "close", None)
        if close is not None:
            close()


__all__ = ["RowText", "Stream", "StreamStep", "check_stop", "decode_stream", "eos_list"]
