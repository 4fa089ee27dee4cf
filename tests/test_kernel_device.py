"""Kernel launchers run on their tensors' device and refuse tensors spread over devices."""

from __future__ import annotations

import pytest
import torch

from snapkv.kernels.device import on_device, same_device


def test_same_device_names_the_stray_tensor():
    a = torch.zeros(2)
    assert same_device(a=a, b=None, c=torch.ones(1)) == torch.device("cpu")
    meta = torch.zeros(2, device="meta")
    with pytest.raises(ValueError, match="keys is on meta but q is on cpu"):
        same_device(q=a, keys=meta)
    with pytest.raises(ValueError, match="no tensor"):
        same_device(x=None)


def test_on_device_is_a_no_op_off_cuda():
    with on_device(torch.device("cpu")):
        assert torch.zeros(1).device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_votes_kernel_on_second_gpu_while_first_is_current():
    """The split-model crash: tensors on cuda:1, cuda:0 current. Kernel result equals the twin, many times."""
    from snapkv.kernels.ref import reduced_window_votes_ref
    from snapkv.kernels.score import reduced_window_votes_triton

    torch.cuda.set_device(0)
    gen = torch.Generator(device="cuda:1").manual_seed(0)
    for _ in range(5):
        q = torch.randn(1, 32, 32, 128, device="cuda:1", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, 8, 131072, 128, device="cuda:1", dtype=torch.bfloat16, generator=gen)
        got = reduced_window_votes_triton(q, k, scaling=128**-0.5)
        want = reduced_window_votes_ref(q, k, scaling=128**-0.5)
        assert got.device == torch.device("cuda:1")
        torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-3)
