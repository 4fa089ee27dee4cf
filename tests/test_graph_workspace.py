"""A captured decode graph owns its cuBLAS workspace: destroying another graph cannot break it.

torch keys cuBLAS workspaces by (handle, stream) and a destroyed CUDA graph frees the
workspaces of the stream it was captured on (pytorch/pytorch#193402). Before the fix, every
decode runner captured on torch's one default capture stream, so a runner captured after
another shared its workspace, and once the first was destroyed and the memory released the
second replayed into freed memory (the full-cache server crashed with
CUBLAS_STATUS_EXECUTION_FAILED). These tests need CUDA; the CPU run checks the helper's guard.
"""

from __future__ import annotations

import gc

import pytest
import torch
import transformers as tf

from snapkv.config import SnapKVConfig
from snapkv.generation import Engine
from snapkv.generation.decode import fresh_cublas_workspaces

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_fresh_workspaces_refuses_a_build_without_the_hook(monkeypatch):
    monkeypatch.delattr(torch._C, "_cuda_clearCublasWorkspaces", raising=False)
    with pytest.raises(RuntimeError, match="use_graph=False"):
        fresh_cublas_workspaces()


def _model() -> torch.nn.Module:
    # Wide enough that cuBLAS picks kernels with a workspace (split-K) for the decode GEMMs.
    cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()


@pytest.mark.gpu
@gpu
def test_graph_survives_another_graphs_destruction_and_memory_release():
    model = _model()
    engine = Engine(model, SnapKVConfig(budget=128, window=16), use_graph=True)
    ids = torch.randint(3, 32000, (4, 600), device="cuda")
    cache_a, logits_a, _ = engine.prefill(ids, max_new_tokens=8)
    cache_b, logits_b, _ = engine.prefill(ids, max_new_tokens=8)
    first = logits_b.argmax(-1)
    # The reference: runner B eager (no graph), one step from the prefill.
    eager = engine.runner(cache_b)
    eager.use_graph = False
    state = cache_b.state()
    eager.feed(first)
    ref = eager.step().clone()
    ref_logits = eager.logits.float().clone()
    cache_b.rewind(state)
    # A is captured first, B second; then A is destroyed and its memory given back to the driver.
    runner_a = engine.runner(cache_a)
    runner_a.capture()
    runner_b = engine.runner(cache_b)
    runner_b.capture()
    del runner_a, cache_a
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    # Churn: new allocations take whatever was released, filled with NaN.
    junk = [torch.full((64, 1024, 1024), float("nan"), device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    runner_b.feed(first)
    out = runner_b.step().clone()
    torch.cuda.synchronize()
    del junk
    assert torch.equal(out, ref)
    assert torch.isfinite(runner_b.logits).all()
    assert float((runner_b.logits.float() - ref_logits).abs().max()) < 1e-2
