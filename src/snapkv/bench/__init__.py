"""``snapkv bench``: TTFT, prefill rate, decode latency and memory across prompt lengths and batches.

The CLI entry points are :func:`snapkv.bench.runner.add_arguments` and :func:`snapkv.bench.runner.run`.
"""

from snapkv.bench.measure import Options, Point, Result, measure

__all__ = ["Options", "Point", "Result", "measure"]
