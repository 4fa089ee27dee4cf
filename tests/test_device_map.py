"""Models split over devices with accelerate's device_map: each layer's cache stays on its layer's device."""

from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model

from snapkv import SnapKVConfig, SnapKVSession
from tests.tiny_models import left_padded, tiny_model

pytestmark = pytest.mark.usefixtures("no_grad")


def _split_map(model: torch.nn.Module, devices: list[str]) -> dict[str, str]:
    n = model.config.num_hidden_layers
    dmap = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0]}
    for i in range(n):
        dmap[f"model.layers.{i}"] = devices[min(len(devices) - 1, i * len(devices) // n)]
    dmap["model.norm"] = dmap["lm_head"] = devices[-1]
    return dmap


def _run(model, ids, mask, config):
    with SnapKVSession(model, config) as s:
        cache = s.new_cache()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, **s.cache_kwargs(cache))
    return out, cache


def _check_split(devices: list[str], family: str = "llama") -> None:
    config = SnapKVConfig(budget=24, window=6)
    ids, mask = left_padded([60, 45], seed=3)
    ref, _ = _run(tiny_model(family), ids, mask, config)
    model = dispatch_model(tiny_model(family), device_map=_split_map(tiny_model(family), devices))
    out, cache = _run(model, ids.to(devices[0]), mask.to(devices[0]), config)
    assert torch.equal(ref.sequences, out.sequences.cpu())
    for a, b in zip(ref.logits, out.logits, strict=True):
        torch.testing.assert_close(a, b.cpu(), atol=1e-4, rtol=1e-4)
    for i, layer in enumerate(cache.layers):
        module = model.model.layers[i]  # accelerate runs CPU-offloaded layers on its execution device
        hook = getattr(module, "_hf_hook", None)
        want = torch.device(getattr(hook, "execution_device", None) or next(module.parameters()).device)
        assert layer.keys.device == want and layer.values.device == want
        if getattr(layer, "compressed", False):
            assert layer.pad.device == want and layer.positions.device == want


def test_cpu_device_map_keeps_results():
    _check_split(["cpu", "cpu"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_gpu_and_cpu_layers_keep_their_caches(family):
    """Layers on cuda:0 and on the CPU (or a second GPU when present): no cache is gathered anywhere."""
    second = "cuda:1" if torch.cuda.device_count() > 1 else "cpu"
    _check_split(["cuda:0", second], family)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpu_split_at_128k_repeats_without_launch_blocking():
    """Issue 14's crash: SnapKV on a model split over cuda:0/cuda:1 failed at 128K (kernels launched on the
    current device, not their tensors'). Eight layers of the Llama-3-8B shape, 131072 tokens, three runs: each
    completes and equals the same weights on one GPU (logits of the prefill and 4 greedy steps)."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=8, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=32000, max_position_embeddings=1 << 18, rope_theta=500000.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda:0"):
        single = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    split = dispatch_model(copy.deepcopy(single).to("cuda:1"), device_map=_split_map(single, ["cuda:0", "cuda:1"]))
    ids = torch.randint(4, 32000, (1, 131072), device="cuda:0")
    config = SnapKVConfig(budget=1024)
    ref, _ = _run(single, ids, None, config)
    for _ in range(3):
        out, cache = _run(split, ids, None, config)
        torch.cuda.synchronize("cuda:0")
        torch.cuda.synchronize("cuda:1")
        assert {str(layer.keys.device) for layer in cache.layers} == {"cuda:0", "cuda:1"}
        assert all(layer.physical_length == 1024 + 3 for layer in cache.layers)
        assert torch.equal(out.sequences.cpu(), ref.sequences.cpu())
        for a, b in zip(ref.logits, out.logits, strict=True):
            torch.testing.assert_close(a.float().cpu(), b.float().cpu(), atol=0.15, rtol=0.05)
