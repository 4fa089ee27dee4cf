"""Triton window-votes kernel against its torch twin.

CPU: the kernel runs through the Triton interpreter in one subprocess (``TRITON_INTERPRET=1``
must be set before Triton is imported, which this pytest process may already have done);
the subprocess runs this file as a script and prints one JSON line per case. CUDA: the same
cases plus realistic long-prompt shapes, in process (``-m gpu``).

Inputs are fresh random tensors each run; the seed is printed on failure and can be pinned
with ``SNAPKV_TEST_SEED``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from typing import Any

import pytest
import torch

from snapkv.kernels import reduced_window_votes, reduced_window_votes_ref

RTOL, ATOL, REL_NORM = 1e-3, 1e-6, 1e-3


def _case(name: str, b: int, hkv: int, g: int, w: int, length: int, d: int, **kw: Any) -> dict[str, Any]:
    case = dict(name=name, B=b, Hkv=hkv, G=g, w=w, L=length, D=d)
    case.update(
        dtype=kw.get("dtype", "float32"),
        k_dtype=kw.get("k_dtype"),
        softcap=kw.get("softcap"),
        reduce=kw.get("reduce", "mean"),
        pad=kw.get("pad"),  # None | "left" | "random" | "empty_row"
        splits=kw.get("splits"),
        qscale=kw.get("qscale", 1.0),
        keys_layout=kw.get("keys_layout", "bhld"),  # or "blhd": a transposed view
    )
    return case


FIXED_CASES = [
    _case("L1_w1", 1, 1, 1, 1, 1, 64),
    _case("L7_w8_window_longer_than_keys", 1, 2, 2, 8, 7, 64, reduce="max"),
    _case("L63_w1_bf16_leftpad", 2, 1, 3, 1, 63, 64, dtype="bfloat16", pad="left"),
    _case("L64_softcap_max", 1, 1, 4, 8, 64, 128, reduce="max", softcap=50.0),
    _case("L65_g8_bf16_randpad", 1, 2, 8, 8, 65, 64, dtype="bfloat16", pad="random"),
    _case("L129_w32_splits3", 1, 1, 2, 32, 129, 128, splits=3),
    _case(
        "L333_bf16_cap_max_split2",
        2,
        1,
        4,
        8,
        333,
        128,
        dtype="bfloat16",
        softcap=30.0,
        reduce="max",
        pad="left",
        splits=2,
    ),
    _case("L511_d256_max", 1, 1, 1, 32, 511, 256, reduce="max"),
    _case("L777_g8_w32_bf16_peaky", 1, 1, 8, 32, 777, 64, dtype="bfloat16", splits=4, qscale=4.0),
    _case("L777_g3_max_cap_randpad", 2, 1, 3, 32, 777, 128, reduce="max", softcap=20.0, pad="random", qscale=4.0),
    _case("D80_fp16", 1, 2, 2, 8, 100, 80, dtype="float16"),
    _case("D32_w5_leftpad_max", 1, 1, 2, 5, 200, 32, reduce="max", pad="left"),
    _case("keys_transposed_view", 2, 2, 2, 8, 150, 64, dtype="bfloat16", keys_layout="blhd"),
    _case("empty_batch_row", 2, 1, 2, 8, 90, 64, reduce="max", pad="empty_row"),
    _case("q_fp32_keys_bf16", 1, 1, 4, 8, 120, 64, k_dtype="bfloat16"),
    _case("D16_g5", 1, 1, 5, 8, 70, 16, reduce="max"),
    _case("D512_bf16", 1, 1, 2, 8, 40, 512, dtype="bfloat16"),
]


def _random_cases(n: int, seed: int = 1234) -> list[dict[str, Any]]:
    """Shapes drawn once from a fixed seed, so test ids are stable; the tensors stay fresh."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        b, hkv = rng.choice([(1, 1), (1, 2), (2, 1)])
        cases.append(
            _case(
                f"rand{i}",
                b,
                hkv,
                rng.choice([1, 2, 3, 4, 8]),
                rng.choice([1, 8, 32]),
                rng.randint(1, 777),
                rng.choice([64, 128, 256]),
                dtype=rng.choice(["float32", "bfloat16"]),
                softcap=rng.choice([None, 30.0]),
                reduce=rng.choice(["mean", "max"]),
                pad=rng.choice([None, "left", "random"]),
                splits=rng.choice([None, 2, 5]),
                qscale=rng.choice([1.0, 3.0]),
            )
        )
    return cases


