"""Fused decode kernels (:mod:`snapkv.kernels.decode_ops`) against their torch twins.

CPU: the kernels run through the Triton interpreter in one subprocess (``TRITON_INTERPRET=1`` must
be set before Triton is imported); the subprocess runs this file as a script and prints one JSON
line per case, including a whole fused decode step of a tiny model against the eager step.
CUDA: the same cases in process, in bf16 too (``-m gpu``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

# (rows, hidden) for add_rmsnorm; (B, Hq, Hkv, D, cap) for rope_append; (rows, N) for silu_mul
NORM_CASES = [(1, 64), (3, 100), (2, 4096)]
ROPE_CASES = [(1, 4, 2, 16, 9), (3, 6, 3, 8, 5), (2, 32, 8, 128, 33)]
SILU_CASES = [(1, 128), (4, 1000), (2, 3000)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_cases(device: str, dtype: torch.dtype) -> list[dict]:
    """Every kernel case on ``device``: relative error against the twin, and written-in-place checks."""
    from snapkv.kernels import decode_ops as k
    from snapkv.kernels import decode_ops_ref as r

    g = torch.Generator(device="cpu").manual_seed(int(os.environ.get("SNAPKV_TEST_SEED", "0")))

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    out = []
    for rows, h in NORM_CASES:
        for with_delta in (False, True):
            x, d, w = rnd(rows, h), rnd(rows, h), rnd(h)
            x2 = x.clone()
            got = k.add_rmsnorm(x, d if with_delta else None, w, 1e-5)
            ref = r.add_rmsnorm_ref(x2, d if with_delta else None, w, 1e-5)
            out.append(dict(case=f"add_rmsnorm {rows}x{h} delta={with_delta}", err=_rel(got, ref),
                            residual_err=_rel(x, x2)))
    for b, hq, hkv, d, cap in ROPE_CASES:
        q, kk, v = rnd(b, hq * d), rnd(b, hkv * d), rnd(b, hkv * d)
        cos, sin = rnd(b, 1, d)[:, 0], rnd(b, 1, d)[:, 0]
        caches = [torch.full((b, hkv, cap, d), 7.0, device=device, dtype=dtype) for _ in range(4)]
        pos = torch.tensor([cap // 2], device=device)
        got = k.rope_append(q, kk, v, cos, sin, caches[0], caches[1], pos)
        ref = r.rope_append_ref(q, kk, v, cos, sin, caches[2], caches[3], pos)
        untouched = bool((caches[0][:, :, : cap // 2] == 7).all() and (caches[1][:, :, cap // 2 + 1 :] == 7).all())
        out.append(dict(case=f"rope_append B{b} Hq{hq} Hkv{hkv} D{d}", err=_rel(got, ref),
                        k_err=_rel(caches[0], caches[2]), v_err=_rel(caches[1], caches[3]), untouched=untouched))
    for rows, n in SILU_CASES:
        gate, up = rnd(rows, n), rnd(rows, n)
        out.append(dict(case=f"silu_mul {rows}x{n}", err=_rel(k.silu_mul(gate, up), r.silu_mul_ref(gate, up))))
    out.append(_fused_step_case(device))
    return out


def _fused_step_case(device: str) -> dict:
    """A whole fused decode step (kernels) against the eager step, on a tiny Llama."""
    sys.path.insert(0, os.path.dirname(__file__))
    from snapkv import SnapKVConfig
    from snapkv.generation import DecodeRunner, Engine
    from snapkv.generation.fused import kernel_ops
    from tiny_models import tiny_model

    model = tiny_model("llama").to(device)
    ids = torch.randint(3, 256, (2, 90), generator=torch.Generator().manual_seed(3)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    engine = Engine(model, SnapKVConfig(budget=40, window=8, pooling="avg"), use_graph=False)
    logits = []
    for fused in (False, True):
        cache, first, _ = engine.prefill(ids, mask, max_new_tokens=5)
        runner = DecodeRunner(engine.parts, cache, use_graph=False, fused=False)
        if fused:
            runner.ops = kernel_ops()  # the Triton kernels, even on CPU (interpreter)
        runner.feed(first.argmax(-1))
        logits.append(torch.stack([runner.step() is not None and runner.logits.clone() for _ in range(4)]))
    return dict(case="fused decode step (kernels) vs eager step, tiny llama", err=_rel(logits[1], logits[0]))


def _assert_ok(results: list[dict], tol: float) -> None:
    for res in results:
        errs = {k: v for k, v in res.items() if k.endswith("err")}
        assert all(v < tol for v in errs.values()), res
        assert res.get("untouched", True), res


def test_kernels_match_twins_in_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 2 * len(NORM_CASES) + len(ROPE_CASES) + len(SILU_CASES) + 1
    _assert_ok(results, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_twins_on_gpu(dtype):
    # bf16: the kernels round as torch rounds, so errors stay at a few bf16 ulps at most.
    _assert_ok(run_cases("cuda", dtype), 1e-5 if dtype == torch.float32 else 1e-2)


def _patch_interpreter() -> None:
    """triton-lang/triton#9171: numpy >= 2.4 refuses ``int()`` of the interpreter's 1-element
    scalars, which breaks the attention kernel's loops with runtime bounds (upstream fix)."""
    import numpy as np
    from triton.runtime import interpreter

    if tuple(int(p) for p in np.__version__.split(".")[:2]) >= (2, 4):
        original = interpreter._patch_lang_tensor

        def patched(tensor, scope) -> None:
            original(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        interpreter._patch_lang_tensor = patched


if __name__ == "__main__":
    _patch_interpreter()
    for res in run_cases("cpu", torch.float32):
        print(json.dumps(res), flush=True)
