"""`snapkv serve`: an OpenAI-compatible server with continuous batching over compressed caches.

Modules, one owner each: :mod:`~snapkv.serve.protocol` (request bodies, errors),
:mod:`~snapkv.serve.server` (prompts, limits), :mod:`~snapkv.serve.scheduler` (queue, rows,
the model's thread), :mod:`~snapkv.serve.batcher` (the engine backend) over
:mod:`~snapkv.serve.slots` (per-row slot cache), :mod:`~snapkv.serve.hf_backend` (transformers,
not batched), :mod:`~snapkv.serve.extend` and :mod:`~snapkv.serve.doc_cache` (document cache),
:mod:`~snapkv.serve.sampling`, :mod:`~snapkv.serve.textstream`, :mod:`~snapkv.serve.metrics`,
:mod:`~snapkv.serve.app` (FastAPI) and :mod:`~snapkv.serve.cli`.
"""
