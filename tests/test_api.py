"""The user-facing layer on the real default model: answer(), ContextCache, the CLI, model loading."""

from __future__ import annotations

import json
import random

import pytest
import torch

from snapkv import SnapKVConfig, SnapKVSession
from snapkv.api import ContextCache, answer, split_prompt
from snapkv.cli import main
from snapkv.demo import QUESTION, passkey_context
from snapkv.models import load_model, resolve
from tests.tiny_models import tiny_model


@pytest.fixture(scope="module")
def smollm2():
    """The default model (SmolLM2-135M-Instruct), loaded once; dequantized weights are cached on disk."""
    return load_model("smollm2")


def test_default_model_retrieves_passkey_at_2k_with_budget_512(smollm2):
    model, tok = smollm2
    ctx = passkey_context(tok, 2048, 0.5, 48213)
    config = SnapKVConfig(budget=512)
    full = answer(model, tok, ctx, QUESTION, config, compress=False, chat=False, max_new_tokens=6)
    snap = answer(model, tok, ctx, QUESTION, config, chat=False, max_new_tokens=6)
    assert full.prompt_tokens > 1900
    assert "48213" in full.text
    assert "48213" in snap.text
    assert snap.kept_tokens == 512
    # 30 layers x 3 KV heads x 64 dims x 2 (K, V) x 4 bytes per kept token
    assert snap.kv_bytes_kept == 30 * 3 * 64 * 2 * 4 * 512
    assert snap.kv_bytes_full == 30 * 3 * 64 * 2 * 4 * full.prompt_tokens


def test_long_question_widens_window_and_keeps_every_question_token(smollm2):
    model, tok = smollm2
    ctx = passkey_context(tok, 600, 0.3, 11111)
    question = " ".join(["Please answer carefully."] * 12) + " " + QUESTION
    _, q_ids = split_prompt(tok, ctx, question, chat=False)
    assert len(q_ids) > 32
    with pytest.raises(ValueError, match="budget .* question"):
        answer(model, tok, ctx, question, SnapKVConfig(budget=len(q_ids)), chat=False)
    res = answer(model, tok, ctx, question, SnapKVConfig(budget=len(q_ids) + 64), chat=False, max_new_tokens=2)
    assert res.kept_tokens == len(q_ids) + 64


def test_question_tokens_are_all_in_the_cache(smollm2):
    model, tok = smollm2
    ctx = passkey_context(tok, 600, 0.3, 11111)
    question = " ".join(["Please answer carefully."] * 12) + " " + QUESTION
    ctx_ids, q_ids = split_prompt(tok, ctx, question, chat=False)
    ids = torch.tensor([ctx_ids + q_ids])
    with SnapKVSession(model, SnapKVConfig(budget=len(q_ids) + 16)) as s, torch.no_grad():
        s.window = len(q_ids)
        cache = s.new_cache()
        model(input_ids=ids, **s.cache_kwargs(cache))
        length = ids.shape[1]
        for i in s.full_layers:
            pos = cache.layers[i].positions[0]  # [Hkv, P]
            assert (pos[:, -len(q_ids):] == torch.arange(length - len(q_ids), length)).all()


def test_context_cache_answers_many_questions_and_rolls_back(smollm2):
    model, tok = smollm2
    rng = random.Random(3)
    key = rng.randrange(10000, 99999)
    ctx = passkey_context(tok, 1500, 0.4, key)
    with ContextCache(model, tok, ctx, SnapKVConfig(budget=256), chat=False, backend="transformers") as doc:
        first = doc.ask(QUESTION, max_new_tokens=6)
        other = doc.ask("What color is the sky? The sky is", max_new_tokens=4)
        again = doc.ask(QUESTION, max_new_tokens=6)
        seen = [doc.cache.layers[i].seen for i in range(len(doc.cache.layers))]
    assert first.tokens == again.tokens  # the rollback left the compressed context as it was
    assert other.tokens != first.tokens
    assert set(seen) == {doc.context_tokens}
    assert first.kept_tokens == 256


