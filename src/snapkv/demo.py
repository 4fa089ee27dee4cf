"""`snapkv demo`: passkey retrieval, full cache and SnapKV side by side, on the default model."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from snapkv.api import Answer, answer
from snapkv.config import SnapKVConfig
from snapkv.eval.tasks.haystack import NOISE
from snapkv.eval.tasks.passkey import ANSWER_PREFIX, DESCRIPTION, needle
from snapkv.eval.tasks.passkey import QUESTION as _ASK

#: The question with its answer prefix: Landmark's plain completion prompt.
QUESTION = _ASK + ANSWER_PREFIX


def passkey_context(tokenizer: Any, length: int, depth: float, key: int) -> str:
    """A Landmark-attention passkey context of about ``length`` tokens, the key at ``depth`` in [0, 1].

    The text of ``snapkv eval``'s passkey task (:mod:`snapkv.eval.tasks.passkey`), sized in
    whole filler sentences for :func:`snapkv.answer`, which takes text, not token ids.
    """
    line = needle(key)
    per = len(tokenizer(" " + NOISE, add_special_tokens=False)["input_ids"])
    fixed = len(tokenizer(f"{DESCRIPTION} {line} {QUESTION}", add_special_tokens=False)["input_ids"]) + 16
    n = max(1, (length - fixed) // per)
    before = round(n * depth)
    return "\n".join([DESCRIPTION, " ".join([NOISE] * before), line, " ".join([NOISE] * (n - before))])


@dataclass
class DemoRow:
    """One passkey sample answered with the full cache and with SnapKV."""

    length: int
    depth: float
    key: int
    full: Answer
    snap: Answer

    def correct(self, a: Answer) -> bool:
        """Whether the answer contains the key."""
        return str(self.key) in a.text


def run_demo(
    model: Any, tokenizer: Any, lengths: list[int], depths: list[float], config: SnapKVConfig, seed: int = 0,
    max_new_tokens: int = 8,
) -> list[DemoRow]:
    """Answer every (length, depth) passkey sample with both caches."""
    rng = random.Random(seed)
    rows = []
    jobs = [(n, d) for n in lengths for d in depths]
    for n, d in tqdm(jobs, desc="passkey (full vs SnapKV)", unit="sample"):
        key = rng.randrange(10000, 100000)
        ctx = passkey_context(tokenizer, n, d, key)
        opts = {"chat": False, "max_new_tokens": max_new_tokens}  # Landmark's plain completion prompt
        full = answer(model, tokenizer, ctx, QUESTION, config, compress=False, **opts)
        snap = answer(model, tokenizer, ctx, QUESTION, config, **opts)
        rows.append(DemoRow(n, d, key, full, snap))
    return rows


def _mark(row: DemoRow, a: Answer) -> str:
    return ("ok " if row.correct(a) else "MISS ") + repr(a.text[:24])


def demo_table(rows: list[DemoRow], config: SnapKVConfig) -> str:
    """A markdown table of the demo, with totals."""
    mib = 1 / 2**20
    out = [
        f"SnapKV budget={config.budget} window={config.window} kernel={config.kernel} pooling={config.pooling}",
        "",
        "| prompt tokens | depth | key | full answer | SnapKV answer | kept tokens | KV MiB full -> SnapKV "
        "| prefill s full / SnapKV | decode ms/token full / SnapKV |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, s = r.full, r.snap
        out.append(
            f"| {f.prompt_tokens} | {r.depth:.2f} | {r.key} | {_mark(r, f)} | {_mark(r, s)} | {s.kept_tokens} | "
            f"{f.kv_bytes_full * mib:.1f} -> {s.kv_bytes_kept * mib:.1f} | {f.prefill_s:.2f} / {s.prefill_s:.2f} | "
            f"{f.decode_ms_per_token:.1f} / {s.decode_ms_per_token:.1f} |"
        )
    n = len(rows)
    acc_f = sum(r.correct(r.full) for r in rows)
    acc_s = sum(r.correct(r.snap) for r in rows)
    out += ["", f"accuracy: full cache {acc_f}/{n}, SnapKV {acc_s}/{n}"]
    return "\n".join(out)