CASES = FIXED_CASES + _random_cases(16)


def _inputs(case: dict[str, Any], device: str | torch.device, gen: torch.Generator) -> dict[str, Any]:
    """Random window queries (a slice of longer queries), keys and padding mask for one case."""
    b, hkv, g, w, length, d = (case[k] for k in ("B", "Hkv", "G", "w", "L", "D"))
    q_dtype = getattr(torch, case["dtype"])
    k_dtype = getattr(torch, case["k_dtype"] or case["dtype"])
    q_full = torch.randn(b, hkv * g, w + 3, d, generator=gen) * case["qscale"]
    q_win = q_full.to(device=device, dtype=q_dtype)[:, :, -w:]  # non-contiguous, like queries[:, :, -w:]
    if case["keys_layout"] == "blhd":
        keys = torch.randn(b, length, hkv, d, generator=gen).to(device=device, dtype=k_dtype).transpose(1, 2)
    else:
        keys = torch.randn(b, hkv, length, d, generator=gen).to(device=device, dtype=k_dtype)
    valid = None
    if case["pad"] == "left":
        valid = torch.ones(b, length, dtype=torch.bool)
        for row in range(b):
            valid[row, : (row + 1) * length // (2 * b + 1)] = False
    elif case["pad"] == "random":
        valid = torch.rand(b, length, generator=gen) > 0.3
    elif case["pad"] == "empty_row":
        valid = torch.ones(b, length, dtype=torch.bool)
        valid[-1] = False
    if valid is not None:
        valid = valid.to(device)
    return dict(q_win=q_win, keys=keys, key_valid=valid, scaling=d**-0.5, softcap=case["softcap"])


def _compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    diff = (out - ref).abs()
    big = ref.abs() > ATOL
    norm = ref.norm().item()
    return dict(
        all_written=bool(torch.isfinite(out).all()),
        rel_norm=(diff.norm().item() / norm) if norm > 0 else diff.norm().item(),
        max_rel=(diff[big] / ref.abs()[big]).max().item() if big.any() else 0.0,
        max_abs=diff.max().item() if diff.numel() else 0.0,
        allclose=bool(torch.allclose(out, ref, rtol=RTOL, atol=ATOL)),
    )


def run_case(case: dict[str, Any], device: str | torch.device, seed: int) -> dict[str, Any]:
    """Kernel (output poisoned with NaN first) against the twin; returns error figures."""
    from snapkv.kernels.score import reduced_window_votes_triton

    gen = torch.Generator().manual_seed(seed)
    x = _inputs(case, device, gen)
    b, hkv, length = case["B"], case["Hkv"], case["L"]
    out = torch.full((b, hkv, length), float("nan"), device=device)
    reduced_window_votes_triton(**x, gqa_reduce=case["reduce"], out=out, num_splits=case["splits"])
    ref = reduced_window_votes_ref(**x, gqa_reduce=case["reduce"], chunk_size=97)
    return _compare(out, ref)


def _check_result(name: str, r: dict[str, Any], seed: int) -> None:
    where = f"{name} (seed {seed}): {r}"
    assert r["all_written"], f"NaN left in the poisoned output: {where}"
    assert r["rel_norm"] < REL_NORM, where
    assert r["allclose"], where


# ---------------------------------------------------------------------------------------------
# CPU: the interpreter, in a subprocess.


def _interpreter_main(seed: int) -> None:
    """Subprocess body: run every case through the interpreter, one JSON line each."""
    import time

    from triton_interp import patch_interpreter_for_numpy  # tests/ is sys.path[0] in the subprocess

    patch_interpreter_for_numpy()

    from snapkv.kernels import score

    for i, case in enumerate(CASES):
        t0 = time.perf_counter()
        r = run_case(case, "cpu", seed + i)
        r["seconds"] = time.perf_counter() - t0
        print(json.dumps({"name": case["name"], **r}), flush=True)

    # Dispatch with SNAPKV_FORCE_TRITON=1 goes through the kernel.
    calls = []
    kernel = score.reduced_window_votes_triton

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return kernel(*args, **kwargs)

    score.reduced_window_votes_triton = counting
    x = _inputs(CASES[6], "cpu", torch.Generator().manual_seed(seed))
    out = reduced_window_votes(**x, gqa_reduce="max")
    ref = reduced_window_votes_ref(**x, gqa_reduce="max")
    print(json.dumps({"name": "dispatch_forced", "kernel_calls": len(calls), **_compare(out, ref)}), flush=True)


@pytest.fixture(scope="module")
def interpreter_results() -> tuple[int, dict[str, dict[str, Any]]]:
    pytest.importorskip("triton")
    seed = int(os.environ.get("SNAPKV_TEST_SEED", random.randrange(2**31)))
    env = {**os.environ, "TRITON_INTERPRET": "1", "SNAPKV_FORCE_TRITON": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(seed)], env=env, capture_output=True, text=True, timeout=600)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r.pop("name")] = r
    if proc.returncode != 0:
        pytest.fail(f"interpreter subprocess failed (seed {seed}):\n{proc.stderr[-4000:]}")
    return seed, results


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_kernel_matches_twin_interpreter(case: dict[str, Any], interpreter_results: Any) -> None:
    seed, results = interpreter_results
    assert case["name"] in results, f"no result for {case['name']} (seed {seed})"
    _check_result(case["name"], results[case["name"]], seed)


