"""What the generator does: sampling (seed, top-k, top-p), eos ids, stop strings, the token stream."""

from __future__ import annotations

import pytest
import torch

from snapkv import SnapKVConfig
from snapkv.bench.api_bench import char_tokenizer
from snapkv.generation import Engine, SamplingParams
from snapkv.generation.sampling import filter_logits, filter_logits_ref, sample
from snapkv.generation.stream import RowText
from tiny_models import tiny_model

CFG = SnapKVConfig(budget=40, window=8, kernel=5, pooling="avg")


def _batch(side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 100, (2, 90), generator=g)  # ids the character tokenizer can decode
    mask = torch.ones_like(ids)
    if side == "left":
        mask[1, :20] = 0
    else:
        mask[1, -20:] = 0
    return ids, mask


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (1, 1.0), (5, 1.0), (0, 0.5), (0, 0.9), (7, 0.8), (300, 0.3)])
def test_filter_equals_plain_twin(top_k, top_p):
    g = torch.Generator().manual_seed(top_k)
    logits = torch.randn(6, 257, generator=g) * 3
    logits[0, :4] = 10.0  # ties at the top
    fast, ref = filter_logits(logits, top_k, top_p), filter_logits_ref(logits, top_k, top_p)
    assert torch.equal(torch.isinf(fast), torch.isinf(ref))
    torch.testing.assert_close(fast[~torch.isinf(fast)], ref[~torch.isinf(ref)].float())


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, generator=g).tolist()) == {0, 1, 2, 3}
    assert set(sample(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample(logits, 1.0, top_p=0.7, generator=g).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(sample(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    counts = torch.bincount(sample(logits, 1.0, generator=g), minlength=4) / 4000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)
    assert sample(logits[:3], 0.0).tolist() == [0, 0, 0]


def test_sampling_params_are_validated():
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(seed=-3),
                dict(top_k=2.5), dict(temperature=float("nan"))):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=name):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="top_p"):
        Engine(tiny_model("llama"), CFG).generate(_batch()[0], max_new_tokens=2, temperature=1.0, top_p=2.0)


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = tiny_model("llama")
    engine = Engine(model, CFG)
    ids, mask = _batch()
    runs = [engine.generate(ids, mask, max_new_tokens=8, temperature=1.5, seed=s).tokens for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    greedy = engine.generate(ids, mask, max_new_tokens=8).tokens
    assert torch.equal(engine.generate(ids, mask, max_new_tokens=8, temperature=2.0, top_k=1, seed=1).tokens, greedy)


def test_several_eos_ids_stop_each_row():
    model = tiny_model("llama")
    engine = Engine(model, CFG)
    ids, mask = _batch()
    free = engine.generate(ids, mask, max_new_tokens=8)
    eos = [int(free.tokens[0, 2]), int(free.tokens[1, 4])]
    out = engine.generate(ids, mask, max_new_tokens=8, eos_token_id=eos)
    for r in range(2):
        first = next(i for i, t in enumerate(free.tokens[r].tolist()) if t in eos)
        assert out.lengths[r] == first + 1 and out.finish_reasons[r] == "stop"
        assert out.tokens[r, : first + 1].tolist() == free.tokens[r, : first + 1].tolist()
        assert all(t == eos[0] for t in out.tokens[r, first + 1 :].tolist())


def test_stop_strings_cut_the_text_before_them():
    tok = char_tokenizer(256)  # every id of the tiny model decodes (specials 0-3 to nothing)
    model = tiny_model("qwen2")
    engine = Engine(model, CFG)
    ids, mask = _batch("right")
    free = engine.generate(ids, mask, max_new_tokens=12, tokenizer=tok)
    text = free.texts[0]
    assert len(text) >= 8 and free.finish_reasons == ["length", "length"]
    assert text == tok.decode(free.tokens[0].tolist(), skip_special_tokens=True)
    stop = text[5:7]
    cut = text.find(stop)
    out = engine.generate(ids, mask, max_new_tokens=12, tokenizer=tok, stop=[stop, "never-seen"])
    assert out.texts[0] == text[:cut] and out.finish_reasons[0] == "stop"
    ends = next(k for k in range(1, 13) if stop in tok.decode(free.tokens[0, :k].tolist(), skip_special_tokens=True))
    assert out.lengths[0] == ends  # the token completing the stop string ends the row
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate(ids, mask, max_new_tokens=2, stop="x")
    with pytest.raises(ValueError, match="stop"):
        engine.generate(ids, mask, max_new_tokens=2, stop=[""], tokenizer=tok)


def test_row_text_holds_back_a_possible_stop_string():
    tok = char_tokenizer()
    ids = tok("ab\n\nQ: x", add_special_tokens=False)["input_ids"]
    row = RowText(tok, ["\n\nQ:"])
    pieces = [row.push(t) for t in ids[:6]]  # up to the stop string's last character
    assert [p for p, _ in pieces] == ["a", "b", "", "", "", ""]
    assert pieces[-2][1] is False and pieces[-1] == ("", True) and row.text == "ab"
    row = RowText(tok, ["\n\nQ:"])
    assert [row.push(t)[0] for t in tok("a\nb", add_special_tokens=False)["input_ids"]] == ["a", "", "\nb"]


def test_stream_yields_what_generate_returns():
    tok = char_tokenizer()
    model = tiny_model("llama")
    engine = Engine(model, CFG)
    ids, mask = _batch()
    ref = engine.generate(ids, mask, max_new_tokens=6, tokenizer=tok, eos_token_id=2)
    stream = engine.stream(ids, mask, max_new_tokens=6, tokenizer=tok, eos_token_id=2)
    steps = []
    for step in stream:
        assert not torch.is_inference_mode_enabled()  # the consumer's code runs in its own mode
        steps.append(step)
    assert [s.step for s in steps] == list(range(6))
    assert [[s.tokens[r] for s in steps] for r in range(2)] == ref.tokens.tolist()
    assert ["".join(s.text[r] for s in steps) for r in range(2)] == ref.texts
    assert steps[-1].finished == ["length", "length"] and stream.output.lengths == [6, 6]
    seen = []
    engine.generate(ids, mask, max_new_tokens=3, streamer=seen.append)
    assert len(seen) == 3 and all(len(s.tokens) == 2 for s in seen)
    early = engine.stream(ids, mask, max_new_tokens=6)
    next(iter(early))
    early.close()  # a client went away: nothing more is generated
    assert early.output is None
