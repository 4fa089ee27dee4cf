"""Incremental detokenization with stop strings: the streamed pieces join into the plain text.

Text that might still become the start of a stop string, or that ends inside a multi-byte
character, is held back until the next token decides it.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    """Turn generated token ids into text deltas, cut at the first stop string.

    Args:
        tokenizer: decodes ids (``skip_special_tokens=True``).
        stop: strings that end the text; the text stops before the first one.
    """

    def __init__(self, tokenizer: Any, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; returns the text now safe to send ('' while held back or after a stop)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._first_stop()
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self._take(len(self.text))
        if self.text.endswith("\ufffd"):  # an unfinished multi-byte character
            return ""
        return self._take(max(self.sent, len(self.text) - self.hold))

    def finish(self) -> str:
        """The rest of the text (at the end of the generation)."""
        if self.text.endswith("\ufffd") and not self.stopped:
            self.text = self.text.rstrip("\ufffd")
        return self._take(len(self.text))

    def _first_stop(self) -> int | None:
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _take(self, upto: int) -> str:
        piece = self.text[self.sent : upto]
        self.sent = max(self.sent, upto)
        return piece
