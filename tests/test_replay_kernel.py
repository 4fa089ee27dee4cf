"""Triton replay-score kernel (KVzip) against the torch twin and the dense float64 reference.

CPU: the kernel runs through the Triton interpreter in one subprocess (``TRITON_INTERPRET=1``
must be set before Triton is imported); the subprocess runs this file as a script and prints
one JSON line per case. Shapes are tiny (the interpreter is slow and CI has 2 cores) but odd:
chunk and context lengths that are no multiple of the blocks, GQA groups 1/4/7, head dims
64/128, the causal tail, soft-cap, half inputs, a strided query, accumulation over chunks,
and the fused attention output. CUDA (``-m gpu``): the same cases plus a real-size slice.

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

from snapkv.core import replay
from snapkv.core.replay import (
    replay_chunk_attention_reference,
    replay_chunk_scores,
    replay_chunk_scores_reference,
    resolve_score_backend,
)

RTOL, ATOL = 2e-4, 1e-6


def _case(name: str, b: int, hkv: int, g: int, c: int, length: int, d: int, **kw: Any) -> dict[str, Any]:
    return dict(name=name, B=b, Hkv=hkv, G=g, C=c, L=length, D=d, dtype=kw.get("dtype", "float32"),
                softcap=kw.get("softcap"), values=kw.get("values", False), accumulate=kw.get("accumulate", False),
                qscale=kw.get("qscale", 1.0), strided=kw.get("strided", False), block_m=kw.get("block_m"),
                block_n=kw.get("block_n"), visible=kw.get("visible"))


CASES = [
    _case("C1_L1", 1, 1, 1, 1, 1, 64),
    _case("C1_L0_no_context", 1, 1, 2, 3, 0, 64),
    _case("g4_C5_L37", 1, 2, 4, 5, 37, 64),
    _case("g7_C9_L50_d128_cap", 1, 1, 7, 9, 50, 128, softcap=20.0, qscale=3.0),
    _case("g1_C17_L70_b2", 2, 1, 1, 17, 70, 64, qscale=3.0),
    _case("g4_C6_L45_bf16_strided", 1, 1, 4, 6, 45, 128, dtype="bfloat16", strided=True),
    _case("g7_C4_L33_accumulate", 1, 2, 7, 4, 33, 64, accumulate=True),
    _case("g4_C7_L40_attention", 1, 2, 4, 7, 40, 64, values=True, qscale=2.0),
    _case("g7_C5_L29_attention_cap_bf16", 1, 1, 7, 5, 29, 128, values=True, softcap=30.0, dtype="bfloat16"),
    _case("g1_C20_L3_tail_longer", 1, 1, 1, 20, 3, 64, values=True, block_m=16, block_n=16),
    _case("blocks16_g4_C9_L77", 1, 1, 4, 9, 77, 64, block_m=16, block_n=16, accumulate=True),
    # Span-limited replay: only the sink [0, s) and the window [lo, hi) of the context are seen.
    _case("span_g4_C7_L90_sink_window", 1, 2, 4, 7, 90, 64, visible=(3, 21, 58), values=True, block_n=16),
    _case("span_g7_C5_L83_accumulate", 1, 1, 7, 5, 83, 128, visible=(5, 40, 83), accumulate=True, softcap=20.0),
    _case("span_g1_C9_L70_no_sink_bf16", 2, 1, 1, 9, 70, 64, visible=(0, 17, 33), dtype="bfloat16", values=True),
    _case("span_g4_C6_L50_sink_touches", 1, 2, 4, 6, 50, 64, visible=(4, 4, 29), block_m=16, block_n=16),
    _case("span_whole_context", 1, 2, 4, 5, 37, 64, visible=(0, 0, 37), values=True, accumulate=True),
]


def _inputs(case: dict[str, Any], device: str | torch.device, gen: torch.Generator) -> dict[str, Any]:
    b, hkv, g, c, length, d = (case[k] for k in ("B", "Hkv", "G", "C", "L", "D"))
    dtype = getattr(torch, case["dtype"])
    q = torch.randn(b, hkv * g, c + 2, d, generator=gen) * case["qscale"]
    q = q[:, :, 1:-1] if case["strided"] else q[:, :, :c].contiguous()
    keys = torch.randn(b, hkv, length + c, d, generator=gen)
    values = torch.randn(b, hkv, length + c, d, generator=gen) if case["values"] else None
    prior = torch.rand(b, hkv, length, generator=gen) * 0.5 if case["accumulate"] else None
    cast = {"dtype": dtype, "device": device}
    return dict(query=q.to(**cast), keys=keys.to(**cast), values=None if values is None else values.to(**cast),
                prior=None if prior is None else prior.to(device), context_len=length, scaling=d**-0.5,
                softcap=case["softcap"])


def _compare(out: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL, atol: float = ATOL) -> dict[str, Any]:
    out, ref = out.double(), ref.double()
    diff = (out - ref).abs()
    return dict(finite=bool(torch.isfinite(out).all()), max_abs=diff.max().item() if diff.numel() else 0.0,
                allclose=bool(torch.allclose(out, ref, rtol=rtol, atol=atol)))


def run_case(case: dict[str, Any], device: str | torch.device, seed: int) -> dict[str, Any]:
    """Kernel (output poisoned with NaN or holding earlier scores) against both twins."""
    from snapkv.kernels.replay_score import replay_attention_scores_triton

    x = _inputs(case, device, torch.Generator().manual_seed(seed))
    q, k, v, length = x["query"], x["keys"], x["values"], x["context_len"]
    kw = dict(scaling=x["scaling"], softcap=x["softcap"])
    b, hkv = case["B"], case["Hkv"]
    vis = case["visible"]
    out = x["prior"].clone() if case["accumulate"] else torch.full((b, hkv, length), float("nan"), device=device)
    scores, attn = replay_attention_scores_triton(q, k, length, values=v, out=out, accumulate=case["accumulate"],
                                                  block_m=case["block_m"], block_n=case["block_n"], visible=vis,
                                                  **kw)
    twin = replay_chunk_scores(q, k, length, backend="torch", precision="fp32", key_block=16, max_logits=0,
                               visible=vis, **kw)
    dense = replay_chunk_scores_reference(q, k, length, visible=vis, **kw)
    if case["accumulate"]:
        twin, dense = torch.maximum(twin, x["prior"]), torch.maximum(dense, x["prior"].double())
    r = {"same_out": scores.data_ptr() == out.data_ptr(), "twin": _compare(scores, twin),
         "dense": _compare(scores, dense.float())}
    if v is not None:
        ref = replay_chunk_attention_reference(q, k, v, length, visible=vis, **kw)
        tol = 1e-2 if case["dtype"] != "float32" else 1e-4  # the output is rounded to the query's dtype
        r["attn"] = _compare(attn.float(), ref.float(), rtol=tol, atol=tol)
        r["attn_dtype"] = str(attn.dtype)
    return r


def _check_result(name: str, r: dict[str, Any], seed: int) -> None:
    where = f"{name} (seed {seed}): {r}"
    assert r["same_out"], where
    for key in ("twin", "dense", "attn"):
        if key in r:
            assert r[key]["finite"] and r[key]["allclose"], where


# ---------------------------------------------------------------------------------------------
# CPU: the interpreter, in a subprocess.


def _interpreter_main(seed: int) -> None:
    import time

    from triton_interp import patch_interpreter_for_numpy  # tests/ is sys.path[0] in the subprocess

    patch_interpreter_for_numpy()
    for i, case in enumerate(CASES):
        t0 = time.perf_counter()
        r = run_case(case, "cpu", seed + i)
        r["seconds"] = round(time.perf_counter() - t0, 2)
        print(json.dumps({"name": case["name"], **r}), flush=True)
    # An explicit backend goes through the kernel; the torch one does not.
    x = _inputs(CASES[3], "cpu", torch.Generator().manual_seed(seed))
    kw = dict(scaling=x["scaling"], softcap=x["softcap"])
    calls: list[int] = []
    mod = replay.kernel_module()
    kernel = mod.replay_attention_scores_triton

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return kernel(*args, **kwargs)

    mod.replay_attention_scores_triton = counting
    got = replay_chunk_scores(x["query"], x["keys"], x["context_len"], backend="triton", **kw)
    n_triton = len(calls)
    replay_chunk_scores(x["query"], x["keys"], x["context_len"], backend="torch", **kw)
    ref = replay_chunk_scores_reference(x["query"], x["keys"], x["context_len"], **kw)
    print(json.dumps({"name": "dispatch_explicit", "triton_calls": n_triton, "torch_calls": len(calls) - n_triton,
                      **_compare(got, ref.float())}), flush=True)
    mod.replay_attention_scores_triton = kernel
    for case in MODEL_CASES:
        print(json.dumps({"name": case["name"], **run_model_case(case, seed)}), flush=True)
    print(json.dumps({"name": "replay_largest_tensor", **largest_replay_tensors()}), flush=True)
    bench = _bench()  # the GPU benchmark's kernel check and timing, on tiny shapes
    check = bench.check_kernel(torch.device("cpu"), 40, shape=(4, 2, 16, 16))
    timing = bench.time_kernel(torch.device("cpu"), 40, repeats=1, shape=(4, 2, 16, 16))
    print(json.dumps({"name": "bench_kernel_functions", "check": check, "timing": timing}), flush=True)
    span_check = bench.check_kernel(torch.device("cpu"), 60, shape=(4, 2, 16, 16), visible=(3, 20, 45))
    span_small = bench.check_span_small(torch.device("cpu"))
    span_timing = bench.time_span_kernel(torch.device("cpu"), (40, 100), span=8, sink=2, repeats=1,
                                         shape=(4, 2, 16, 16))
    print(json.dumps({"name": "bench_span_functions", "check": span_check, "small": span_small,
                      "timing": span_timing}), flush=True)


#: Whole replays of tiny fp32 models through the kernel: ``kernel`` also computes the replay's
#: attention output (every later layer reads it), ``backend`` only the scores.
MODEL_CASES = [
    dict(name="model_llama_kernel_attention", family="llama", attention="kernel", length=29, chunk=10, overlap=3),
    dict(name="model_qwen3_kernel_attention", family="qwen3", attention="kernel", length=23, chunk=23, overlap=0),
    dict(name="model_llama_backend_attention", family="llama", attention="backend", length=21, chunk=8, overlap=2),
    # Span-limited replay: the kernel skips key blocks; the backend twin gets the visible keys sliced.
    dict(name="model_llama_kernel_attention_span", family="llama", attention="kernel", length=47, chunk=8,
         overlap=2, span=6, sink=3),
    dict(name="model_qwen3_backend_attention_span", family="qwen3", attention="backend", length=40, chunk=7,
         overlap=1, span=4, sink=0),
]


def run_model_case(case: dict[str, Any], seed: int) -> dict[str, Any]:
    """kvzip_scores through the kernel against the torch path and the dense float64 replay."""
    from snapkv.methods.kvzip import kvzip_scores, kvzip_scores_reference
    from tiny_models import tiny_model

    model = tiny_model(case["family"], "sdpa")
    ids = torch.randint(3, 256, (2, case["length"]), generator=torch.Generator().manual_seed(seed))
    kw = dict(chunk=case["chunk"], overlap=case["overlap"], span=case.get("span"), sink=case.get("sink", 0))
    got = kvzip_scores(model, ids, [5, 6, 7, 8], score_backend="triton", attention=case["attention"], **kw)
    twin = kvzip_scores(model, ids, [5, 6, 7, 8], score_backend="torch", attention="backend", **kw)
    dense = kvzip_scores_reference(tiny_model(case["family"], "eager").double(), ids, [5, 6, 7, 8], **kw)
    return {"twin": _compare(torch.stack(got), torch.stack(twin), rtol=1e-4, atol=1e-6),
            "dense": _compare(torch.stack(got), torch.stack(dense).float(), rtol=1e-3, atol=1e-4),
            "spread": float(torch.stack(got).std())}


def largest_replay_tensors() -> dict[str, Any]:
    """Elements of the largest tensor the replay allocates (context already prefilled), per path.

    Counted by a dispatch mode over every op output whose storage is new (views and in-place
    writes excluded); the kernel's own tiles live inside the kernel.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from snapkv.integration.hf import cache_argument
    from snapkv.methods.kvzip import ReplayCache, kvzip_scores, replay_inputs
    from tiny_models import tiny_model

    class Largest(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.largest, self.op = 0, ""

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            ins = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                   if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in ins:
                    n = t.untyped_storage().nbytes() // t.element_size()
                    if n > self.largest:
                        self.largest, self.op = n, f"{func} {tuple(t.shape)}"
            return out

    model = tiny_model("llama", "sdpa")
    length, chunk, prompt = 300, 64, [5, 6, 7, 8]
    ids = torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(0))
    longest = max(len(x) for x in replay_inputs(range(length), prompt, chunk, 4))
    cache = ReplayCache(model.config, length + longest)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_argument(model): cache})
    result: dict[str, Any] = {"chunk_x_context": longest * length}
    for name, sb, att, span in (("kernel", "triton", "kernel", None), ("torch", "torch", "backend", None),
                                ("torch_span", "torch", "backend", 8), ("kernel_span", "triton", "kernel", 8)):
        mode = Largest()
        with mode:
            kvzip_scores(model, ids, prompt, chunk=chunk, overlap=4, cache=cache, score_backend=sb, attention=att,
                         span=span, sink=0)
        result[name], result[f"{name}_op"] = mode.largest, mode.op
    return result


