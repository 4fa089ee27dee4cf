"""Tensor parallelism over ``torch.distributed``: rank-local models and all-reduced partial sums.

Each rank holds a *rank-local* model: the same architecture with ``num_attention_heads``,
``num_key_value_heads`` and ``intermediate_size`` divided by the world size. It holds its slice
of the query, key and value projections (rows), of ``o_proj`` (columns), of the MLP's gate and up
projections (rows) and of ``down_proj`` (columns); embeddings, norms and ``lm_head`` are
replicated (Megatron's layout, and transformers' ``tp_plan`` for these families). Attention and
MLP outputs are then partial sums: :class:`TensorParallel` all-reduces the outputs of ``o_proj``
and ``down_proj`` through forward hooks that exist only inside its ``with`` block.

SnapKV needs no communication: each rank scores and keeps its own KV heads (a KV head and its
query heads live on one rank). With head-adaptive budgets (``AdaptiveHeads``) each rank's heads
share that rank's part of the layer's total, not the whole layer's (on both paths alike).
The same hooks serve the transformers path (``model.generate``
with a SnapKV cache) and the engine (:class:`~snapkv.generation.Engine`, whose prefill and
captured decode call these modules; NCCL all-reduces are captured in the CUDA graph).

Example (``torchrun --nproc-per-node 2``)::

    dist.init_process_group("nccl"); rank, world = dist.get_rank(), dist.get_world_size()
    local = shard_model(full_model, rank, world).to(f"cuda:{rank}")
    with TensorParallel(local):
        out = Engine(local, SnapKVConfig(budget=2048)).generate(ids, max_new_tokens=64)

Every rank must feed the same inputs and sample with the same seed.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist

#: Families whose layers follow the Llama layout that :func:`shard_model` slices.
TP_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")


def _text_config(config: Any) -> Any:
    return config.get_text_config(decoder=True)


def local_config(config: Any, world: int) -> Any:
    """A copy of ``config`` with the heads and MLP width of one of ``world`` ranks.

    Raises ``ValueError`` when the model type is not supported or a width does not divide.
    """
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an integer >= 1, got {world!r}")
    text = _text_config(config)
    if text.model_type not in TP_MODEL_TYPES:
        raise ValueError(f"tensor parallelism supports model types {TP_MODEL_TYPES}, got {text.model_type!r}")
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(text, name)
        if value % world:
            raise ValueError(f"{name} ({value}) must be divisible by the world size ({world})")
    local = copy.deepcopy(config)
    lt = _text_config(local)
    lt.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    lt.num_attention_heads = text.num_attention_heads // world
    lt.num_key_value_heads = text.num_key_value_heads // world
    lt.intermediate_size = text.intermediate_size // world
    return local


def _rows(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


def _cols(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = t.shape[1] // world
    return t[:, rank * n : (rank + 1) * n]


def _slice(name: str, t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's part of one parameter of a Llama-layout model (by its name)."""
    leaf = name.rsplit(".", 2)[-2:]  # e.g. ["q_proj", "weight"]
    module, kind = leaf[0], leaf[1]
    if module in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        return _rows(t, rank, world)  # column-parallel: output features split (bias too)
    if module in ("o_proj", "down_proj"):
        if kind == "bias":  # a row-parallel bias is added once, after the all-reduce's sum
            return t if rank == 0 else torch.zeros_like(t)
        return _cols(t, rank, world)
    return t  # embeddings, norms (q_norm/k_norm act per head dim), lm_head: replicated


def shard_model(model: torch.nn.Module, rank: int, world: int) -> torch.nn.Module:
    """The rank-local copy of ``model`` for rank ``rank`` of ``world`` (weights copied, on ``model``'s device)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must lie in [0, {world}), got {rank!r}")
    config = local_config(model.config, world)
    with torch.device("meta"):
        local = type(model)._from_config(config, dtype=next(model.parameters()).dtype,
                                         attn_implementation=model.config._attn_implementation)
    state = {name: _slice(name, t, rank, world).clone() for name, t in model.state_dict().items()}
    local.load_state_dict(state, strict=True, assign=True)
    if getattr(_text_config(config), "tie_word_embeddings", False):
        local.tie_weights()
    for name, buf in model.named_buffers():  # non-persistent buffers (rotary inv_freq): replicated
        owner, _, leaf = name.rpartition(".")
        setattr(local.get_submodule(owner) if owner else local, leaf, buf.clone())
    for name, module in model.named_modules():  # plain tensor attributes (rotary original_inv_freq)
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not attr.startswith("_"):
                setattr(local.get_submodule(name) if name else local, attr, value.clone())
    local.eval()
    local.requires_grad_(False)
    return local


def random_local_model(
    config: Any,
    rank: int,
    world: int,
    *,
    device: str | torch.device,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> torch.nn.Module:
    """A rank-local model with random weights, built directly on ``device`` (shapes too big to hold whole)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must lie in [0, {world}), got {rank!r}")
    local = local_config(config, world)
    import transformers

    cls = getattr(transformers, type(config).__name__.replace("Config", "ForCausalLM"))
    torch.manual_seed(seed + rank)
    with torch.device(device):
        model = cls._from_config(local, dtype=dtype, attn_implementation=config._attn_implementation or "sdpa")
    model.eval()
    model.requires_grad_(False)
    return model


class TensorParallel:
    """All-reduce the partial outputs of a rank-local model's ``o_proj`` and ``down_proj`` while entered.

    Args:
        model: a rank-local model (:func:`shard_model`, :func:`random_local_model`).
        group: the process group (default: the world).

    The hooks are removed on exit: the model is a plain module again.
    """

    def __init__(self, model: torch.nn.Module, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TensorParallel needs torch.distributed initialized (init_process_group)")
        self.model, self.group = model, group
        self.world = dist.get_world_size(group)
        self._handles: list[Any] = []
        layers = model.model.layers
        self.modules = [m for layer in layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]

    def _reduce(self, module: torch.nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(out, group=self.group)
        return out

    def __enter__(self) -> TensorParallel:
        if self._handles:
            raise RuntimeError("TensorParallel is already entered")
        self._handles = [m.register_forward_hook(self._reduce) for m in self.modules]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
