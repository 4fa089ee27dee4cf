"""One decode step over the static cache, and its CUDA-graph capture and replay.

:func:`decode_one_token` is plain eager torch with fixed shapes and no host sync: it reads the
last tokens and the cache's device counters, writes the new K/V in place and advances the
counters. :class:`DecodeRunner` captures it once (warm-up on a side stream first, as
nano-vllm and the PyTorch docs do) and replays the graph for every token; with
``use_graph=False`` (and always on CPU) it runs the same function eagerly.
"""

from __future__ import annotations

import torch

from snapkv.generation.adapter import DecoderParts
from snapkv.generation.attention import decode_attention
from snapkv.generation.fused import FusedOps, decode_one_token_fused, kernel_ops, twin_ops, unsupported_reason
from snapkv.generation.projections import FusedProjections
from snapkv.generation.projections import fuse_projections as fuse_layer_projections
from snapkv.generation.sampling import sample
from snapkv.generation.static_cache import StaticKVCache

__all__ = ["DecodeRunner", "decode_one_token", "sample"]


def decode_one_token(parts: DecoderParts, cache: StaticKVCache, tokens: torch.Tensor) -> torch.Tensor:
    """Run one token per row through the model; returns logits ``[B, V]``.

    Args:
        parts: the model's modules.
        cache: the static cache; its slot ``write_pos`` receives this token's K/V.
        tokens: ``[B]`` int64, the tokens to feed (the last ones generated).
    """
    b = tokens.shape[0]
    if b != cache.batch:
        raise ValueError(f"decode got {b} tokens for a cache of {cache.batch} rows")
    cache.open_slot()
    x = parts.embed(tokens[:, None])  # [B, 1, H]
    cos, sin = parts.rope(x, cache.positions[:, None])  # [B, 1, D]
    for li, layer in enumerate(parts.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = parts.queries(li, h, cos, sin)  # [B, Hq, 1, D]
        k, v = parts.keys_values(li, h, cos, sin)  # [B, Hkv, 1, D]
        cache.append(li, k, v)
        o = decode_attention(q, cache.keys[li], cache.values[li], cache.bias[li], parts.scaling)  # [B, 1, Hq*D]
        x = x + attn.o_proj(o)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    logits = parts.lm_head(parts.norm(x))[:, -1]  # [B, V]
    cache.advance()
    return logits


class DecodeRunner:
    """Decode steps over one static cache: captured once as a CUDA graph, then replayed.

    The runner owns the static input (``tokens``, the last token of each row) and output
    (``logits``, ``next_tokens``) buffers; each :meth:`step` consumes ``tokens`` and leaves
    the sampled tokens in both ``next_tokens`` and ``tokens``, ready for the next step.
    Outputs are overwritten by the next step: clone what you keep.

    Args:
        parts: the model's modules.
        cache: the cache the graph is bound to (its buffers must not be reallocated).
        use_graph: capture a CUDA graph (default: when the cache is on CUDA).
        temperature: 0 for greedy, else sampling temperature (fixed at capture).
        pool: a graph memory pool to share between runners (``torch.cuda.graph_pool_handle()``).
        fused: use :mod:`snapkv.generation.fused` (Triton kernels on CUDA, torch twins elsewhere);
            default: on CUDA when Triton imports and the model's layers allow it.
        fuse_projections: with the fused step, run each layer's q/k/v and gate/up as one GEMM each
            over one shared buffer (:mod:`snapkv.generation.projections`: the modules' weights
            become slices of it, same values and memory); default: with the Triton kernels (CUDA).
    """

    def __init__(
        self,
        parts: DecoderParts,
        cache: StaticKVCache,
        *,
        use_graph: bool | None = None,
        temperature: float = 0.0,
        pool: object | None = None,
        fused: bool | None = None,
        fuse_projections: bool | None = None,
    ) -> None:
        device = cache.keys.device
        self.parts, self.cache, self.temperature = parts, cache, temperature
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        if self.use_graph and device.type != "cuda":
            raise ValueError("use_graph=True needs the cache on a CUDA device")
        with torch.inference_mode(False):  # plain tensors, like the cache's
            self.tokens = torch.zeros(cache.batch, dtype=torch.long, device=device)
            self.next_tokens = torch.zeros_like(self.tokens)
            self.logits = torch.zeros(cache.batch, parts.vocab_size, dtype=parts.dtype, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._capture_stream: torch.cuda.Stream | None = None
        self.pool = pool
        self.capture_s = 0.0
        self.ops = self._pick_ops(fused, device)
        if fuse_projections and self.ops is None:
            raise ValueError("fuse_projections=True needs the fused decode step (fused=True on a model it can run)")
        if fuse_projections is None:
            fuse_projections = self.ops is not None and device.type == "cuda"
        self.proj: FusedProjections | None = fuse_layer_projections(parts.layers) if fuse_projections else None

    def _pick_ops(self, fused: bool | None, device: torch.device) -> FusedOps | None:
        reason = unsupported_reason(self.parts)
        if fused is False or (fused is None and (device.type != "cuda" or reason is not None)):
            return None
        if reason is not None:
            raise ValueError(f"fused decode cannot run this model: {reason}")
        if device.type != "cuda":
            return twin_ops()
        try:
            return kernel_ops()
        except ImportError:
            if fused:
                raise
            return None

    def _step(self) -> None:
        if self.ops is not None:
            logits = decode_one_token_fused(self.parts, self.cache, self.tokens, self.ops, self.proj)
        else:
            logits = self.parts.decode_step(self.cache, self.tokens)
        nxt = sample(logits, self.temperature)
        self.logits.copy_(logits)
        self.next_tokens.copy_(nxt)
        self.tokens.copy_(nxt)

    @torch.inference_mode()
    def capture(self, warmup: int = 2) -> None:
        """Warm up on a side stream, rewind, and capture one step (no-op without graphs)."""
        if not self.use_graph or self.graph is not None:
            return
        import time

        t0 = time.perf_counter()
        self.cache.check_room(1)
        if self.proj is not None and not self.proj.valid():  # a parameter was replaced since: fuse again
            self.proj = fuse_layer_projections(self.parts.layers)
        # Every stream's pending work first: the cache may have been allocated and initialised on another
        # thread's stream (the server builds it on the main thread and captures on its decode stream); a
        # warm-up that overtook those initialisations read garbage write positions (out-of-bounds scatters).
        torch.cuda.synchronize(self.cache.keys.device)
        state = self.cache.state()
        saved = self.tokens.clone()
        # The runner's own stream for warm-up and capture: not torch.cuda.graph's shared default capture stream.
        stream = self._capture_stream = torch.cuda.Stream(self.cache.keys.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # each warm-up step writes the same slot, then is undone
                self._step()
                self.cache.rewind(state)
                self.tokens.copy_(saved)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=stream):
            self._step()
        self.graph = graph
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0

    @torch.inference_mode()
    def feed(self, tokens: torch.Tensor) -> None:
        """Set the tokens the next step consumes (``[B]``), e.g. the prefill's first tokens."""
        self.tokens.copy_(tokens)

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """Decode one token per row; returns the ``[B]`` next-token buffer (overwritten next step)."""
        self.cache.check_room(1)
        if self.use_graph:
            if self.graph is None:
                self.capture()
            self.graph.replay()
        else:
            self._step()
        self.cache.host_pos += 1
        return self.next_tokens
