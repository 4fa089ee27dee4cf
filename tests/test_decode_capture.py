"""Decode-graph capture on CUDA: a runner's graph is independent of other graphs and of other threads' streams.

1. The cache is allocated and initialised on one thread's stream and captured on another's (what
   the server does: built on the main thread, decoded on the scheduler's stream). Before the fix
   the warm-up could overtake the initialisation and read garbage write positions: out-of-bounds
   scatters (device asserts, then CUBLAS_STATUS_EXECUTION_FAILED) in the full-cache server.
2. Each runner captures on its own stream, not torch's shared default capture stream, so destroying
   another runner's graph (and releasing its memory) cannot affect it.
"""

from __future__ import annotations

import gc
import threading

import pytest
import torch
import transformers as tf

from snapkv.config import SnapKVConfig
from snapkv.generation import Engine

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _model() -> torch.nn.Module:
    # Wide enough that cuBLAS picks split-K kernels (with a workspace) for the decode GEMMs.
    cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()


def _reference_step(engine: Engine, cache, first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    eager = engine.runner(cache)
    eager.use_graph = False
    state = cache.state()
    eager.feed(first)
    tok = eager.step().clone()
    logits = eager.logits.float().clone()
    cache.rewind(state)
    return tok, logits


@pytest.mark.gpu
@gpu
def test_graph_survives_another_graphs_destruction_and_memory_release():
    model = _model()
    engine = Engine(model, SnapKVConfig(budget=128, window=16), use_graph=True)
    ids = torch.randint(3, 32000, (4, 600), device="cuda")
    cache_a, _, _ = engine.prefill(ids, max_new_tokens=8)
    cache_b, logits_b, _ = engine.prefill(ids, max_new_tokens=8)
    first = logits_b.argmax(-1)
    ref, ref_logits = _reference_step(engine, cache_b, first)
    runner_a = engine.runner(cache_a)
    runner_a.capture()
    runner_b = engine.runner(cache_b)
    runner_b.capture()
    del runner_a, cache_a
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    junk = [torch.full((64, 1024, 1024), float("nan"), device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    runner_b.feed(first)
    out = runner_b.step().clone()
    torch.cuda.synchronize()
    del junk
    assert torch.equal(out, ref)
    assert float((runner_b.logits.float() - ref_logits).abs().max()) < 1e-2


@pytest.mark.gpu
@gpu
def test_server_backend_built_on_one_stream_decodes_on_another():
    from snapkv.serve.batcher import EngineBackend
    from snapkv.serve.doc_cache import DocCache

    model = _model()
    # Large slots (the full-cache case): their zero-fill takes long enough on the building stream for a
    # decode stream that does not wait to overtake it.
    backend = EngineBackend(model, rows=8, slot_tokens=65536, doc_cache=DocCache(0), probe=[5, 6, 7])
    result: dict[str, object] = {}

    def scheduler_thread() -> None:
        try:
            backend.warmup()
            result["tokens"] = backend.step({0: 11, 3: 12}, {})
        except BaseException as err:  # reported below
            result["error"] = err

    t = threading.Thread(target=scheduler_thread)
    t.start()
    t.join(300)
    assert "error" not in result, result.get("error")
    assert set(result["tokens"]) == {0, 3}
    assert backend.slots.write_pos.tolist() == [0] * 8  # free rows do not advance
