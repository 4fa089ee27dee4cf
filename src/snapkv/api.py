"""Ask questions about long documents with a compressed cache: query-aware or context-only.

* query-aware (the paper's setting, default): the question ends the prompt, inside the
  observation window, so the window votes with the question in view. A question longer
  than ``window`` widens the window to cover all of its tokens (they are all kept and all
  vote); the budget is unchanged and must exceed that widened window, else ``ValueError``.
* context-only: the context alone is compressed once; any number of questions are then
  asked against that one cache, which is rolled back after each answer. With ``probe``, a
  generic question appended to the context is the observation window while it is
  compressed; it votes, then is cut from the cache (SnapKV's context-only weakness, lifted
  at the price of nothing but the probe's own tokens in the prefill). The scorer is a
  method: ``Probe(SnapKV(kernel=31))`` by default (:class:`~snapkv.methods.Probe`, chosen by
  the reuse measurements), ``KVzip(...)`` (context replay, transformers path), or a plain
  ``SnapKV(...)`` whose window is the context's own last tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from snapkv.cache.compress import LayerStats
from snapkv.cache.compressed import SnapKVCache, Snapshot
from snapkv.config import SnapKVConfig
from snapkv.integration.session import SnapKVSession
from snapkv.methods.base import Method
from snapkv.methods.probe import DEFAULT_PROBE, Probe, probe_config, probe_selector
from snapkv.methods.snapkv import SnapKV

#: The query-agnostic methods ``ContextCache(method=...)`` accepts (any selection method too).
CONTEXT_METHODS = "Probe(...), KVzip(...), SnapKV(...)"

MODES: tuple[str, ...] = ("query_aware", "context_only")



@dataclass
class Answer:
    """One generated answer and what it cost."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    kept_tokens: int | None
    kv_bytes_full: int
    kv_bytes_kept: int
    prefill_s: float
    decode_s: float
    layers: list[LayerStats] = field(default_factory=list)
    # -- engine dispatch (snapkv.generation.answer) ------------------------------------------
    #: ``"engine"`` or ``"transformers"``: the backend that produced this answer.
    backend: str = "transformers"
    #: Seconds spent capturing the engine's decode graph for this answer (in neither
    #: ``prefill_s`` nor ``decode_s``; 0 on the transformers path and when already captured).
    capture_s: float = 0.0

    @property
    def decode_ms_per_token(self) -> float:
        """Median-free average decode time per generated token after the first."""
        return 1000.0 * self.decode_s / max(1, len(self.tokens) - 1)


_SENTINEL = "\u2063snapkv-question\u2063"