def test_dispatch_forced_uses_kernel(interpreter_results: Any) -> None:
    seed, results = interpreter_results
    r = results["dispatch_forced"]
    assert r["kernel_calls"] == 1
    _check_result("dispatch_forced", r, seed)


# ---------------------------------------------------------------------------------------------
# CPU, in process: dispatch and the launcher's checks (no kernel launch).


def test_dispatch_cpu_uses_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SNAPKV_FORCE_TRITON", raising=False)
    x = _inputs(CASES[9], "cpu", torch.Generator().manual_seed(0))
    out = reduced_window_votes(**x, gqa_reduce="max", chunk_size=100)
    torch.testing.assert_close(out, reduced_window_votes_ref(**x, gqa_reduce="max"), rtol=1e-6, atol=1e-7)
    monkeypatch.setenv("SNAPKV_FORCE_TRITON", "0")
    assert torch.equal(reduced_window_votes(**x, gqa_reduce="mean"), reduced_window_votes_ref(**x))


def test_import_needs_no_triton() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, snapkv.kernels as k\n"
        "assert not k.triton_available()\n"
        "q = torch.randn(1, 4, 3, 16); keys = torch.randn(1, 2, 9, 16)\n"
        "out = k.reduced_window_votes(q, keys, None, scaling=0.25)\n"
        "assert out.shape == (1, 2, 9)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SNAPKV_FORCE_TRITON"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _bad_inputs() -> list[tuple[str, dict[str, Any]]]:
    q = torch.randn(2, 4, 8, 64)
    k = torch.randn(2, 2, 50, 64)
    base = dict(q_win=q, keys=k, key_valid=None, scaling=0.125)
    return [
        ("dtype", {**base, "keys": k.double()}),
        ("contiguous along head_dim", {**base, "q_win": torch.randn(2, 4, 64, 8).transpose(-1, -2)}),
        ("batch", {**base, "keys": torch.randn(3, 2, 50, 64)}),
        ("head_dim", {**base, "keys": torch.randn(2, 2, 50, 32)}),
        ("multiple of KV heads", {**base, "keys": torch.randn(2, 3, 50, 64)}),
        ("window", {**base, "q_win": torch.randn(2, 4, 0, 64)}),
        ("key_valid", {**base, "key_valid": torch.ones(2, 50, dtype=torch.int64)}),
        ("key_valid", {**base, "key_valid": torch.ones(2, 49, dtype=torch.bool)}),
        ("softcap", {**base, "softcap": 0.0}),
        ("gqa_reduce", {**base, "gqa_reduce": "sum"}),
        ("out", {**base, "out": torch.empty(2, 2, 50, dtype=torch.float16)}),
        ("out", {**base, "out": torch.empty(2, 4, 50)}),
        ("block_n", {**base, "block_n": 48}),
        ("num_splits", {**base, "num_splits": 0}),
    ]


