"""Samples sized in the model's own tokens, built from separately tokenized pieces.

A prompt is ``head + pre + haystack-with-needles`` (the *context*) followed by
``question + tail + answer prefix`` (the *question*). Each piece is tokenized on its own
and the ids are concatenated, so the prompt is exactly ``length`` tokens and the context
is an exact token prefix of the prompt (context-only evaluation feeds the question later).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

#: Needle depths of single-needle samples: sample ``i`` uses ``DEPTHS[i % len(DEPTHS)]``.
DEPTHS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
_SENTINEL = "<<<SNAPKV_USER_CONTENT>>>"


class Codec:
    """A tokenizer seen as text <-> ids plus the prompt format around a user message.

    Args:
        encode: text -> ids without special tokens.
        decode: ids -> text, special tokens skipped.
        head: ids before the user message (chat header or BOS).
        tail: ids between the user message and the answer (chat assistant header), or none.
        chat: whether a chat template frames the prompt (answer prefixes lose their leading space).
        eos: ids that end generation.
        name: identifies the tokenizer in prompt hashes.
    """

    def __init__(
        self,
        encode: Callable[[str], list[int]],
        decode: Callable[[Sequence[int]], str],
        head: Sequence[int] = (),
        tail: Sequence[int] = (),
        chat: bool = False,
        eos: Sequence[int] = (),
        name: str = "tokenizer",
    ) -> None:
        self._encode = lru_cache(maxsize=200_000)(lambda text: tuple(encode(text)))
        self.decode = decode
        self.head, self.tail = tuple(head), tuple(tail)
        self.chat, self.eos, self.name = chat, frozenset(eos), name

    def encode(self, text: str) -> tuple[int, ...]:
        """Ids of ``text`` (cached: haystack sentences repeat across samples)."""
        return self._encode(text)

    @classmethod
    def from_hf(cls, tok: Any, chat: bool | None = None, name: str | None = None) -> Codec:
        """Wrap a Hugging Face tokenizer; ``chat`` defaults to whether it has a chat template."""
        chat = bool(getattr(tok, "chat_template", None)) if chat is None else chat

        def enc(text: str) -> list[int]:
            return list(tok.encode(text, add_special_tokens=False))

        def dec(ids: Sequence[int]) -> str:
            return tok.decode(list(ids), skip_special_tokens=True)

        eos = {i for i in (tok.eos_token_id,) if i is not None}
        if chat:
            rendered = tok.apply_chat_template(
                [{"role": "user", "content": _SENTINEL}], add_generation_prompt=True, tokenize=False
            )
            head_text, tail_text = rendered.split(_SENTINEL)
            head, tail = enc(head_text), enc(tail_text)
            end = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tail_text else None
            if isinstance(end, int) and end >= 0:
                eos.add(end)
        else:
            with_special = tok.encode("a", add_special_tokens=True)
            head = [tok.bos_token_id] if tok.bos_token_id is not None and with_special[0] == tok.bos_token_id else []
            tail = []
        return cls(enc, dec, head, tail, chat, sorted(eos), name or getattr(tok, "name_or_path", "hf"))


@dataclass(frozen=True)
class Sample:
    """One evaluation prompt and its references.

    Attributes:
        context_ids: the prompt up to the end of the haystack.
        question_ids: the rest: question, chat tail, answer prefix.
        answers: reference strings (scored by the task's metric).
        depth: the first needle's relative depth, when the task has one.
    """

    task: str
    index: int
    length: int
    context_ids: tuple[int, ...]
    question_ids: tuple[int, ...]
    answers: tuple[str, ...]
    max_new_tokens: int
    depth: float | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def input_ids(self) -> tuple[int, ...]:
        """The whole prompt."""
        return self.context_ids + self.question_ids

    @property
    def prompt_hash(self) -> str:
        """Short SHA-256 of the prompt ids, the split point and the answers."""
        blob = json.dumps([self.context_ids, self.question_ids, self.answers]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def sample_rng(seed: int, task: str, length: int, index: int) -> random.Random:
    """Deterministic per-sample random source (independent of run order)."""
    digest = hashlib.sha256(f"{seed}/{task}/{length}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def grid_depth(index: int) -> float:
    """The depth grid point of sample ``index``."""
    return DEPTHS[index % len(DEPTHS)]


def fill(codec: Codec, unit: Callable[[int], str], budget: int) -> list[tuple[int, ...]]:
    """Token pieces of consecutive units adding up to exactly ``budget`` tokens (the last one cut)."""
    pieces: list[tuple[int, ...]] = []
    total, i = 0, 0
    while total < budget:
        ids = codec.encode(unit(i))
        take = ids[: budget - total]
        if take:
            pieces.append(take)
            total += len(take)
        i += 1
        if i > 10 * budget + 100:
            raise RuntimeError("filler units produce no tokens")
    return pieces


def compose(
    codec: Codec,
    *,
    task: str,
    index: int,
    length: int,
    pre: str,
    unit: Callable[[int], str],
    needles: Sequence[str] = (),
    depths: Sequence[float] = (),
    question: str,
    answer_prefix: str,
    answers: Sequence[str],
    max_new_tokens: int,
    depth: float | None = None,
    meta: dict[str, Any] | None = None,
) -> Sample:
    """Assemble an exactly ``length``-token sample; needles go between filler units at ``depths``."""
    head = codec.head + codec.encode(pre)
    prefix = answer_prefix.lstrip() if codec.chat else answer_prefix
    q = codec.encode("\n" + question) + codec.tail + (codec.encode(prefix) if prefix else ())
    needle_ids = [codec.encode(n) for n in needles]
    budget = length - len(head) - len(q) - sum(len(n) for n in needle_ids)
    if budget < 1:
        raise ValueError(
            f"task {task!r} needs more than {length} tokens ({length - budget + 1} without any filler); "
            "choose a longer length"
        )
    pieces = fill(codec, unit, budget)
    slots = sorted(((round(d * len(pieces)), k) for k, d in enumerate(depths)), reverse=True)
    for pos, k in slots:
        pieces.insert(pos, needle_ids[k])
    ctx = head + tuple(t for p in pieces for t in p)
    sample = Sample(task, index, length, ctx, q, tuple(answers), max_new_tokens, depth, dict(meta or {}))
    if len(sample.input_ids) != length:  # pragma: no cover - guarded by construction
        raise RuntimeError(f"built {len(sample.input_ids)} tokens instead of {length}")
    return sample