def _chat_text(tokenizer: Any, content: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def split_prompt(tokenizer: Any, context: str, question: str, chat: bool | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the prompt up to the question, and of the question with any chat suffix.

    The prompt is ``context``, a blank line, then ``question`` (its leading whitespace
    dropped), in the tokenizer's chat template when ``chat`` (default: when it has one). It
    is tokenized once and split at the question's first character, so the two lists joined
    are exactly the prompt's tokenization. ``ValueError`` for an empty question or one the
    chat template does not reproduce.
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty text, got {question!r}")
    if chat is None:
        chat = getattr(tokenizer, "chat_template", None) is not None
    question = question.lstrip()
    joined = f"{context}\n\n{question}"
    if chat:
        text = _chat_text(tokenizer, joined)
        probe = _chat_text(tokenizer, f"{context}\n\n{_SENTINEL}")
        if _SENTINEL not in probe:
            raise ValueError("the chat template changes the message text; cannot tell where the question starts")
        end = len(text) - (len(probe) - probe.rindex(_SENTINEL) - len(_SENTINEL))  # the template's suffix follows
        cut = text.rfind(question, 0, end)
        if cut < 0:
            cut = text.rfind(question.rstrip(), 0, end)
        if cut < 0:
            raise ValueError("the chat template changes the question's text; cannot tell where it starts")
    else:
        text, cut = joined, len(joined) - len(question)
    enc = tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    first_q = next((i for i, (_, end) in enumerate(offsets) if end > cut), len(ids))
    if first_q == len(ids):
        raise ValueError("the question produced no tokens")
    return ids[:first_q], ids[first_q:]


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return eos


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _greedy(
    model: torch.nn.Module, session: SnapKVSession, cache: SnapKVCache, ids: list[int], start: int,
    max_new_tokens: int, eos: list[int],
) -> tuple[list[int], float, float]:
    """Feed ``ids`` at positions ``start...`` then decode greedily; returns tokens, prefill s, decode s."""
    device = model.device
    x = torch.tensor([ids], device=device)
    pos = torch.arange(start, start + len(ids), device=device)[None]
    _sync(device)
    t0 = time.perf_counter()
    logits = model(input_ids=x, position_ids=pos, **session.cache_kwargs(cache)).logits[:, -1]
    tok = int(logits.argmax(-1))
    _sync(device)
    t1 = time.perf_counter()
    out = [tok]
    nxt = start + len(ids)
    while len(out) < max_new_tokens and tok not in eos:
        step = torch.tensor([[tok]], device=device)
        where = torch.tensor([[nxt]], device=device)
        logits = model(input_ids=step, position_ids=where, **session.cache_kwargs(cache)).logits[:, -1]
        tok = int(logits.argmax(-1))
        out.append(tok)
        nxt += 1
    _sync(device)
    return out, t1 - t0, time.perf_counter() - t1


def _answer(tokenizer: Any, session: SnapKVSession, tokens: list[int], prompt_tokens: int, pre: float,
            dec: float, eos: list[int]) -> Answer:
    stats = list(session.stats)
    full = sum(s.bytes_before for s in stats)
    kept = sum(s.bytes_after for s in stats)
    kept_tokens = max((max(s.kept_tokens) for s in stats), default=None)
    text = tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True).strip()
    return Answer(text, tokens, prompt_tokens, kept_tokens, full, kept, pre, dec, stats)


def answer(
    model: torch.nn.Module,
    tokenizer: Any,
    context: str,
    question: str,
    config: SnapKVConfig | None = None,
    *,
    max_new_tokens: int = 32,
    chat: bool | None = None,
    compress: bool = True,
    backend: str = "auto",
    method: Method | None = None,
) -> Answer:
    """Answer ``question`` about ``context`` with a query-aware compressed cache (greedy).

    ``compress=False`` runs the same path with the full cache, for side-by-side comparison.
    ``backend``: ``"engine"`` (:class:`~snapkv.generation.Engine`: static cache, CUDA-graph
    decode; ``ValueError`` on a model it cannot run), ``"transformers"`` (:class:`SnapKVSession`
    and the model's own forward) or ``"auto"`` (the engine where it runs the model, else
    transformers). ``Answer.backend`` says which one ran.
    ``method``: how positions are chosen (default :class:`~snapkv.methods.SnapKV` from
    ``config``), wrappers included, e.g. ``AdaptiveHeads(SnapKV())`` (head-adaptive budgets),
    on either backend.
    """
    from snapkv.generation.answer import resolve_backend  # engine dispatch (see snapkv.generation.answer)

    backend = resolve_backend(model, backend)
    config = config or SnapKVConfig()
    ctx_ids, q_ids = split_prompt(tokenizer, context, question, chat)
    window = max(config.window, len(q_ids))
    if not compress:
        config = SnapKVConfig(budget=1.0, window=window)
    elif isinstance(config.budget, int) and config.budget <= window:
        raise ValueError(
            f"budget ({config.budget}) must exceed the observation window, which widens to the "
            f"question's {len(q_ids)} tokens so that none of them is dropped; raise budget above {window}"
        )
    eos = _eos_ids(model, tokenizer)
    if backend == "engine":
        from snapkv.generation.answer import engine_answer

        engine_config = dataclasses.replace(config, window=window)
        return engine_answer(model, tokenizer, ctx_ids + q_ids, engine_config, max_new_tokens, eos, method)
    with SnapKVSession(model, config, method=method) as session:
        session.window = window
        cache = session.new_cache()
        tokens, pre, dec = _greedy(model, session, cache, ctx_ids + q_ids, 0, max_new_tokens, eos)
        return _answer(tokenizer, session, tokens, len(ctx_ids) + len(q_ids), pre, dec, eos)


class ContextCache:
    """Compress a context once, then ask it many questions (context-only mode).

    Use as a context manager::

        with ContextCache(model, tokenizer, document, SnapKVConfig(budget=512)) as doc:
            print(doc.ask("Who wrote it?").text)
            print(doc.ask("When?").text)

    Args:
        model, tokenizer: a transformers decoder and its tokenizer.
        context: the document.
        config: budget (context tokens kept per layer and KV head) and window; the scoring
            settings (kernel, pooling, GQA reduction) of ``probe=`` and ``probe=False``.
        chat: wrap in the tokenizer's chat template (default: when it has one).
        probe: ``True`` (:data:`DEFAULT_PROBE`) or a text appended to the context while it is
            compressed: its tokens are the observation window (they vote instead of the
            context's last tokens), then they are cut, so the cache holds exactly the budget
            of context tokens; scored with ``config``'s kernel. ``False``: no probe, the
            context's last ``config.window`` tokens vote (SnapKV's plain context-only mode).
            On a model with sliding-window layers the engine keeps the probe's count more
            tokens in those layers and cuts the probe from every layer; the transformers path
            prefills twice there: the context alone gives the sliding layers, the context plus
            the probe the full-attention layers (the same cache). With ``probe``, ``method`` (if
            given) is the selection method the probe votes through.
        method: the query-agnostic scorer: :class:`~snapkv.methods.Probe` (a probe question
            votes through its SnapKV scorer, then is cut), :class:`~snapkv.methods.kvzip.KVzip`
            (context replay scores; runs on the transformers path, so ``backend="auto"``
            takes it there and ``"engine"`` raises), or a selection method without a probe
            (``SnapKV(...)``, wrappers such as ``AdaptiveHeads(SnapKV())``; with ``probe=``
            the probe votes through it). Default (both ``probe`` and ``method`` None): ``Probe()``, i.e. the
            default probe scored by ``SnapKV(kernel=31)`` (the reuse measurements' choice,
            docs/RESULTS.md "Reuse at 4x"). KVzip needs a model whose layers are all full
            attention (the replay is rolled back in every layer). :attr:`method` holds the
            method used.
        backend: ``"auto"``, ``"engine"`` or ``"transformers"``, as for :func:`answer`. On the
            engine the context is prefilled once into a static cache; each question is fed
            over it and rolled back after the answer.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, context: str, config: SnapKVConfig | None = None,
                 *, chat: bool | None = None, probe: bool | str | None = None, method: Method | None = None,
                 backend: str = "auto") -> None:
        from snapkv.generation.answer import resolve_backend  # engine dispatch (see snapkv.generation.answer)
        from snapkv.methods.kvzip import KVzip

        if probe is not None and not isinstance(probe, (bool, str)) or probe == "":
            raise ValueError(f"probe must be True, False, None or a non-empty text, got {probe!r}")
        if method is not None and not isinstance(method, Method):
            raise ValueError(f"method must be a snapkv Method ({CONTEXT_METHODS}, or a wrapper such as "
                             f"AdaptiveHeads(SnapKV())), got {type(method).__name__}")
        if isinstance(method, (Probe, KVzip)) and probe is not None:
            raise ValueError("give probe or method=Probe(...)/KVzip(...), not both (probe=True with "
                             "method=M is Probe(M))")
        self.backend = resolve_backend(model, backend)
        self._engine: Any = None
        self.model, self.tokenizer, self.context, self.chat = model, tokenizer, context, chat
        self.config = config or SnapKVConfig()
        own = SnapKV(kernel=self.config.kernel, pooling=self.config.pooling, gqa_reduce=self.config.gqa_reduce,
                     chunk_size=self.config.chunk_size)
        if isinstance(probe, str) or probe is True:  # the probe votes through method (default: config's SnapKV)
            method = Probe(method or own, DEFAULT_PROBE if probe is True else probe)
        elif probe is False:
            method = method or own
        elif method is None:
            method = Probe()
        # What scores the context on the session or the engine (None: KVzip's replay does).
        self._scorer = None if isinstance(method, KVzip) else method.method if isinstance(method, Probe) else method
        # The session selects with the probe's tail kept (a probe's votes, the context's last window).
        selector = probe_selector(method, self.config) if isinstance(method, Probe) else self._scorer
        self.session = SnapKVSession(model, self.config, method=selector)
        full_attention = len(self.session.full_layers) == len(self.session.layer_types)
        if isinstance(method, KVzip) and not full_attention:
            raise ValueError("method=KVzip(...) needs a model whose layers are all full attention: the replay "
                             "cannot be rolled back in sliding-window layers")
        # The transformers path cannot cut a probe from a sliding-window layer: it prefills the context
        # alone for them (the engine keeps the probe's count more in those layers and cuts it).
        self._two_prefills = isinstance(method, Probe) and not full_attention
        if isinstance(method, KVzip):
            if backend == "engine":
                raise ValueError("backend='engine' cannot run method=KVzip(...): it runs on the transformers path; "
                                 "use backend='transformers' or 'auto'")
            self.backend = "transformers"
        self.method: Method = method
        self.probe = method.text if isinstance(method, Probe) else None
        self._probe_tail = method.tail if isinstance(method, Probe) else None
        self._snap: Snapshot | None = None
        self.prefill_s = 0.0

    def __enter__(self) -> ContextCache:
        if self.backend == "engine":
            return self._enter_engine()
        self.session.__enter__()
        try:
            ctx_ids, _ = split_prompt(self.tokenizer, self.context, "?", self.chat)
            self._ctx_ids = ctx_ids
            self.context_tokens = len(ctx_ids)
            if self._replay():
                return self
            probe_ids = self._probe_ids(len(ctx_ids))
            _sync(self.model.device)
            t0 = time.perf_counter()
            alone = None
            if probe_ids and self._two_prefills:  # the sliding layers as the context alone leaves them
                alone = self.session.new_cache()
                with torch.no_grad():
                    self.model(input_ids=torch.tensor([ctx_ids], device=self.model.device), logits_to_keep=1,
                               **self.session.cache_kwargs(alone))
            self.cache = self.session.new_cache()
            x = torch.tensor([ctx_ids + probe_ids], device=self.model.device)
            with torch.no_grad():
                self.model(input_ids=x, logits_to_keep=1, **self.session.cache_kwargs(self.cache))
            _sync(self.model.device)
            self.prefill_s = time.perf_counter() - t0
            self.stats = list(self.session.stats)
            if probe_ids:  # the probe voted; now it leaves the cache
                g = len(probe_ids)
                for i, layer in enumerate(self.cache.layers):
                    if i in self.session.full_layers:
                        layer.drop_tail(g)
                    else:  # a sliding-window layer: the context-alone prefill's
                        self.cache.layers[i] = copy.copy(alone.layers[i])
                self.stats = [dataclasses.replace(
                    st, prompt_tokens=[n - g for n in st.prompt_tokens], kept_tokens=[k - g for k in st.kept_tokens],
                    bytes_after=self.cache.layers[st.layer].kv_bytes()) for st in self.stats]
            self._snap = self.cache.snapshot()
        except BaseException:
            self.session.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.backend == "engine":
            self._engine = None
            return
        if self._snap is not None and self.method.name == "kvzip":  # the replay's cache is its own
            self.cache.close()
        self.session.__exit__(*exc)

    # -- engine dispatch (snapkv.generation.answer) ------------------------------------------
    def _enter_engine(self) -> ContextCache:
        from snapkv.generation.answer import EngineContext

        ctx_ids, _ = split_prompt(self.tokenizer, self.context, "?", self.chat)
        probe_ids: list[int] = []
        if self.probe is not None:
            probe_ids = list(self.tokenizer(self.probe, add_special_tokens=False)["input_ids"])
            if probe_config(self.config, len(ctx_ids), len(probe_ids), self._probe_tail) is None:
                probe_ids = []  # the context fits its budget: nothing to select, no probe needed
        self._engine = EngineContext(self.model, self.tokenizer, self.config, ctx_ids, probe_ids,
                                     method=self._scorer,
                                     probe_tail=self._probe_tail)
        self._engine_ctx_ids = ctx_ids
        self.context_tokens, self.prefill_s, self.stats = len(ctx_ids), self._engine.prefill_s, self._engine.stats
        self._snap = None
        return self

    def _ask_engine(self, question: str, max_new_tokens: int) -> Answer:
        if self._engine is None:
            raise RuntimeError("use ContextCache inside a `with` block")
        ctx_ids, q_ids = split_prompt(self.tokenizer, self.context, question, self.chat)
        if ctx_ids != self._engine_ctx_ids:  # the compressed context must be a prefix of this prompt's tokens
            raise ValueError(f"question {question[:40]!r} changes how the context's last tokens are tokenized; "
                             "the compressed context is not a prefix of this prompt's tokens")
        return self._engine.ask(q_ids, max_new_tokens, _eos_ids(self.model, self.tokenizer))

    def _replay(self) -> bool:
        """KVzip: prefill, replay and select the context (transformers path); False for other methods."""
        from snapkv.methods.kvzip import DEFAULT_REPLAY_PROMPT, KVzip, kvzip_context_cache

        if not isinstance(self.method, KVzip):
            return False
        # The replay instruction after the context, with the chat framing up to the answer.
        _, prompt_ids = split_prompt(self.tokenizer, self.context, DEFAULT_REPLAY_PROMPT, self.chat)
        ids = torch.tensor([self._ctx_ids], device=self.model.device)
        _sync(self.model.device)
        t0 = time.perf_counter()
        self.cache, self.method = kvzip_context_cache(self.model, ids, prompt_ids, self.config, method=self.method)
        _sync(self.model.device)
        self.prefill_s = time.perf_counter() - t0
        self.session.activate(self.cache)
        self.stats = list(self.cache.stats)
        self._snap = self.cache.snapshot()
        return True

    def _probe_ids(self, context_tokens: int) -> list[int]:
        """The probe's token ids, with the session set to keep the budget of context tokens plus them."""
        if self.probe is None:
            return []
        ids = list(self.tokenizer(self.probe, add_special_tokens=False)["input_ids"])
        probed = probe_config(self.config, context_tokens, len(ids), self._probe_tail)
        if probed is None:  # the context fits its budget: nothing to select, no probe needed
            return []
        self.session.config = probed
        self.session.window = probed.window
        return ids

    def ask(self, question: str, max_new_tokens: int = 32) -> Answer:
        """Answer one question against the compressed context, then roll the cache back."""
        if self.backend == "engine":
            return self._ask_engine(question, max_new_tokens)
        if self._snap is None:
            raise RuntimeError("use ContextCache inside a `with` block")
        ctx_ids, q_ids = split_prompt(self.tokenizer, self.context, question, self.chat)
        if ctx_ids != self._ctx_ids:  # the cached context must be a prefix of the prompt's own tokenization
            raise ValueError(
                f"question {question[:40]!r} changes how the context's last tokens are tokenized, so the "
                "compressed context is not a prefix of this prompt's tokens; start the question with a letter"
            )
        eos = _eos_ids(self.model, self.tokenizer)
        try:
            tokens, pre, dec = _greedy(self.model, self.session, self.cache, q_ids, self.context_tokens,
                                       max_new_tokens, eos)
        finally:
            self.cache.restore(self._snap)
        self.session.stats = self.stats
        return _answer(self.tokenizer, self.session, tokens, self.context_tokens + len(q_ids),
                       self.prefill_s + pre, dec, eos)
