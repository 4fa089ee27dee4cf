"""RULER aggregation tasks (Hsieh et al. 2024, arXiv:2404.06654): common and frequent words.

* ``cwe``: a numbered list where 10 words appear ``freq_cw`` times and the rest ``freq_ucw``
  times; name the 10 most common.
* ``fwe``: coded words drawn from a Zipf law (``alpha``); the top word is noise ("...");
  name the next three.
"""

from __future__ import annotations

import math
import string

from snapkv.eval.tasks.base import Codec, Sample, compose, sample_rng
from snapkv.eval.tasks.haystack import word_list

CWE_PRE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n"
)
CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_PRE = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. "
)
FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"


def common_words(
    codec: Codec, length: int, index: int, seed: int = 0, *, num_cw: int = 10, freq_cw: int = 30, freq_ucw: int = 3
) -> Sample:
    """CWE: the list is long enough to fill ``length``; common words are spread uniformly."""
    rng = sample_rng(seed, "cwe", length, index)
    nouns = word_list("noun")
    per_item = max(1, len(codec.encode(" 100. " + nouns[0])))
    items = length // per_item + 1  # more than fits; the tail is cut at the exact length
    freq_cw = max(2 * freq_ucw, min(freq_cw, items // (2 * num_cw)))
    n_ucw = max(1, (items - num_cw * freq_cw) // freq_ucw + 1)
    chosen = rng.sample(nouns, num_cw + n_ucw)
    common, uncommon = chosen[:num_cw], chosen[num_cw:]
    words = common * freq_cw + uncommon * freq_ucw
    rng.shuffle(words)
    return compose(
        codec,
        task="cwe",
        index=index,
        length=length,
        pre=CWE_PRE,
        unit=lambda i: f"{'' if i == 0 else ' '}{i + 1}. {words[i % len(words)]}",
        question=CWE_QUESTION,
        answer_prefix=CWE_PREFIX,
        answers=common,
        max_new_tokens=120,
        meta={"freq_cw": freq_cw},
    )


def frequent_words(
    codec: Codec,
    length: int,
    index: int,
    seed: int = 0,
    *,
    alpha: float = 2.0,
    vocab_size: int = 2000,
    word_len: int = 6,
) -> Sample:
    """FWE: Zipf-distributed coded words; answers are ranks 2-4 (rank 1 is the '....' noise)."""
    rng = sample_rng(seed, "fwe", length, index)
    vocab: list[str] = []
    seen: set[str] = set()
    while len(vocab) < vocab_size:
        w = "".join(rng.choices(string.ascii_lowercase, k=word_len))
        if w not in seen:
            seen.add(w)
            vocab.append(w)
    vocab[0] = "...."
    per_word = max(1, len(codec.encode(" " + vocab[1])))
    n_words = length // per_word + 1
    zeta = sum(k**-alpha for k in range(1, 100_000))
    words = [w for k, w in enumerate(vocab, 1) for _ in range(math.floor(n_words * k**-alpha / zeta))]
    rng.shuffle(words)
    return compose(
        codec,
        task="fwe",
        index=index,
        length=length,
        pre=FWE_PRE,
        unit=lambda i: ("" if i == 0 else " ") + words[i % len(words)],
        question=FWE_QUESTION,
        answer_prefix=FWE_PREFIX,
        answers=vocab[1:4],
        max_new_tokens=50,
    )