@pytest.fixture(scope="module")
def interpreter_results() -> tuple[int, dict[str, dict[str, Any]]]:
    pytest.importorskip("triton")
    seed = int(os.environ.get("SNAPKV_TEST_SEED", random.randrange(2**31)))
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
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
def test_kernel_matches_twins_interpreter(case: dict[str, Any], interpreter_results: Any) -> None:
    seed, results = interpreter_results
    assert case["name"] in results, f"no result for {case['name']} (seed {seed})"
    _check_result(case["name"], results[case["name"]], seed)
    if case["values"]:
        assert results[case["name"]]["attn_dtype"] == f"torch.{case['dtype']}"


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c["name"] for c in MODEL_CASES])
def test_model_replay_through_kernel_interpreter(case: dict[str, Any], interpreter_results: Any) -> None:
    seed, results = interpreter_results
    r = results[case["name"]]
    assert r["twin"]["allclose"] and r["dense"]["allclose"], f"seed {seed}: {r}"
    assert r["spread"] > 1e-3, r  # the scores separate positions


def test_kernel_replay_allocates_nothing_chunk_by_context(interpreter_results: Any) -> None:
    """With the kernel the replay's largest tensor is an activation, not ``chunk x L``; the torch path's is."""
    _, results = interpreter_results
    r = results["replay_largest_tensor"]
    assert r["kernel"] < r["chunk_x_context"] // 2, r
    assert r["torch"] >= r["chunk_x_context"], r  # the logits: the measure sees what it should
    # Span-limited (8 tokens either side of a 64-token chunk): the torch path's logits cover the
    # visible keys only; the kernel path stays below chunk x L as well.
    assert r["torch_span"] < r["torch"] // 2, r
    assert r["kernel_span"] < r["chunk_x_context"] // 2, r


