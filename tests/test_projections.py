"""Fused q/k/v and gate/up projections: the model keeps its values and memory, the fused step its results."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from snapkv.config import SnapKVConfig
from snapkv.generation import Engine
from snapkv.generation.decode import DecodeRunner
from snapkv.generation.projections import fuse_projections, fused_linear


def _llama(bias: bool = False) -> torch.nn.Module:
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         initializer_range=0.2, attention_bias=bias, mlp_bias=bias)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    if bias:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    return model


def test_fusing_keeps_the_models_values_forward_and_memory():
    model = _llama(bias=True)
    ids = torch.randint(3, 256, (2, 20))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(ids).logits
    proj = fuse_projections(list(model.model.layers))
    assert proj.fused_layers == 2 and proj.valid()
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    attn = model.model.layers[0].self_attn
    base = proj.qkv[0].weight.untyped_storage().data_ptr()
    assert {attn.q_proj.weight.untyped_storage().data_ptr(), attn.v_proj.bias.untyped_storage().data_ptr()} <= {
        base, proj.qkv[0].bias.untyped_storage().data_ptr()}
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in before.values())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    # Fusing again reuses the same buffers.
    again = fuse_projections(list(model.model.layers))
    assert again.qkv[0] is proj.qkv[0] and again.gate_up[1] is proj.gate_up[1]


def test_replaced_parameter_invalidates_and_refuses_hooks():
    model = _llama()
    attn = model.model.layers[0].self_attn
    mods = [attn.q_proj, attn.k_proj, attn.v_proj]
    first = fused_linear(mods)
    attn.k_proj.weight.data = attn.k_proj.weight.detach().clone() * 2  # replaced, not written in place
    assert not first.valid()
    second = fused_linear(mods)
    assert second is not first and second.valid()
    assert torch.equal(second.weight[attn.q_proj.out_features:][: attn.k_proj.out_features], attn.k_proj.weight)
    handle = attn.q_proj.register_forward_hook(lambda *a: None)
    assert fused_linear(mods) is None  # a hook must keep seeing its module called
    handle.remove()
    assert fused_linear(mods) is second


def _steps(model, fuse: bool, tokens: torch.Tensor) -> torch.Tensor:
    engine = Engine(model, SnapKVConfig(budget=24, window=8), use_graph=False, fused=True)
    ids = torch.randint(3, 256, (2, 60), generator=torch.Generator().manual_seed(1))
    cache, logits, _ = engine.prefill(ids, max_new_tokens=tokens.shape[1] + 1)
    runner = DecodeRunner(engine.parts, cache, use_graph=False, fused=True, fuse_projections=fuse)
    assert (runner.proj is not None) == fuse
    out = [logits.float()]
    for t in range(tokens.shape[1]):  # teacher-forced
        runner.feed(tokens[:, t])
        runner.step()
        out.append(runner.logits.float().clone())
    return torch.stack(out)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_step_with_fused_projections_equals_separate_ones(bias):
    model = _llama(bias)
    tokens = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(2))
    separate = _steps(model, False, tokens)
    fused = _steps(model, True, tokens)
    assert float((separate - fused).abs().max()) < 1e-4
    with torch.no_grad():  # and the model itself is unchanged by it
        ids = torch.randint(3, 256, (1, 10))
        assert torch.allclose(model(ids).logits, _llama(bias)(ids).logits, atol=1e-6)


def test_fuse_projections_needs_the_fused_step():
    model = _llama()
    engine = Engine(model, SnapKVConfig(budget=24, window=8), use_graph=False, fused=False)
    cache, _, _ = engine.prefill(torch.randint(3, 256, (1, 40)), max_new_tokens=2)
    with pytest.raises(ValueError, match="fuse_projections=True needs the fused decode step"):
        DecodeRunner(engine.parts, cache, use_graph=False, fused=False, fuse_projections=True)


def test_save_pretrained_after_fusing_round_trips(tmp_path):
    model = _llama(bias=True)
    fuse_projections(list(model.model.layers))
    model.save_pretrained(tmp_path)
    back = tf.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
