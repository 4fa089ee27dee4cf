"""Launch Triton kernels on the device that holds their tensors.

Triton launches on the *current* CUDA device and its current stream, not on the device of
the tensors it is given. With a model split over GPUs (``device_map``), layers on ``cuda:1``
run while ``cuda:0`` is current: a kernel launched there reads ``cuda:1`` memory from another
device's stream, racing the writes of ``cuda:1``'s own stream (the 128K split-model crash of
issue 14; ``CUDA_LAUNCH_BLOCKING=1`` hid it by serializing everything). Every launcher wraps
its launches in :func:`on_device` and checks that its tensors share one device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    """The one device of the given tensors (None entries skipped); ValueError naming a stray."""
    device = None
    first = ""
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}: a kernel's inputs share one device")
    if device is None:
        raise ValueError("no tensor given")
    return device


@contextlib.contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Make ``device`` current while kernels launch (a no-op off CUDA or when it already is)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        yield
        return
    with torch.cuda.device(device):
        yield