def test_bench_kernel_check_and_timing_interpreter(interpreter_results: Any) -> None:
    _, results = interpreter_results
    r = results["bench_kernel_functions"]
    assert r["check"]["ok"], r["check"]
    for tag in ("default", "m64_n64", "m128_n128"):
        assert r["timing"][tag]["fused_ms"] > 0 and r["timing"][tag]["scores_ms"] > 0, r["timing"]


def test_bench_span_check_and_timing_interpreter(interpreter_results: Any) -> None:
    """The GPU benchmark's span-limited kernel check (against the torch twin and sdpa) and timing."""
    _, results = interpreter_results
    r = results["bench_span_functions"]
    assert r["check"]["ok"] and r["check"]["hidden_keys_zero"], r["check"]
    assert r["small"]["ok"], r["small"]
    for n in ("40", "100"):
        assert r["timing"][n]["exact_ms"] > 0 and r["timing"][n]["span_ms"] > 0, r["timing"]


def test_explicit_backend_dispatch_interpreter(interpreter_results: Any) -> None:
    seed, results = interpreter_results
    r = results["dispatch_explicit"]
    assert (r["triton_calls"], r["torch_calls"]) == (1, 0), r
    assert r["finite"] and r["allclose"], f"seed {seed}: {r}"


# ---------------------------------------------------------------------------------------------
# CPU, in process: dispatch and the launcher's checks (no kernel launch).


