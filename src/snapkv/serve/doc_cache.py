"""Compressed document caches, kept least-recently-used under a byte limit.

An entry is a context's compressed keys and values per layer (``[Hkv, kept_l, D]``, post-RoPE,
positions ``0 .. context_tokens - 1``), scored context-only (with a probe question as the
observation window), so any later question about the same context can start from it. The key
names the context's token ids and every setting that changes the selection.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from snapkv.config import SnapKVConfig


@dataclass(frozen=True, slots=True)
class DocEntry:
    """One compressed context."""

    keys: tuple[torch.Tensor, ...]  # per layer [Hkv, kept_l, D]
    values: tuple[torch.Tensor, ...]
    context_tokens: int

    @property
    def nbytes(self) -> int:
        """Bytes of its keys and values."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def kept_tokens(self) -> int:
        """Largest count of context tokens kept by a layer."""
        return max(k.shape[-2] for k in self.keys)


def doc_key(context_ids: list[int], config: SnapKVConfig, profile: str, probe: str) -> str:
    """A digest of the context's tokens and the settings its compression depends on."""
    h = hashlib.sha256()
    h.update(repr((config.budget, config.window, config.kernel, config.pooling, config.gqa_reduce, profile,
                   probe)).encode())
    h.update(torch.tensor(context_ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


class DocCache:
    """LRU of :class:`DocEntry` by bytes (thread-safe).

    Args:
        max_bytes: total bytes of the entries kept; an entry larger than this is not stored.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, DocEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        """Whether anything can be stored."""
        return self.max_bytes > 0

    def get(self, key: str) -> DocEntry | None:
        """The entry (now the most recently used) or None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, entry: DocEntry) -> bool:
        """Store ``entry``, evicting the least recently used ones to fit; False if it cannot fit at all."""
        size = entry.nbytes
        with self._lock:
            if size > self.max_bytes:
                return False
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            while self._bytes + size > self.max_bytes and self._entries:
                _, gone = self._entries.popitem(last=False)
                self._bytes -= gone.nbytes
                self.evictions += 1
            self._entries[key] = entry
            self._bytes += size
            return True

    def clear(self) -> None:
        """Drop every entry."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    @property
    def bytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)
