"""One sample, many settings: a captured prefill, then a derived cache and a greedy decode per setting.

Prefills per sample (each at most once, only when a requested setting needs it):

* the whole prompt, captured: full cache and every ``query``-mode setting;
* the context alone, captured: every ``context``-mode setting. On a model whose layers are
  all full-attention, this is read off the whole-prompt capture (causal attention makes the
  context's queries, keys and values a prefix of the prompt's), so it costs nothing;
* the context plus :data:`PROBE_TEXT`, captured: ``probe`` and ``probe-only`` settings. SnapKV
  votes with the probe as its window, ``probe`` also keeps the context's last ``window`` tokens
  (:func:`snapkv.methods.probe.probe_config` / ``probe_selector``), then the probe's slots are
  cut from every layer before the question.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from snapkv.cache.compressed import CompressedLayer, SnapKVCache
from snapkv.config import SnapKVConfig
from snapkv.eval.methods import METHODS, PROBE_TAILS, PROBE_TEXT, fit_replay
from snapkv.eval.tasks import Codec, Sample
from snapkv.integration.session import SnapKVSession, wrap_method
from snapkv.methods import Method
from snapkv.methods.probe import probe_config, probe_selector


@dataclass(frozen=True)
class Setting:
    """One evaluated setting of a sample."""

    method: str
    mode: str
    budget: int | float | None  # None for the full cache

    @property
    def budget_label(self) -> str:
        """The budget as written in records (``full`` for the full cache)."""
        return "full" if self.budget is None else str(self.budget)


@dataclass
class Outcome:
    """What one setting produced."""

    setting: Setting
    prediction: str
    new_tokens: int
    kept_tokens: float
    derive_s: float
    decode_s: float


def _ids(ids: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([list(ids)], dtype=torch.long, device=device)


def _positions(start: int, n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, start + n, device=device)[None]


class Prefill:
    """A captured prefill of ``ids`` inside a session: the source cache and its snapshot."""

    def __init__(self, model: torch.nn.Module, session: SnapKVSession, ids: Sequence[int]) -> None:
        device = next(model.parameters()).device
        t0 = time.perf_counter()
        self.cache = session.new_cache()
        out = model(input_ids=_ids(ids, device), position_ids=_positions(0, len(ids), device),
                    logits_to_keep=1, **session.cache_kwargs(self.cache))  # only the last row is read
        self.seconds = time.perf_counter() - t0
        self.logits = out.logits[:, -1].float()
        self.snap = self.cache.snapshot()
        self.length = len(ids)
        self.methods: dict[str, Method] = {}  # one instance per scorer (derive() memoizes by instance)


def _derive(
    session: SnapKVSession, pre: Prefill, setting: Setting, window: int, probe: int = 0, prefix: int | None = None,
    tail: int | None = None,
) -> SnapKVCache:
    """The setting's cache from ``pre``'s capture (``prefix``: of its first tokens only).

    ``probe``: the capture ends with a probe of that many tokens; budget and window are
    :func:`~snapkv.methods.probe.probe_config`'s with ``tail`` (the setting's budget of context
    tokens remains once the probe is cut).
    """
    m = METHODS[setting.method]
    if m.scorer not in pre.methods:  # one instance per scorer: derive() memoizes its scores
        pre.methods[m.scorer] = m.make()
    length = prefix or pre.length
    config = SnapKVConfig(budget=setting.budget, window=window)
    method = wrap_method(pre.methods[m.scorer], m.profile, m.head_budget)
    if probe:  # the probe's votes, the context's last tail tokens kept
        method = probe_selector(method, config, tail)
        probed = probe_config(config, length - probe, probe, tail)
        config = probed or SnapKVConfig(budget=length, window=window + probe)  # the context fits: all kept
    return session.derive(pre.cache, method=method, config=config, window=config.window, prefix=prefix)


def _cut_tail(cache: SnapKVCache, n: int, sliding_from: SnapKVCache | None) -> None:
    """Drop the last ``n`` tokens (the probe) of every full layer; sliding layers come from ``sliding_from``."""
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, CompressedLayer):
            layer.drop_tail(n)
        elif sliding_from is not None:
            cache.layers[i] = copy.copy(sliding_from.layers[i])
        else:
            raise RuntimeError("probe mode on a model with sliding layers needs the context prefill")


def _kept(session: SnapKVSession, length: int) -> float:
    if not session.stats:
        return float(length)
    return sum(s.kept_tokens[0] for s in session.stats) / len(session.stats)


def greedy(
    model: torch.nn.Module, session: SnapKVSession, cache: SnapKVCache, logits: torch.Tensor, start: int,
    max_new: int, eos: frozenset[int],
) -> list[int]:
    """Greedy tokens from ``logits`` (the last prompt position's), continuing at position ``start``."""
    device = logits.device
    out: list[int] = []
    tok = int(logits.argmax(-1)[0])
    for i in range(max_new):
        out.append(tok)
        if tok in eos or i == max_new - 1:
            break
        step = model(input_ids=_ids([tok], device), position_ids=_positions(start + i, 1, device),
                     **session.cache_kwargs(cache))
        tok = int(step.logits[0, -1].argmax())
    return [t for t in out if t not in eos]


def evaluate_sample(
    model: torch.nn.Module,
    codec: Codec,
    sample: Sample,
    settings: Sequence[Setting],
    *,
    window: int = 32,
    max_new_tokens: int | None = None,
    separate_context: bool = False,
) -> Iterator[tuple[Outcome, float]]:
    """Yield ``(outcome, prefill seconds)`` for each setting, sharing prefills as described above.

    ``separate_context``: prefill the context alone even where the whole prompt's capture holds
    it (the reference twin of the prefix view).
    """
    max_new = min(sample.max_new_tokens, max_new_tokens or sample.max_new_tokens)
    length, lc = len(sample.input_ids), len(sample.context_ids)
    question = sample.question_ids
    with torch.no_grad(), SnapKVSession(model, SnapKVConfig(window=window), capture=True) as session:
        full: Prefill | None = None  # the whole prompt, prefilled when a setting first needs it
        ctx: Prefill | None = None  # a separate context prefill (models with sliding layers)
        probe: Prefill | None = None
        # context captures read off the whole prompt's when every layer is full attention
        prefix_ok = len(session.full_layers) == len(session.layer_types) and not separate_context
        probe_ids = codec.encode(PROBE_TEXT)
        device = next(model.parameters()).device
        for st in settings:
            if full is not None:
                full.cache.restore(full.snap)  # drop tokens a previous setting appended
            elif st.mode == "query" or st.mode == "context" and prefix_ok:
                full = Prefill(model, session, sample.input_ids)
            t0 = time.perf_counter()
            if st.mode == "query":
                pre, shared = full, full.seconds
                if st.budget is None:
                    session.activate(full.cache)
                    cache = full.cache
                    session.stats = []
                else:
                    cache = _derive(session, full, st, window)
                logits, start = full.logits, length
            else:
                if ctx is None and not prefix_ok:
                    ctx = Prefill(model, session, sample.context_ids)
                if st.mode == "context":
                    if ctx is None:
                        pre, shared, ctx_len = full, 0.0, lc
                        # Replay methods (KVzip) are fitted on the context first (the replay counts in derive_s).
                        fit_replay(model, full.methods, st.method, full.cache.captured, sample.context_ids, codec)
                        cache = _derive(session, full, st, window, prefix=lc)
                    else:
                        if METHODS[st.method].replay:
                            raise ValueError(f"{st.method} needs a model whose layers are all full attention")
                        pre, shared, ctx_len = ctx, ctx.seconds, ctx.length
                        cache = _derive(session, ctx, st, window)
                else:
                    if probe is None:
                        probe = Prefill(model, session, sample.context_ids + probe_ids)
                    pre, shared, ctx_len = probe, probe.seconds, probe.length
                    g = len(probe_ids)  # the probe votes, the tail stays, the probe is cut
                    cache = _derive(session, probe, st, window, probe=g, tail=PROBE_TAILS[st.mode])
                    sliding = None if prefix_ok else ctx.cache
                    _cut_tail(cache, g, sliding)
                    session.activate(cache)
                derive_s = time.perf_counter() - t0
                out = model(input_ids=_ids(question, device),
                            position_ids=_positions(lc, len(question), device),
                            logits_to_keep=1, **session.cache_kwargs(cache))
                logits, start = out.logits[:, -1].float(), length
            kept = _kept(session, pre.length if st.mode == "query" else ctx_len)
            if st.mode == "query":
                derive_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            toks = greedy(model, session, cache, logits, start, max_new, codec.eos)
            decode_s = time.perf_counter() - t1
            if st.mode in PROBE_TAILS:
                kept = min(kept - len(probe_ids), float(lc))
            yield Outcome(st, codec.decode(toks), len(toks), kept, derive_s, decode_s), shared