def test_auto_backend_is_torch_off_cuda() -> None:
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 12, 16)
    assert resolve_score_backend(q, 16, "auto") == "torch"
    assert resolve_score_backend(q, 16, "triton") == "triton"
    with pytest.raises(ValueError, match="score_backend must be one of"):
        resolve_score_backend(q, 16, "cuda")
    got = replay_chunk_scores(q, k, 9, scaling=0.25)
    torch.testing.assert_close(got, replay_chunk_scores_reference(q, k, 9, scaling=0.25).float(), rtol=1e-5,
                               atol=1e-7)


def test_torch_out_accumulates_running_max() -> None:
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 3, 16, generator=gen), torch.randn(1, 2, 12, 16, generator=gen)
    prior = torch.rand(1, 2, 9, generator=gen) * 0.3
    out = prior.clone()
    got = replay_chunk_scores(q, k, 9, scaling=0.25, backend="torch", out=out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, torch.maximum(prior, replay_chunk_scores(q, k, 9, scaling=0.25)))
    with pytest.raises(ValueError, match="out must be float32"):
        replay_chunk_scores(q, k, 9, scaling=0.25, backend="torch", out=torch.zeros(1, 2, 8))


def test_explicit_triton_on_cpu_raises_without_interpreter() -> None:
    pytest.importorskip("triton")
    code = (
        "import torch\n"
        "from snapkv.core.replay import replay_chunk_scores\n"
        "q = torch.randn(1, 4, 3, 16); k = torch.randn(1, 2, 12, 16)\n"
        "try:\n"
        "    replay_chunk_scores(q, k, 9, scaling=0.25, backend='triton')\n"
        "except ValueError as e:\n"
        "    assert 'needs CUDA' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_explicit_triton_without_triton_raises() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from snapkv.core.replay import replay_chunk_scores\n"
        "q = torch.randn(1, 4, 3, 16); k = torch.randn(1, 2, 12, 16)\n"
        "assert replay_chunk_scores(q, k, 9, scaling=0.25).shape == (1, 2, 9)\n"
        "try:\n"
        "    replay_chunk_scores(q, k, 9, scaling=0.25, backend='triton')\n"
        "except ImportError as e:\n"
        "    assert 'replay kernel cannot be imported' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_replay_backend_arguments_raise_before_model_work() -> None:
    from snapkv.methods.kvzip import KVzip, kvzip_scores
    from tiny_models import tiny_model

    model = tiny_model("llama", "sdpa")
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="score_backend must be one of"):
        kvzip_scores(model, ids, [5], chunk=4, score_backend="cuda")
    with pytest.raises(ValueError, match="attention must be one of"):
        kvzip_scores(model, ids, [5], chunk=4, attention="flash")
    with pytest.raises(ValueError, match="needs score_backend 'triton'"):  # CPU: auto scores resolve to torch
        kvzip_scores(model, ids, [5], chunk=4, attention="kernel")
    with pytest.raises(ValueError, match="needs an sdpa or flash backend"):
        kvzip_scores(tiny_model("llama", "eager"), ids, [5], chunk=4, score_backend="triton", attention="kernel")
    with pytest.raises(ValueError, match="attention must be one of"):
        KVzip(attention="none")
    with pytest.raises(ValueError, match="score_backend must be one of"):
        KVzip(score_backend="cuda")
    assert model.config._attn_implementation == "sdpa"  # the scope restored it


