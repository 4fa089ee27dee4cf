"""``snapkv bench``: TTFT, prefill rate, decode latency and memory across prompt lengths and batches."""

from snapkv.bench.measure import Options, Point, Result, measure
from snapkv.bench.runner import add_arguments, run

__all__ = ["Options", "Point", "Result", "add_arguments", "measure", "run"]
