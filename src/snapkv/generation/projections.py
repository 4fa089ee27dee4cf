"""One GEMM for q/k/v and one for gate/up in the fused decode step, without a second copy of the weights.

A decode step reads every weight once, so its speed is the weights' bandwidth; three small GEMMs
(q, k, v) and two large ones (gate, up) per layer read the same bytes as one of each, but
launch more kernels, and cuBLAS runs the small ones (k, v: ``Hkv * D`` rows) far below the
bandwidth (on the H200, Llama-3-8B shape: k/v at 1.6 TB/s, q/o at 3.1, gate/up at 3.8, and five
split-K reductions per layer).

:func:`fuse_projections` concatenates each layer's q/k/v weights (and biases) into one buffer
and gate/up into another, and points the modules' own ``weight``/``bias`` at slices of them:
the model keeps exactly its values and its memory (the old storages are freed), its own forward
is unchanged, and the fused step multiplies by the whole buffer once. The modules' parameters
become views of a shared buffer: ``torch.save`` and transformers' ``save_pretrained`` handle
such disjoint views; ``safetensors.torch.save_file(model.state_dict())`` refuses shared storage
(use ``save_model``). In-place updates (``load_state_dict``, optimiser steps) write through the
views; a parameter *replaced* afterwards (``param.data = ...``, ``load_state_dict(assign=True)``,
``model.to(...)``) is noticed by :meth:`FusedProjections.valid` and the layer is fused again.

Modules that are not plain ``nn.Linear`` (quantised, LoRA-wrapped), have hooks (accelerate
offload, tensor-parallel all-reduce) or differ in dtype/device are left alone:
that layer runs its separate projections (same result, the old speed).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FusedLinear:
    """One buffer behind several ``nn.Linear`` modules of the same input.

    Attributes:
        weight: ``[sum(out), in]`` the concatenated weights (the modules' weights are row slices).
        bias: ``[sum(out)]`` or None (every module has a bias, or none has).
        sizes: output width of each module, in order.
        modules: weak references to the modules, for :meth:`valid`.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    sizes: tuple[int, ...]
    modules: tuple[weakref.ref, ...]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every module's output of ``x``, as column slices of one GEMM's output."""
        return torch.nn.functional.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)

    def valid(self) -> bool:
        """Whether each module's weight (and bias) is still its slice of this buffer."""
        off = 0
        for ref, n in zip(self.modules, self.sizes, strict=True):
            m = ref()
            if m is None or not _is_slice(m.weight, self.weight, off, n):
                return False
            if (self.bias is None) != (m.bias is None) or (
                    self.bias is not None and not _is_slice(m.bias, self.bias, off, n)):
                return False
            off += n
        return True


def _is_slice(t: torch.Tensor, base: torch.Tensor, off: int, n: int) -> bool:
    return (t.device == base.device and t.dtype == base.dtype and t.shape[0] == n
            and t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
            and t.data_ptr() == base[off:off + n].data_ptr() and t.stride() == base.stride())


def fusable(modules: list[nn.Module]) -> bool:
    """Whether these modules can share one buffer (plain ``nn.Linear``, hook-free, same dtype/device)."""
    if not modules or any(type(m) is not nn.Linear for m in modules):
        return False
    w0 = modules[0].weight
    for m in modules:
        if (m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook")
                or m.weight.dtype != w0.dtype or m.weight.device != w0.device or m.weight.dim() != 2
                or m.in_features != modules[0].in_features or (m.bias is None) != (modules[0].bias is None)
                or m.weight.is_meta):
            return False
    return True


@torch.no_grad()
def fuse_linears(modules: list[nn.Linear]) -> FusedLinear:
    """Concatenate ``modules``' weights into one buffer and make theirs slices of it (see the module doc)."""
    sizes = tuple(m.out_features for m in modules)
    with torch.inference_mode(False):
        weight = torch.cat([m.weight.detach() for m in modules])
        bias = torch.cat([m.bias.detach() for m in modules]) if modules[0].bias is not None else None
        off = 0
        for m, n in zip(modules, sizes, strict=True):
            m.weight.data = weight[off:off + n]
            if bias is not None:
                m.bias.data = bias[off:off + n]
            off += n
    return FusedLinear(weight, bias, sizes, tuple(weakref.ref(m) for m in modules))


#: The buffer fused for a group of modules, keyed by its first module (reused while still valid).
_FUSED: weakref.WeakKeyDictionary[nn.Module, FusedLinear] = weakref.WeakKeyDictionary()


def fused_linear(modules: list[nn.Linear]) -> FusedLinear | None:
    """The shared buffer of ``modules``: reused when they already share one, made when they can, else None."""
    if not fusable(modules):
        return None
    done = _FUSED.get(modules[0])
    if done is not None and len(done.modules) == len(modules) and all(
            r() is m for r, m in zip(done.modules, modules, strict=True)) and done.valid():
        return done
    _FUSED[modules[0]] = done = fuse_linears(modules)
    return done


@dataclass
class FusedProjections:
    """Per layer, the q/k/v and gate/up buffers (None where a layer cannot be fused)."""

    qkv: list[FusedLinear | None]
    gate_up: list[FusedLinear | None]

    @property
    def fused_layers(self) -> int:
        """Layers whose q/k/v run as one GEMM."""
        return sum(f is not None for f in self.qkv)

    def valid(self) -> bool:
        """Whether every buffer still backs its modules (no parameter was replaced since)."""
        return all(f is None or f.valid() for f in (*self.qkv, *self.gate_up))


def fuse_projections(layers: list[nn.Module]) -> FusedProjections:
    """Fuse q/k/v and gate/up of each Llama-layout decoder layer (see the module doc)."""
    qkv, gate_up = [], []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv.append(fused_linear([attn.q_proj, attn.k_proj, attn.v_proj]))
        gate_up.append(fused_linear([mlp.gate_proj, mlp.up_proj]))
    return FusedProjections(qkv, gate_up)