def _bad_inputs() -> list[tuple[str, dict[str, Any]]]:
    q, k = torch.randn(1, 4, 3, 64), torch.randn(1, 2, 12, 64)
    return [
        ("keys hold", dict(query=q, keys=k, context_len=8)),
        ("multiple of KV heads", dict(query=torch.randn(1, 3, 3, 64), keys=k, context_len=9)),
        ("head_dim must be in", dict(query=torch.randn(1, 4, 3, 512), keys=torch.randn(1, 2, 12, 512),
                                     context_len=9)),
        ("dtype must be one of", dict(query=q.double(), keys=k, context_len=9)),
        ("contiguous along head_dim", dict(query=q.transpose(-1, -2).contiguous().transpose(-1, -2), keys=k,
                                           context_len=9)),
        ("out must be float32", dict(query=q, keys=k, context_len=9, out=torch.zeros(1, 2, 9, dtype=torch.float64))),
        ("accumulate=True needs out", dict(query=q, keys=k, context_len=9, accumulate=True)),
        ("values must be", dict(query=q, keys=k, context_len=9, values=torch.randn(1, 2, 11, 64))),
        ("softcap must be > 0", dict(query=q, keys=k, context_len=9, softcap=0.0)),
        ("context_len must be an integer", dict(query=q, keys=torch.randn(1, 2, 3, 64), context_len=-0.0)),
        ("block_m must be a power of two", dict(query=q, keys=k, context_len=9, block_m=24)),
    ]


