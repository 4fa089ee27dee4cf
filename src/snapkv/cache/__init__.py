"""Caches that hold compressed prompt KV."""

from snapkv.cache.compressed import CompressedLayer, SnapKVCache

__all__ = ["CompressedLayer", "SnapKVCache"]