@pytest.mark.parametrize("problem,kwargs", _bad_inputs(), ids=[p for p, _ in _bad_inputs()])
def test_launcher_rejects(problem: str, kwargs: dict[str, Any]) -> None:
    score = pytest.importorskip("snapkv.kernels.score")
    with pytest.raises(ValueError, match=problem):
        score.reduced_window_votes_triton(**kwargs)


def test_launcher_rejects_cpu_without_interpreter() -> None:
    score = pytest.importorskip("snapkv.kernels.score")
    if score._is_interpreted():
        pytest.skip("this process runs the interpreter")
    with pytest.raises(ValueError, match="CUDA"):
        score.reduced_window_votes_triton(torch.randn(1, 2, 4, 64), torch.randn(1, 1, 30, 64), scaling=0.125)


# ---------------------------------------------------------------------------------------------
# CUDA.

REALISTIC = [
    _case("llama3_128k_bf16_mean", 1, 8, 4, 32, 131072, 128, dtype="bfloat16"),
    _case("llama3_128k_bf16_max", 1, 8, 4, 32, 131072, 128, dtype="bfloat16", reduce="max"),
    _case("llama3_32k_b2_fp16_leftpad", 2, 8, 4, 32, 32771, 128, dtype="float16", pad="left"),
    _case("gemma_16k_d256_softcap", 1, 1, 4, 64, 16387, 256, dtype="bfloat16", softcap=50.0, reduce="max"),
    _case("smollm_8k_g3_d64_fp32", 2, 3, 3, 32, 8191, 64, pad="random", qscale=3.0),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestKernelCuda:
    @pytest.fixture(autouse=True)
    def _no_tf32(self) -> Any:
        pytest.importorskip("triton")
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # the twin's fp32 matmul must be exact fp32
        yield
        torch.backends.cuda.matmul.allow_tf32 = old

    @pytest.mark.parametrize("case", CASES + REALISTIC, ids=[c["name"] for c in CASES + REALISTIC])
    def test_kernel_matches_twin(self, case: dict[str, Any]) -> None:
        seed = int(os.environ.get("SNAPKV_TEST_SEED", random.randrange(2**31)))
        _check_result(case["name"], run_case(case, "cuda", seed), seed)

    def test_dispatch_uses_kernel_on_cuda(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from snapkv.kernels import score

        monkeypatch.delenv("SNAPKV_FORCE_TRITON", raising=False)
        calls = []
        kernel = score.reduced_window_votes_triton
        monkeypatch.setattr(score, "reduced_window_votes_triton", lambda *a, **k: calls.append(1) or kernel(*a, **k))
        x = _inputs(REALISTIC[2], "cuda", torch.Generator().manual_seed(0))
        out = reduced_window_votes(**x)
        assert calls == [1]
        _check_result("dispatch_cuda", _compare(out, reduced_window_votes_ref(**x)), 0)


if __name__ == "__main__":
    _interpreter_main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
