"""Gemma-3-270M from PyPI: sliding layers keep their window, the three full layers are compressed."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicSlidingWindowLayer

from snapkv import SnapKVConfig, SnapKVSession
from snapkv.api import answer
from snapkv.demo import QUESTION, passkey_context
from snapkv.models import load_model

pytestmark = pytest.mark.usefixtures("no_grad")


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma3-270m")


def test_gemma_full_layers_compressed_sliding_layers_untouched(gemma):
    model, tok = gemma
    ctx = passkey_context(tok, 1200, 0.5, 24680)
    res = answer(model, tok, ctx, QUESTION, SnapKVConfig(budget=256), chat=False, max_new_tokens=6)
    assert "24680" in res.text
    assert [s.layer for s in res.layers] == [5, 11, 17]
    assert all(s.kept_tokens == [256] for s in res.layers)
    with SnapKVSession(model, SnapKVConfig(budget=256)) as s:
        cache = s.new_cache()
        ids = tok(ctx, return_tensors="pt").input_ids
        model(input_ids=ids, **s.cache_kwargs(cache))
        for i, layer in enumerate(cache.layers):
            if i in (5, 11, 17):
                assert layer.compressed and layer.physical_length == 256
            else:
                assert isinstance(layer, DynamicSlidingWindowLayer)
                assert layer.keys.shape[-2] == model.config.get_text_config().sliding_window - 1


def test_gemma_budget_above_prompt_is_exact(gemma):
    model, tok = gemma
    ids = tok(passkey_context(tok, 700, 0.5, 13579), return_tensors="pt").input_ids
    ref = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    with SnapKVSession(model, SnapKVConfig(budget=4096)) as s:
        cache = s.new_cache()
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **s.cache_kwargs(cache))
    assert torch.equal(ref.sequences, out.sequences)
    for a, b in zip(ref.logits, out.logits, strict=True):
        assert torch.equal(a, b)