@pytest.mark.parametrize("match,kwargs", _bad_inputs(), ids=[m for m, _ in _bad_inputs()])
def test_launcher_rejects_bad_inputs(match: str, kwargs: dict[str, Any]) -> None:
    replay_score = pytest.importorskip("snapkv.kernels.replay_score")
    with pytest.raises(ValueError, match=match):
        replay_score.replay_attention_scores_triton(scaling=0.125, **kwargs)


# ---------------------------------------------------------------------------------------------
# The GPU benchmark's sizing (CPU): memory estimate, length fitting, a CPU run of the script.


def _bench() -> Any:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_kvzip.py"
    spec = importlib.util.spec_from_file_location("bench_kvzip", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_memory_estimate_and_fitting() -> None:
    import transformers

    from snapkv.bench.models import RANDOM_SHAPES

    bench = _bench()
    cfg_name, kwargs = RANDOM_SHAPES["llama3-8b"]
    config = getattr(transformers, cfg_name)(**kwargs)
    est = bench.estimate_peak_bytes(config, 131072, 2048, 9)
    assert abs(est["weights"] / 2 - 8.03e9) < 0.01e9  # Llama-3-8B: 8.03B parameters in bf16
    assert est["kv"] == 2 * 2 * 32 * 8 * 128 * (131072 + 2048 + 9 + 8)  # bf16 K and V, context + one replay
    assert est["replay_extra"] < 2**30 < est["prefill_work"]  # the replay holds no chunk x L tensor
    assert 40 * 2**30 < est["peak"] < 60 * 2**30
    free = est["peak"] - est["weights"]
    assert bench.fit_length(config, 131072, 2048, 9, int(free / 0.9) + 1, True) == 131072
    shrunk = bench.fit_length(config, 131072, 2048, 9, 20 * 2**30, True)
    assert shrunk % 8192 == 0 and 8192 <= shrunk < 131072
    need = bench.estimate_peak_bytes(config, shrunk, 2048, 9)
    assert need["peak"] - need["weights"] <= 0.9 * 20 * 2**30
    f = bench.flops_estimate(config, 131072, 2048, 9)
    assert 3 < f["ratio"] < 4 and bench.flops_estimate(config, 32768, 2048, 9)["ratio"] < f["ratio"]
    # Span-limited: the replay's attention is a band, not the square: under 2x the prefill at 128K.
    f = bench.flops_estimate(config, 131072, 2048, 9, span=2048)
    assert f["kvzip"] > f["kvzip_span"] and f["span_ratio"] < 2
    assert bench.flops_estimate(config, 4096, 2048, 9, span=1 << 20)["kvzip_span"] == \
        bench.flops_estimate(config, 4096, 2048, 9)["kvzip"]


def test_bench_runs_on_cpu(tmp_path: Any) -> None:
    out = tmp_path / "kvzip.json"
    script = __import__("pathlib").Path(__file__).resolve().parents[1] / "scripts" / "bench_kvzip.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), "--model", "tiny-llama", "--lengths", "128", "--chunk", "32",
                           "--budget", "32", "--window", "8", "--span", "16", "--sink", "4", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    point = json.loads(out.read_text())["points"][0]
    assert point["tokens"] == 128 and point["snapkv"]["seconds"] > 0
    for name in ("kvzip", "kvzip_backend_attention", "kvzip_torch_scores", "kvzip_span",
                 "kvzip_span_backend_attention"):
        assert point[name]["score_backend"] == "torch" and point[name]["seconds"] > 0, point[name]
    assert point["kvzip_span"]["span"] == 16 and point["kvzip"]["span"] is None
    assert point["flops_estimate"]["span_ratio"] < point["flops_estimate"]["ratio"]
    # --exact-max-tokens below the length: the exact replay is skipped (recorded), the span one runs.
    proc = subprocess.run([sys.executable, str(script), "--model", "tiny-llama", "--lengths", "128", "--chunk", "32",
                           "--budget", "32", "--window", "8", "--span", "16", "--exact-max-tokens", "64",
                           "--compare-max-tokens", "0", "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    point = json.loads(out.read_text())["points"][0]
    assert "skipped" in point["kvzip"] and point["kvzip_span"]["seconds"] > 0, point


# ---------------------------------------------------------------------------------------------
# CUDA.


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_kernel_matches_twins_cuda(case: dict[str, Any]) -> None:
    seed = random.randrange(2**31)
    _check_result(case["name"], run_case(case, "cuda", seed), seed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_real_size_bf16_cuda() -> None:
    """Llama-3-8B heads, a 2K chunk against 16K keys: native bf16 dots against the fp32 twin."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, 32, 2048, 128, generator=gen).to("cuda", torch.bfloat16)
    k = torch.randn(1, 8, 16384 + 2048, 128, generator=gen).to("cuda", torch.bfloat16)
    ref = replay_chunk_scores(q, k, 16384, scaling=128**-0.5, backend="torch", precision="fp32")
    got = replay_chunk_scores(q, k, 16384, scaling=128**-0.5, backend="triton")
    assert (got - ref).abs().max().item() < 2e-3 * ref.max().item()



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_replay_kernel_attention_cuda(dtype: torch.dtype) -> None:
    """The whole replay on CUDA: the kernel's attention output and scores against the backend + torch path."""
    from snapkv.methods.kvzip import kvzip_scores, resolve_replay_backends
    from tiny_models import tiny_model

    model = tiny_model("llama", "sdpa").to("cuda", dtype)
    assert resolve_replay_backends(model, None, "auto", "auto")[1:] == ("triton", True)  # the default on CUDA
    ids = torch.randint(3, 256, (2, 300), generator=torch.Generator().manual_seed(0)).cuda()
    got = torch.stack(kvzip_scores(model, ids, [5, 6, 7, 8], chunk=64))
    ref = torch.stack(kvzip_scores(model, ids, [5, 6, 7, 8], chunk=64, score_backend="torch", attention="backend",
                                   precision="fp32"))
    # Layer 0's queries do not depend on any attention output: same inputs, tight. Later layers
    # read the replay's attention output, which in bf16 rounds differently from sdpa's.
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-6)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * float(ref.max()))


if __name__ == "__main__":
    _interpreter_main(int(sys.argv[1]))
