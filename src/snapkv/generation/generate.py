"""The generation loop: memory check, layer-bounded prefill, captured decode.

Example::

    engine = Engine(model, SnapKVConfig(budget=2048))
    out = engine.generate(input_ids, attention_mask, max_new_tokens=64)
    out.tokens  # [B, 64]

    # head-adaptive budgets (AdaKV): each layer's heads share budget * Hkv tokens
    engine = Engine(model, SnapKVConfig(budget=2048), method=AdaptiveHeads(SnapKV()))

    stream = engine.stream(input_ids, max_new_tokens=64, temperature=0.7, top_p=0.9, seed=1,
                           eos_token_id=[2, 7], stop=["\n\n"], tokenizer=tok)
    for step in stream:  # one StreamStep per position: step.tokens, step.text, step.finished
        print(step.text[0], end="")
    stream.output.finish_reasons  # ["stop"] or ["length"]

Batches padded on either side are accepted: each row is prefilled on its own real tokens
(positions ``0 .. n_b - 1``) and decodes from position ``n_b``, as transformers' ``generate`` does.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from snapkv.config import SnapKVConfig
from snapkv.core.budgets import PROFILES
from snapkv.generation.adapter import runner_for
from snapkv.generation.attention import PREFILL_BACKENDS, default_prefill_backend
from snapkv.generation.decode import DecodeRunner
from snapkv.generation.memory import NotEnoughMemoryError, available_bytes, cache_bytes, check_fits
from snapkv.generation.own_layers import OwnLayers
from snapkv.generation.prefill import PrefillStats, prefill
from snapkv.generation.sampling import SamplingParams
from snapkv.generation.selfcheck import self_check as run_self_check
from snapkv.generation.static_cache import PromptStaging, StaticKVCache
from snapkv.generation.stream import Stream, StreamStep, check_stop, decode_stream, eos_list
from snapkv.methods.base import Method
from snapkv.methods.snapkv import SnapKV


@dataclass
class GenerationOutput:
    """Generated tokens and what they cost.

    Attributes:
        tokens: ``[B, T]`` generated tokens (the first one comes from the prefill). A row that
            finished early (eos or stop string) is padded after its last token with the first
            eos id (0 without eos ids); ``lengths`` says where.
        logits: per step ``[B, V]`` logits (``return_logits=True``), else empty.
        ttft_s: seconds from the call to the first tokens (memory check, cache, prefill, sampling).
        decode_s: seconds of the remaining ``T - 1`` steps (graph capture included).
        capture_s: seconds spent capturing the decode graph.
        prefill: lengths, kept tokens and per-phase times of the prefill.
        cache: the static cache, holding the prompt's kept tokens and the generated ones.
        lengths: tokens each row generated, its finishing token (eos, or the one completing a
            stop string) included.
        finish_reasons: per row ``"stop"`` (an eos id or a stop string) or ``"length"``.
        texts: per row the decoded text, cut before any stop string (with a tokenizer), else None.
    """

    tokens: torch.Tensor
    logits: list[torch.Tensor] = field(default_factory=list)
    ttft_s: float = 0.0
    decode_s: float = 0.0
    capture_s: float = 0.0
    prefill: PrefillStats | None = None
    cache: StaticKVCache | None = None
    lengths: list[int] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    texts: list[str] | None = None


def split_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """The real (unpadded) token ids of each row of a left- or right-padded batch."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if attention_mask is None:
        return list(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    rows = [ids[m.bool()] for ids, m in zip(input_ids, attention_mask, strict=True)]
    if any(r.numel() == 0 for r in rows):
        raise ValueError("every row needs at least one real token (attention_mask row of zeros)")
    return rows


class Engine:
    """SnapKV generation: bounded prefill, static cache, CUDA-graph decode.

    Args:
        model: a transformers ``*ForCausalLM`` of a supported model type (see
            :func:`~snapkv.generation.adapter.supported_model_types`: Llama, Mistral, Qwen2,
            Qwen3 hand-wired; Gemma 2, Gemma 3, Phi-3, and Mistral or Qwen2 configs with
            sliding-window layers on their own decoder layers, see
            :mod:`~snapkv.generation.own_layers`), on one device.
        config: window and budget; None keeps the full prompt cache (same engine, no scoring).
        method: how positions are scored and selected (default :class:`~snapkv.methods.SnapKV`
            from the config). Wrappers apply as on the transformers path:
            :class:`~snapkv.methods.PyramidBudgets` sets per-layer budgets, and
            :class:`~snapkv.methods.AdaptiveHeads` shares each layer's ``budget * Hkv`` tokens
            between its KV heads (AdaKV): each head's kept tokens get their own segment of the
            static cache, sized by the fullest head (known after the prefill, see
            :class:`~snapkv.generation.static_cache.PromptStaging`), and the fused decode's
            ragged attention reads each head's own tokens only. The wrapper's ``slack`` (room
            per head on the transformers path) does not apply: ``max_new_tokens`` sizes the room.
        layer_profile: ``"uniform"`` or ``"pyramid"`` budgets across layers.
        prefill_chunk: query (and MLP) rows per prefill step; bounds the activations.
        attention_backend: prefill attention by query chunks (``flash``, ``cudnn``, ``cudnn_gqa``,
            ``ref``); default per device.
        whole_layer_bytes: prompts whose per-layer queries plus attention output fit in this many
            bytes attend over the whole layer in one call (default 4 GiB on CUDA, 0 elsewhere).
        use_graph: capture the decode step as a CUDA graph (default: on CUDA).
        fused: fused decode kernels (default: on CUDA when the model allows, see
            :mod:`snapkv.generation.fused`).
        self_check: compare the engine's logits with the model's own forward on a short
            prompt (once per model object and setting, see :mod:`snapkv.generation.selfcheck`)
            and raise ``ValueError`` on a mismatch. ``False`` skips it: UNSAFE, the engine may
            then compute another model than the one given, silently.
        own_layers: run the model's own decoder layers (:mod:`snapkv.generation.own_layers`)
            whatever its type's registered runner (the reference twin of the hand-wired path).

    Raises:
        ValueError: a model type the engine cannot run (naming the supported ones), a setting
            out of range, or a failed self-check.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: SnapKVConfig | None = None,
        *,
        method: Method | None = None,
        layer_profile: str = "uniform",
        prefill_chunk: int = 8192,
        attention_backend: str | None = None,
        whole_layer_bytes: int | None = None,
        use_graph: bool | None = None,
        fused: bool | None = None,
        self_check: bool = True,
        own_layers: bool = False,
    ) -> None:
        if layer_profile not in PROFILES:
            raise ValueError(f"layer_profile must be one of {PROFILES}, got {layer_profile!r}")
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
        if not isinstance(own_layers, bool):
            raise ValueError(f"own_layers must be True or False, got {own_layers!r}")
        self.parts = OwnLayers.from_model(model) if own_layers else runner_for(model)
        self.config = config
        if method is None:
            c = config or SnapKVConfig()
            method = SnapKV(kernel=c.kernel, pooling=c.pooling, gqa_reduce=c.gqa_reduce, chunk_size=c.chunk_size)
        self.method = method
        self.layer_profile = layer_profile
        self.prefill_chunk = prefill_chunk
        backend = attention_backend or default_prefill_backend(self.parts.device)
        if backend not in PREFILL_BACKENDS:
            raise ValueError(f"attention_backend must be one of {PREFILL_BACKENDS}, got {backend!r}")
        self.backend = backend
        if whole_layer_bytes is None:
            whole_layer_bytes = 4 * 1024**3 if self.parts.device.type == "cuda" else 0
        self.whole_layer_bytes = whole_layer_bytes
        self.use_graph = use_graph
        self.fused = fused
        #: Relative logit error of the self-check (None when skipped).
        self.self_check_error = run_self_check(self) if self_check else None

    # -- planning --------------------------------------------------------------------------------
    @property
    def per_head(self) -> bool:
        """Whether the method keeps a different count per KV head (head-adaptive budgets)."""
        return self.method.slack is not None

    def prompt_slots(self, length: int, compress: bool = True, probe_tokens: int = 0) -> int:
        """Cache slots one prompt of ``length`` tokens needs (its largest layer budget).

        With head-adaptive budgets this is the per-head average; the cache built after the
        prefill holds the fullest head's count (:class:`~snapkv.generation.static_cache.PromptStaging`).
        """
        return self.parts.prompt_slots(self.config if compress else None, length, self.layer_profile, self.method,
                                       probe_tokens)

    def new_cache(self, lengths: list[int], max_new_tokens: int, compress: bool = True,
                  probe_tokens: int = 0) -> StaticKVCache:
        """A static cache for rows of these prompt lengths, after checking that everything fits.

        Raises :class:`~snapkv.generation.memory.NotEnoughMemoryError` before any allocation
        when the cache plus the prefill's work would not fit in the device's free memory.
        """
        slots = self._check_fits(lengths, max_new_tokens, compress, probe_tokens)
        return self.parts.make_cache(len(lengths), slots, max_new_tokens)

    def _check_fits(self, lengths: list[int], max_new_tokens: int, compress: bool, probe_tokens: int = 0) -> int:
        """The prompt slots of these rows, once :func:`check_fits` passed (raises before allocating)."""
        slots = max(self.prompt_slots(n, compress, probe_tokens) for n in lengths)
        check_fits(
            self.parts,
            lengths,
            slots + max_new_tokens,
            self.prefill_chunk,
            compressed=compress and self.config is not None,
            capacity_for=lambda n: self.prompt_slots(n, compress, probe_tokens) + max_new_tokens,
            whole_layer_bytes=self.whole_layer_bytes,
        )
        return slots

    def _build_staged(self, staging: PromptStaging, max_new_tokens: int) -> StaticKVCache:
        """The static cache of a head-adaptive prefill, sized by its fullest head (checked first)."""
        slots = staging.prompt_slots()
        need = cache_bytes(self.parts, staging.batch, slots + max_new_tokens)
        free = available_bytes(self.parts.device)
        if free is not None and need > free:
            raise NotEnoughMemoryError(
                f"the head-adaptive cache ({slots} prompt slots per head: the fullest head's count, "
                f"+ {max_new_tokens} new) needs {need / 2**30:.1f} GiB, only {free / 2**30:.1f} GiB is free",
                need, free, "a smaller budget, fewer rows, or a larger alpha (more even heads)")
        return staging.build(self.parts.make_cache, max_new_tokens)

    def runner(self, cache: StaticKVCache, temperature: float = 0.0) -> DecodeRunner:
        """A decode runner over ``cache`` with this engine's graph and fused-kernel settings."""
        return DecodeRunner(self.parts, cache, use_graph=self.use_graph, temperature=temperature, fused=self.fused)

    # -- the two phases --------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        num_layers: int | None = None,
        *,
        compress: bool = True,
        probe_tokens: int = 0,
    ) -> tuple[StaticKVCache, torch.Tensor, PrefillStats]:
        """Check memory, allocate the cache and prefill it: ``(cache, last logits [B, V], stats)``.

        ``input_ids [B, n]`` may be padded on either side (``attention_mask`` marks the real
        tokens); ``compress=False`` keeps every prompt token whatever the config.
        ``probe_tokens``: every row ends with a probe of that many tokens (e.g.
        :class:`~snapkv.methods.Probe`'s question; the engine's config and method make it the
        observation window: :func:`~snapkv.methods.probe.probe_config`) that leaves the cache after the
        prefill: each layer drops it (``drop_prompt_tail``), sliding-window layers having kept that
        many more tokens so that their last ``window - 1`` context tokens remain. The cache then
        holds the context alone, next position the context's length; ``stats`` and the returned
        logits are the prefill's (the probe's last position).
        An out-of-memory during the prefill frees what it allocated and is raised again as a
        :class:`~snapkv.generation.memory.NotEnoughMemoryError`; the engine stays usable.
        """
        rows = [r.to(self.parts.device) for r in split_rows(input_ids, attention_mask)]
        lengths = [r.numel() for r in rows]
        if isinstance(probe_tokens, bool) or not isinstance(probe_tokens, int) or not 0 <= probe_tokens < min(lengths):
            raise ValueError(f"probe_tokens must be an integer in [0, {min(lengths)}) (the shortest row's tokens), "
                             f"got {probe_tokens!r}")
        if probe_tokens and (not compress or self.config is None):
            raise ValueError("probe_tokens needs compression (a config, compress=True): the probe votes, then leaves")
        oom = None
        config = self.config if compress else None
        staged = config is not None and self.per_head  # per-head counts: the cache is sized after the prefill
        try:
            if staged:  # the staging holds the kept tokens: a uniform cache's bytes
                self._check_fits(lengths, max_new_tokens, compress, probe_tokens)
                target: StaticKVCache | PromptStaging = PromptStaging(self.parts.num_layers, len(rows))
            else:
                target = self.new_cache(lengths, max_new_tokens, compress, probe_tokens)  # raises before allocating
            logits, stats = prefill(
                self.parts,
                rows,
                target,
                config=config,
                method=self.method,
                layer_profile=self.layer_profile,
                chunk=self.prefill_chunk,
                backend=self.backend,
                num_layers=num_layers,
                whole_layer_bytes=self.whole_layer_bytes,
                probe_tokens=probe_tokens,
            )
            cache = self._build_staged(target, max_new_tokens) if isinstance(target, PromptStaging) else target
            if probe_tokens:  # the probe voted; now it leaves every layer of every row
                for row in range(cache.batch):
                    cache.drop_prompt_tail(row, probe_tokens)
        except torch.OutOfMemoryError as err:
            oom = str(err).splitlines()[0]
        if oom is not None:  # outside the handler, so the failed frames' tensors are already gone
            cache = target = None
            _release()
            raise NotEnoughMemoryError(
                f"out of memory prefilling {len(rows)} prompt(s) of up to {max(lengths)} tokens ({oom}); "
                "lower prefill_chunk or the batch, or set a smaller budget",
                0,
                0,
                "prefill_chunk=2048",
            )
        return cache, logits, stats

    @torch.inference_mode()
    def extend(self, runner: DecodeRunner, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens [B, T]`` after the cache's last position (teacher-forced decode steps).

        Returns the logits ``[B, V]`` of the last one. Used to put a question over a
        compressed context; :meth:`StaticKVCache.state` before and
        :meth:`StaticKVCache.rewind` after take it out again.
        """
        if tokens.dim() != 2 or tokens.shape[0] != runner.cache.batch or tokens.shape[1] < 1:
            raise ValueError(f"tokens must be [batch={runner.cache.batch}, T>=1], got {tuple(tokens.shape)}")
        runner.cache.check_room(tokens.shape[1])
        tokens = tokens.to(runner.tokens.device)
        for t in range(tokens.shape[1]):
            runner.feed(tokens[:, t])
            runner.step()
        return runner.logits

    def decode(
        self,
        runner: DecodeRunner,
        logits: torch.Tensor,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
        tokenizer: Any = None,
        return_logits: bool = False,
    ) -> Stream:
        """Stream up to ``max_new_tokens`` per row from ``logits [B, V]`` of the runner's last position.

        The first token is chosen from ``logits``; each further one is a decode step. See
        :meth:`stream` for the arguments; the stream's ``output`` has no prefill fields.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        params = SamplingParams(temperature, top_p, top_k, seed)
        eos, stops = eos_list(eos_token_id), check_stop(stop, tokenizer)
        runner.cache.check_room(max_new_tokens - 1)
        kept: list[torch.Tensor] = []
        sync = _synchronizer(self.parts.device)
        t0 = time.perf_counter()
        if max_new_tokens > 1:
            runner.capture()  # no-op once captured, and without graphs
        capture_s = time.perf_counter() - t0
        steps = decode_stream(runner, logits, max_new_tokens=max_new_tokens, params=params, eos=eos, stop=stops,
                              tokenizer=tokenizer, on_logits=(lambda x: kept.append(x.clone())) if return_logits
                              else None, sync=sync)

        def finish(seen: list[StreamStep]) -> GenerationOutput:
            b = logits.shape[0]
            pad = eos[0] if eos else 0
            rows = [[s.tokens[r] for s in seen if s.tokens[r] is not None] for r in range(b)]
            width = len(seen)
            out = GenerationOutput(
                tokens=torch.tensor([row + [pad] * (width - len(row)) for row in rows], dtype=torch.long),
                logits=kept[:width],
                capture_s=capture_s,
                cache=runner.cache,
                lengths=[len(row) for row in rows],
                finish_reasons=[next(s.finished[r] for s in seen if s.finished[r]) for r in range(b)],
                texts=None if tokenizer is None else ["".join(s.text[r] for s in seen) for r in range(b)],
            )
            out.decode_s = time.perf_counter() - t0
            return out

        return Stream(steps, finish)

    def stream(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
        tokenizer: Any = None,
        return_logits: bool = False,
    ) -> Stream:
        """Prefill, then stream the generation step by step.

        Iterate the returned :class:`~snapkv.generation.stream.Stream` for one
        :class:`~snapkv.generation.stream.StreamStep` per position (per row: token id, new
        text, finish reason); afterwards ``stream.output`` is the :class:`GenerationOutput`.
        The prefill runs at the first iteration.

        Args:
            input_ids: ``[B, n]`` prompts, padded on either side.
            attention_mask: ``[B, n]`` 1 on real tokens (None: no padding).
            max_new_tokens: tokens per row at most (the first comes from the prefill).
            temperature: 0 greedy, else sampled (see :class:`~snapkv.generation.sampling.SamplingParams`).
            top_p, top_k: nucleus and top-k filters of the sampling.
            seed: the request's sampling seed (same seed, same device: same tokens).
            eos_token_id: one id or several; a row stops after producing one.
            stop: strings that end a row; its text is cut before them (needs ``tokenizer``).
            tokenizer: decodes text pieces (``tokenizer.decode(ids, skip_special_tokens=True)``).
            return_logits: keep each step's ``[B, V]`` logits in the output.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        SamplingParams(temperature, top_p, top_k, seed)  # validate before any model work
        eos_list(eos_token_id)
        check_stop(stop, tokenizer)
        holder: dict[str, Any] = {}

        def steps() -> Iterator[StreamStep]:
            sync = _synchronizer(self.parts.device)
            t0 = time.perf_counter()
            cache, logits, stats = self.prefill(input_ids, attention_mask, max_new_tokens)  # inference mode
            sync()
            ttft = time.perf_counter() - t0
            inner = self.decode(self.runner(cache), logits, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                eos_token_id=eos_token_id, stop=stop, tokenizer=tokenizer,
                                return_logits=return_logits)
            yield from inner
            out = inner.output
            out.prefill, out.ttft_s = stats, ttft
            holder["out"] = out

        return Stream(steps(), lambda seen: holder["out"])

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
        tokenizer: Any = None,
        streamer: Callable[[StreamStep], None] | None = None,
        return_logits: bool = False,
    ) -> GenerationOutput:
        """Generate up to ``max_new_tokens`` per row; :meth:`stream`'s arguments.

        ``streamer`` is called with each :class:`~snapkv.generation.stream.StreamStep` as it
        is produced. Rows that finish early are padded with the first eos id (see
        :class:`GenerationOutput`).
        """
        stream = self.stream(input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, top_k=top_k, seed=seed, eos_token_id=eos_token_id, stop=stop,
                             tokenizer=tokenizer, return_logits=return_logits)
        for step in stream:
            if streamer is not None:
                streamer(step)
        return stream.output


def _synchronizer(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _release() -> None:
    """Drop freed blocks after an out-of-memory so the next request starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["Engine", "GenerationOutput", "NotEnoughMemoryError", "split_rows"]
