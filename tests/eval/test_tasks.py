"""Task generation: exact token sizes, determinism, answers in the prompt, needle depths."""

from __future__ import annotations

import pytest

from snapkv.eval.tasks import DEPTHS, TASKS, make_sample, resolve_tasks
from snapkv.eval.tasks.haystack import essay_sentences, word_list

from .helpers import byte_codec


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("chat", [False, True])
def test_exact_length_and_prefix(task: str, chat: bool) -> None:
    codec = byte_codec(chat)
    for length in (1500, 2777):
        s = make_sample(task, codec, length, 3)
        assert len(s.input_ids) == length
        assert s.input_ids[: len(s.context_ids)] == s.context_ids
        assert s.question_ids and s.answers
        assert s.context_ids[: len(codec.head)] == codec.head


@pytest.mark.parametrize("task", sorted(TASKS))
def test_seeded_determinism(task: str) -> None:
    codec = byte_codec()
    a, b = make_sample(task, codec, 1200, 2, seed=7), make_sample(task, codec, 1200, 2, seed=7)
    assert a == b and a.prompt_hash == b.prompt_hash
    assert make_sample(task, codec, 1200, 3, seed=7).prompt_hash != a.prompt_hash
    assert make_sample(task, codec, 1200, 2, seed=8).prompt_hash != a.prompt_hash


@pytest.mark.parametrize("task", [t for t in TASKS if t.startswith("niah") or t in ("passkey", "vt")])
def test_answers_in_context(task: str) -> None:
    codec = byte_codec()
    s = make_sample(task, codec, 2000, 1)
    text = codec.decode(s.context_ids)
    for a in s.answers:
        assert a in text


def test_needle_depth_follows_grid() -> None:
    codec = byte_codec()
    for i, depth in enumerate(DEPTHS):
        s = make_sample("passkey", codec, 3000, i)
        assert s.depth == depth
        text = codec.decode(s.context_ids)
        where = text.index("The pass key is") / len(text)
        assert abs(where - depth) < 0.1


def test_cwe_common_words_are_most_common() -> None:
    codec = byte_codec()
    s = make_sample("cwe", codec, 4000, 0)
    words = [w for w in codec.decode(s.context_ids).split() if w.isalpha()]
    counts = {w: words.count(w) for w in set(words)}
    top = sorted(counts, key=counts.get, reverse=True)[:10]
    assert set(top) == set(s.answers)


def test_offline_sources_present() -> None:
    assert len(essay_sentences()) > 1000
    assert len(word_list("noun")) > 1000 and len(word_list("adjective")) > 500


def test_unknown_task_is_named() -> None:
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        resolve_tasks(["passkey", "nope"])
    assert resolve_tasks(["niah"])[0] == "niah_single_1"


def test_too_short_length_is_an_error() -> None:
    with pytest.raises(ValueError, match="longer length"):
        make_sample("niah_multiquery", byte_codec(), 300, 0)


@pytest.mark.slow
def test_exact_length_real_tokenizer() -> None:
    from snapkv.eval.tasks import Codec
    from snapkv.models import load_model

    _, tok = load_model("smollm2")
    codec = Codec.from_hf(tok)
    for task in TASKS:
        s = make_sample(task, codec, 2048, 0)
        assert len(s.input_ids) == 2048
