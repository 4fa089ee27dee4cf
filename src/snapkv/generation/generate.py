"""The generation loop: memory check, layer-bounded prefill, captured decode.

Example::

    engine = Engine(model, SnapKVConfig(budget=2048))
    out = engine.generate(input_ids, attention_mask, max_new_tokens=64)
    out.tokens  # [B, 64]

Left-padded batches are accepted: each row is prefilled on its own real tokens (positions
``0 .. n_b - 1``) and decodes from position ``n_b``, as transformers' ``generate`` does.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import torch

from snapkv.config import SnapKVConfig
from snapkv.core.budgets import PROFILES
from snapkv.generation.adapter import DecoderParts
from snapkv.generation.attention import PREFILL_BACKENDS, default_prefill_backend
from snapkv.generation.decode import DecodeRunner, sample
from snapkv.generation.memory import NotEnoughMemoryError, check_fits
from snapkv.generation.own_layers import OwnLayers, uses_own_layers
from snapkv.generation.own_run import OwnDecodeRunner, own_prefill
from snapkv.generation.prefill import PrefillStats, kept_per_layer, prefill
from snapkv.generation.static_cache import StaticKVCache
from snapkv.methods.base import Method
from snapkv.methods.snapkv import SnapKV


@dataclass
class GenerationOutput:
    """Generated tokens and what they cost.

    Attributes:
        tokens: ``[B, T]`` generated tokens (the first one comes from the prefill).
        logits: per step ``[B, V]`` logits (``return_logits=True``), else empty.
        ttft_s: seconds from the call to the first tokens (memory check, cache, prefill, sampling).
        decode_s: seconds of the remaining ``T - 1`` steps (graph capture included).
        capture_s: seconds spent capturing the decode graph.
        prefill: lengths, kept tokens and per-phase times of the prefill.
        cache: the static cache, holding the prompt's kept tokens and the generated ones.
    """

    tokens: torch.Tensor
    logits: list[torch.Tensor] = field(default_factory=list)
    ttft_s: float = 0.0
    decode_s: float = 0.0
    capture_s: float = 0.0
    prefill: PrefillStats | None = None
    cache: StaticKVCache | None = None


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
    """SnapKV generation for Llama-family models: bounded prefill, static cache, CUDA-graph decode.

    Args:
        model: a transformers ``*ForCausalLM`` on one device: Llama, Mistral, Qwen2, Qwen3
            (hand-wired), Gemma 2, Gemma 3, Phi-3 (their own layers, see ``own_layers``).
        config: window and budget; None keeps the full prompt cache (same engine, no scoring).
        method: how positions are scored (default :class:`~snapkv.methods.SnapKV` from the config).
        layer_profile: ``"uniform"`` or ``"pyramid"`` budgets across layers.
        prefill_chunk: query (and MLP) rows per prefill step; bounds the activations.
        attention_backend: prefill attention by query chunks (``flash``, ``cudnn``, ``cudnn_gqa``,
            ``ref``); default per device.
        whole_layer_bytes: prompts whose per-layer queries plus attention output fit in this many
            bytes attend over the whole layer in one call (default 4 GiB on CUDA, 0 elsewhere).
        use_graph: capture the decode step as a CUDA graph (default: on CUDA).
        fused: fused decode kernels (default: on CUDA when the model allows, see
            :mod:`snapkv.generation.fused`).
        own_layers: run the model's own decoder layers (:mod:`snapkv.generation.own_layers`)
            instead of the hand-wired Llama layout; default: for the model types that need it
            (Gemma 2, Gemma 3, Phi-3, and Mistral or Qwen2 configs with sliding-window layers).
            ``True`` on a Llama-family model gives the reference twin of the hand-wired path.
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
        own_layers: bool | None = None,
    ) -> None:
        if layer_profile not in PROFILES:
            raise ValueError(f"layer_profile must be one of {PROFILES}, got {layer_profile!r}")
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
        self.own = uses_own_layers(model) if own_layers is None else bool(own_layers)
        self.parts = OwnLayers.from_model(model) if self.own else DecoderParts.from_model(model)
        if self.own and fused:
            raise ValueError("fused=True runs the hand-wired Llama layout; own_layers runs the model's own layers")
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

    # -- planning --------------------------------------------------------------------------------
    def prompt_slots(self, length: int) -> int:
        """Cache slots one prompt of ``length`` tokens needs (its largest layer budget)."""
        if self.own:
            return self.parts.prompt_slots(self.config, length, self.layer_profile)
        return max(kept_per_layer(self.config, length, self.parts.num_layers, self.layer_profile))

    def new_cache(self, lengths: list[int], max_new_tokens: int) -> StaticKVCache:
        """A static cache for rows of these prompt lengths, after checking that everything fits.

        Raises :class:`~snapkv.generation.memory.NotEnoughMemoryError` before any allocation
        when the cache plus the prefill's work would not fit in the device's free memory.
        """
        slots = max(self.prompt_slots(n) for n in lengths)
        check_fits(
            self.parts,
            lengths,
            slots + max_new_tokens,
            self.prefill_chunk,
            compressed=self.config is not None,
            capacity_for=lambda n: self.prompt_slots(n) + max_new_tokens,
            whole_layer_bytes=self.whole_layer_bytes,
        )
        p = self.parts
        return StaticKVCache(
            p.num_layers, len(lengths), p.num_kv_heads, p.head_dim, slots, max_new_tokens,
            dtype=p.dtype, device=p.device,
        )

    def runner(self, cache: StaticKVCache, temperature: float = 0.0) -> DecodeRunner:
        """A decode runner over ``cache`` with this engine's graph and fused-kernel settings."""
        runner = OwnDecodeRunner if self.own else DecodeRunner
        return runner(self.parts, cache, use_graph=self.use_graph, temperature=temperature, fused=self.fused)

    # -- the two phases --------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        num_layers: int | None = None,
    ) -> tuple[StaticKVCache, torch.Tensor, PrefillStats]:
        """Check memory, allocate the cache and prefill it: ``(cache, last logits [B, V], stats)``.

        An out-of-memory during the prefill frees what it allocated and is raised again as a
        :class:`~snapkv.generation.memory.NotEnoughMemoryError`; the engine stays usable.
        """
        rows = [r.to(self.parts.device) for r in split_rows(input_ids, attention_mask)]
        lengths = [r.numel() for r in rows]
        oom = None
        try:
            cache = self.new_cache(lengths, max_new_tokens)  # raises before allocating if it cannot fit
            run = own_prefill if self.own else prefill
            extra = {} if self.own else {"whole_layer_bytes": self.whole_layer_bytes}
            logits, stats = run(
                self.parts,
                rows,
                cache,
                config=self.config,
                method=self.method,
                layer_profile=self.layer_profile,
                chunk=self.prefill_chunk,
                backend=self.backend,
                num_layers=num_layers,
                **extra,
            )
        except torch.OutOfMemoryError as err:
            oom = str(err).splitlines()[0]
        if oom is not None:  # outside the handler, so the failed frames' tensors are already gone
            cache = None
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
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        eos_token_id: int | None = None,
        return_logits: bool = False,
    ) -> GenerationOutput:
        """Generate up to ``max_new_tokens`` per row (rows that hit ``eos_token_id`` then repeat it)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        sync = _synchronizer(self.parts.device)
        t0 = time.perf_counter()
        cache, logits, stats = self.prefill(input_ids, attention_mask, max_new_tokens)
        first = sample(logits, temperature)
        sync()
        out = GenerationOutput(tokens=first[:, None], prefill=stats, cache=cache)
        out.ttft_s = time.perf_counter() - t0
        if return_logits:
            out.logits.append(logits.clone())
        t1 = time.perf_counter()
        runner = self.runner(cache, temperature)
        runner.feed(first)
        runner.capture()
        out.capture_s = runner.capture_s
        tokens = [first]
        done = first == eos_token_id if eos_token_id is not None else None
        for step in range(1, max_new_tokens):
            nxt = runner.step().clone()
            if done is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt == eos_token_id)
            tokens.append(nxt)
            if return_logits:
                out.logits.append(runner.logits.clone())
            if done is not None and step % 16 == 0 and bool(done.all()):
                break
        out.tokens = torch.stack(tokens, dim=1)
        sync()
        out.decode_s = time.perf_counter() - t1
        return out


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