def test_cli_generate_json_and_bad_input(smollm2, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(passkey_context(smollm2[1], 400, 0.5, 31337))
    assert main(["generate", str(doc), "--question", QUESTION, "--budget", "128", "--json",
                 "--max-new-tokens", "3"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["kept_tokens"] == 128 and out["prompt_tokens"] > 128
    assert main(["generate", str(doc), "--question", "x", "--budget", "16", "--window", "32"]) == 2
    assert "budget must be greater than window" in capsys.readouterr().err
    assert main(["generate", str(doc), "--question", "x", "--kernel", "4"]) == 2
    assert "kernel" in capsys.readouterr().err


def test_load_local_folder_and_unknown_name(tmp_path):
    from transformers import AutoTokenizer

    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    tok_src = resolve("smollm2")
    AutoTokenizer.from_pretrained(tok_src.parent, gguf_file=tok_src.name).save_pretrained(tmp_path)
    loaded, tok = load_model(str(tmp_path))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert tok.padding_side == "left"
    with pytest.raises(ValueError, match="model must be one of"):
        load_model("no-such-model")


def test_context_cache_probe_votes_then_leaves_the_cache(smollm2):
    model, tok = smollm2
    key = 40917
    ctx = passkey_context(tok, 1500, 0.4, key)
    config = SnapKVConfig(budget=128, kernel=7)  # the paper's kernel: plain context-only misses the key (31 finds it)
    with ContextCache(model, tok, ctx, config, chat=False, probe=False) as doc:  # plain: the context's last tokens vote
        plain = doc.ask(QUESTION, max_new_tokens=6)
    with ContextCache(model, tok, ctx, config, chat=False, probe=True, backend="transformers") as doc:
        probed = doc.ask(QUESTION, max_new_tokens=6)
        again = doc.ask(QUESTION, max_new_tokens=6)
        for layer in doc.cache.layers:  # exactly the budget of context tokens, none of the probe
            assert layer.seen == doc.context_tokens and layer.physical_length == 128
            assert int(layer.positions.max()) < doc.context_tokens
    assert probed.kept_tokens == 128 and probed.tokens == again.tokens
    assert str(key) in probed.text  # the context's last 32 tokens alone do not find it:
    assert str(key) not in plain.text


def test_context_cache_probe_bad_input():
    with pytest.raises(ValueError, match="probe must be True, False, None or a non-empty text"):
        ContextCache(tiny_model("llama"), None, "text", probe="")
    with pytest.raises(ValueError, match="probe must be"):
        ContextCache(tiny_model("llama"), None, "text", probe=3)


def test_split_prompt_finds_the_question_before_the_chat_suffix(smollm2):
    _, tok = smollm2
    ctx, q = split_prompt(tok, "Some document text.", "assistant", chat=True)
    assert tok.decode(q) == "assistant<|im_end|>\n<|im_start|>assistant\n"  # the question, then the suffix
    text = tok.apply_chat_template([{"role": "user", "content": "Some document text.\n\nassistant"}],
                                   tokenize=False, add_generation_prompt=True)
    assert ctx + q == tok(text, add_special_tokens=False)["input_ids"]  # one tokenization, split


@pytest.mark.parametrize("chat", [True, False])
def test_split_prompt_context_ids_do_not_depend_on_the_question(smollm2, chat):
    _, tok = smollm2
    doc = "The passkey is 12345. Remember it."
    base, _ = split_prompt(tok, doc, "?", chat=chat)
    for question in ["What is the passkey?", " What is it?", "\nWhat is it?", "\t\n  Why?"]:
        ctx, q = split_prompt(tok, doc, question, chat=chat)
        assert ctx == base, repr(question)
        assert tok.decode(q).startswith(question.strip())
    for empty in ["", "  \n"]:
        with pytest.raises(ValueError, match="question must be a non-empty text"):
            split_prompt(tok, doc, empty, chat=chat)


def test_context_cache_asks_with_canonical_ids(smollm2):
    model, tok = smollm2
    ctx = passkey_context(tok, 300, 0.5, 27182)
    with ContextCache(model, tok, ctx, SnapKVConfig(budget=128), chat=True) as doc:
        plain = doc.ask("What is the passkey?", max_new_tokens=3)
        spaced = doc.ask("\n What is the passkey?", max_new_tokens=3)
    assert plain.tokens == spaced.tokens and plain.prompt_tokens == spaced.prompt_tokens


class _CharTokenizer:
    """One token per character, except that a newline followed by ``!`` is one token."""

    chat_template = None
    eos_token_id = None

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        ids, offsets, i = [], [], 0
        while i < len(text):
            n = 2 if text[i : i + 2] == "\n!" else 1
            ids.append(3 + sum(map(ord, text[i : i + n])) % 250)
            offsets.append((i, i + n))
            i += n
        return {"input_ids": ids, "offset_mapping": offsets}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + t % 26) for t in ids)


def test_context_cache_refuses_a_question_that_retokenizes_the_context():
    model, tok = tiny_model("llama"), _CharTokenizer()
    context = "abcdefghij" * 6
    # probe=False: the default probe (117 characters here) would not fit a budget of 20; the scoring is beside the point
    with ContextCache(model, tok, context, SnapKVConfig(budget=20, window=4), chat=False, probe=False) as doc:
        assert len(doc.ask("what?", max_new_tokens=2).tokens) == 2
        with pytest.raises(ValueError, match="changes how the context's last tokens are tokenized"):
            doc.ask("!what?", max_new_tokens=2)  # "\n!" would merge the context's last newline into the question
        assert len(doc.ask("what?", max_new_tokens=2).tokens) == 2
