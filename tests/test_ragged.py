"""Ragged KV cache and ragged decode attention.

CPU: the Triton kernel runs through the interpreter in one subprocess (``TRITON_INTERPRET=1``
must be set before Triton is imported); the subprocess runs this file as a script and prints
one JSON line per case. The torch twin is checked in process against a per-head loop, and the
whole decode path (adaptive selection -> ragged layer -> appends -> attention) against dense
masked attention over the full prompt. CUDA: realistic shapes, graph capture and measured
memory (``-m gpu``). Seeds are random per run, printed on failure, pinned with ``SNAPKV_TEST_SEED``.
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

from snapkv.cache.ragged import RaggedLayer, ragged_attention
from snapkv.core.adaptive import select_adaptive
from snapkv.kernels.ragged_ref import dense_masked_attention, ragged_decode_reference

TOL = {"float32": 1e-3, "float16": 1e-3, "bfloat16": 2e-2}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _case(name: str, b: int, hkv: int, g: int, d: int, max_len: int, **kw: Any) -> dict[str, Any]:
    return dict(name=name, B=b, Hkv=hkv, G=g, D=d, max_len=max_len, dtype=kw.get("dtype", "float32"),
                softcap=kw.get("softcap"), splits=kw.get("splits"), block_n=kw.get("block_n", 16),
                slack=kw.get("slack", 3), empty=kw.get("empty", False), long_head=kw.get("long_head", False),
                q_strided=kw.get("q_strided", False), qscale=kw.get("qscale", 1.0), work=kw.get("work"),
                sinks=kw.get("sinks", False))


CASES = [
    _case("gqa3_d40_fp32", 2, 3, 3, 40, 90, empty=True),
    _case("mha_d64_fp16_splits4", 3, 2, 1, 64, 200, dtype="float16", splits=4),
    _case("g8_d24_bf16", 1, 1, 8, 24, 77, dtype="bfloat16"),
    _case("softcap_fp32", 2, 2, 2, 32, 60, softcap=5.0, qscale=4.0),
    _case("long_head_split8", 2, 4, 2, 16, 400, long_head=True, splits=8),
    _case("combine_loop_40_splits", 1, 2, 2, 16, 700, splits=40),
    _case("strided_q_fp16_bn32", 2, 2, 4, 48, 130, dtype="float16", q_strided=True, block_n=32),
    # splits sized on a small work hint: many splits of the long head, most of the short ones empty
    _case("long_head_work_hint", 2, 4, 2, 16, 600, long_head=True, work=40),
    # gpt-oss attention sinks: one extra softmax logit per query head (an empty head outputs zeros)
    _case("sinks_fp32_splits3", 2, 2, 3, 32, 90, empty=True, splits=3, sinks=True),
    _case("sinks_bf16", 1, 2, 2, 16, 50, dtype="bfloat16", sinks=True),
]


def _inputs(case: dict[str, Any], device: str, gen: torch.Generator) -> dict[str, Any]:
    """Random ragged segments with slack between them, and one query token per row."""
    b, hkv, g, d = case["B"], case["Hkv"], case["G"], case["D"]
    dtype = DTYPES[case["dtype"]]
    lengths = torch.randint(1, case["max_len"] + 1, (b, hkv), generator=gen, dtype=torch.int32)
    if case["long_head"]:
        lengths.fill_(3)
        lengths[-1, 1] = case["max_len"]
    if case["empty"]:
        lengths[0, 0] = 0
    cap = (lengths + case["slack"]).view(-1).long()
    starts = (cap.cumsum(0) - cap).view(b, hkv).to(torch.int32)
    total = int(cap.sum())
    k = torch.randn(total, d, generator=gen).to(dtype)
    v = torch.randn(total, d, generator=gen).to(dtype)
    q = (torch.randn(b, hkv * g, 2 * d if case["q_strided"] else d, generator=gen) * case["qscale"]).to(dtype)
    q = q[..., :d]
    sinks = torch.randn(hkv * g, generator=gen) * 3 if case["sinks"] else None
    move = {"q": q, "k": k, "v": v, "starts": starts, "lengths": lengths}
    return {n: t.to(device) for n, t in move.items()} | dict(max_len=case["max_len"] + case["slack"],
                                                             sinks=None if sinks is None else sinks.to(device))


def _loop_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor,
                    lengths: torch.Tensor, scaling: float, softcap: float | None,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Per (row, query head) softmax attention over its KV head's segment (plus its sink), in float64."""
    b, hq, d = q.shape
    g = hq // starts.shape[1]
    out = torch.zeros(b, hq, d, dtype=torch.float64)
    for r in range(b):
        for head in range(hq):
            s, n = int(starts[r, head // g]), int(lengths[r, head // g])
            if n == 0:
                continue
            logits = k[s : s + n].double() @ q[r, head].double() * scaling
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            if sinks is not None:  # the sink's exp joins the denominator only
                z = torch.cat([logits, sinks[head : head + 1].double()])
                out[r, head] = torch.softmax(z, 0)[:-1] @ v[s : s + n].double()
            else:
                out[r, head] = torch.softmax(logits, 0) @ v[s : s + n].double()
    return out


def _compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    err = (out.double() - ref.double()).abs()
    scale = ref.double().abs().max().clamp_min(1e-12)
    finite = bool(torch.isfinite(out).all())
    return {"max_rel": float(err.max() / scale), "finite": finite}


def run_case(case: dict[str, Any], device: str, seed: int) -> dict[str, Any]:
    """Kernel against the torch twin on one case."""
    from snapkv.kernels.decode_ragged import ragged_decode_attention

    x = _inputs(case, device, torch.Generator().manual_seed(seed))
    scaling = case["D"] ** -0.5
    out = ragged_decode_attention(x["q"], x["k"], x["v"], x["starts"], x["lengths"], max_len=x["max_len"],
                                  sm_scale=scaling, softcap=case["softcap"], num_splits=case["splits"],
                                  block_n=case["block_n"], work_tokens=case.get("work"), sinks=x["sinks"])
    ref = ragged_decode_reference(x["q"], x["k"], x["v"], x["starts"], x["lengths"], scaling=scaling,
                                  softcap=case["softcap"], sinks=x["sinks"])
    r = _compare(out, ref)
    r["empty_is_zero"] = not case["empty"] or bool((out[0, : case["G"]] == 0).all())
    return r


def run_decode_path(device: str, seed: int, use_kernel: bool, dtype: torch.dtype = torch.float32,
                    b: int = 3, hkv: int = 2, g: int = 3, length: int = 57, d: int = 32) -> dict[str, Any]:
    """Adaptive selection -> ragged layer -> 4 decode steps (one of two tokens) vs dense masked attention."""
    gen = torch.Generator().manual_seed(seed)
    window, steps = 4, 5
    keys = torch.randn(b, hkv, length + steps, d, generator=gen).to(device, dtype)
    values = torch.randn(b, hkv, length + steps, d, generator=gen).to(device, dtype)
    queries = torch.randn(b, hkv * g, steps, d, generator=gen).to(device, dtype)
    real = torch.randint(window + 2, length + 1, (b,), generator=gen)
    real[0] = length
    key_valid = (torch.arange(length)[None, :] >= (length - real)[:, None]).to(device)
    n_keep = torch.minimum(real, torch.randint(window + 1, length, (b,), generator=gen)).to(device)
    scores = torch.rand(b, hkv, length, generator=gen).to(device)
    sel = select_adaptive(scores, n_keep, window, key_valid, alpha=0.2)
    layer = RaggedLayer.from_selection(keys[:, :, :length], values[:, :, :length], sel, slack=steps)
    allowed = torch.zeros(b * hkv, length + steps, dtype=torch.bool, device=device)
    allowed[sel.segment, sel.indices] = True
    allowed = allowed.view(b, hkv, length + steps)
    worst, scaling, t = 0.0, d**-0.5, 0
    for q_len in (1, 1, 2, 1):
        new = slice(length + t, length + t + q_len)
        out = ragged_attention(queries[:, :, t : t + q_len], layer, keys[:, :, new], values[:, :, new],
                               scaling=scaling, use_kernel=use_kernel)  # [B, q, Hq, D]
        for i in range(q_len):
            allowed[:, :, length + t + i] = True
            ref = dense_masked_attention(queries[:, :, t + i], keys, values, allowed, scaling=scaling)
            worst = max(worst, _compare(out[:, i], ref)["max_rel"])
        t += q_len
    return {"max_rel": worst, "finite": True, "lengths_ok": bool((layer.lengths == sel.lengths + steps).all())}


# ---------------------------------------------------------------------------------------------
# CPU: the interpreter, in a subprocess.


def _interpreter_main(seed: int) -> None:
    """Subprocess body: every case through the interpreter, one JSON line each."""
    from triton_interp import patch_interpreter_for_numpy  # tests/ is sys.path[0] in the subprocess

    patch_interpreter_for_numpy()

    for i, case in enumerate(CASES):
        print(json.dumps({"name": case["name"], **run_case(case, "cpu", seed + i)}), flush=True)
    print(json.dumps({"name": "decode_path", **run_decode_path("cpu", seed, use_kernel=True)}), flush=True)


@pytest.fixture(scope="module")
def interpreter_results() -> tuple[int, dict[str, dict[str, Any]]]:
    pytest.importorskip("triton")
    seed = int(os.environ.get("SNAPKV_TEST_SEED", random.randrange(2**31)))
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(seed)], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"interpreter subprocess failed (seed {seed}):\n{proc.stderr[-4000:]}")
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r.pop("name")] = r
    return seed, results


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_kernel_matches_twin_interpreter(case: dict[str, Any], interpreter_results: Any) -> None:
    seed, results = interpreter_results
    r = results[case["name"]]
    assert r["finite"] and r["empty_is_zero"], f"seed {seed}: {r}"
    assert r["max_rel"] <= TOL[case["dtype"]], f"seed {seed}: {r}"


def test_kernel_decode_path_interpreter(interpreter_results: Any) -> None:
    seed, results = interpreter_results
    r = results["decode_path"]
    assert r["lengths_ok"] and r["max_rel"] <= 1e-3, f"seed {seed}: {r}"


# ---------------------------------------------------------------------------------------------
# CPU, in process: the twin, the cache, the launcher's checks.


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_twin_matches_loop(case: dict[str, Any]) -> None:
    x = _inputs(case, "cpu", torch.Generator().manual_seed(1))
    scaling = case["D"] ** -0.5
    args = (x["q"], x["k"], x["v"], x["starts"], x["lengths"])
    out = ragged_decode_reference(*args, scaling=scaling, softcap=case["softcap"], sinks=x["sinks"])
    ref = _loop_reference(*args, scaling, case["softcap"], x["sinks"])
    assert _compare(out, ref)["max_rel"] <= TOL[case["dtype"]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_path_twin_matches_dense(seed: int) -> None:
    r = run_decode_path("cpu", seed, use_kernel=False)
    assert r["lengths_ok"] and r["max_rel"] <= 1e-5


def _layer(seed: int = 0, slack: int = 4) -> tuple[RaggedLayer, Any, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(2, 3, 20, 8, generator=gen), torch.randn(2, 3, 20, 8, generator=gen)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :6] = False  # row 1 is left-padded
    sel = select_adaptive(torch.rand(2, 3, 20, generator=gen), torch.tensor([9, 7]), 3, valid)
    return RaggedLayer.from_selection(keys, values, sel, slack), sel, keys, values


def test_bytes_are_kept_plus_slack_exactly() -> None:
    layer, sel, keys, _ = _layer(slack=4)
    assert sel.total == 3 * (9 + 7)
    expected_kv = 2 * (sel.total + 2 * 3 * 4) * 8 * keys.element_size()
    assert layer.kv_bytes() == expected_kv
    assert layer.bytes() == expected_kv + 3 * 2 * 3 * 4  # starts, lengths, capacity: [2, 3] int32
    assert layer.keys.shape == (sel.total + 24, 8)


def test_layer_holds_the_selection() -> None:
    layer, sel, keys, values = _layer()
    k_pad, v_pad, valid = layer.to_padded()
    idx, sel_valid = sel.to_padded()
    assert torch.equal(valid, sel_valid)
    dense_k = keys.gather(2, idx[..., None].expand(-1, -1, -1, 8))
    dense_v = values.gather(2, idx[..., None].expand(-1, -1, -1, 8))
    assert torch.equal(k_pad[valid], dense_k[valid]) and torch.equal(v_pad[valid], dense_v[valid])
    assert torch.equal(layer.capacity, sel.lengths + 4)
    assert torch.all(layer.starts[..., 1:] > layer.starts[..., :-1])


def test_append_in_place() -> None:
    layer, sel, _, _ = _layer(slack=2)
    ptrs = (layer.keys.data_ptr(), layer.values.data_ptr(), layer.lengths.data_ptr())
    before = layer.keys.clone()
    new_k, new_v = torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8)
    layer.append(new_k, new_v)
    assert (layer.keys.data_ptr(), layer.values.data_ptr(), layer.lengths.data_ptr()) == ptrs
    slot = (layer.starts + sel.lengths).view(-1).long()
    assert torch.equal(layer.keys[slot], new_k.view(6, 8)) and torch.equal(layer.values[slot], new_v.view(6, 8))
    untouched = torch.ones(layer.keys.shape[0], dtype=torch.bool)
    untouched[slot] = False
    assert torch.equal(layer.keys[untouched], before[untouched])
    assert torch.equal(layer.lengths, sel.lengths + 1)
    layer.append(new_k[:, :, 0], new_v[:, :, 0])
    with pytest.raises(RuntimeError, match="full"):
        layer.append(new_k, new_v)
    with pytest.raises(ValueError, match="one token"):
        layer.append(torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8))


def test_from_dense_is_uniform() -> None:
    keys, values = torch.randn(2, 2, 11, 4), torch.randn(2, 2, 11, 4)
    layer = RaggedLayer.from_dense(keys, values, slack=1)
    k_pad, v_pad, valid = layer.to_padded()
    assert valid.all() and torch.equal(k_pad, keys) and torch.equal(v_pad, values)
    assert layer.kv_bytes() == 2 * 2 * 2 * 12 * 4 * 4


def _trailing_reference(sel: Any) -> int:
    """Per head from the padded view: how many last entries are the prompt's last positions; the minimum."""
    idx, valid = sel.to_padded()
    runs = []
    for b in range(idx.shape[0]):
        for h in range(idx.shape[1]):
            kept = idx[b, h][valid[b, h]].tolist()
            n = 0
            while n < len(kept) and kept[-1 - n] == sel.prompt_length - 1 - n:
                n += 1
            runs.append(n)
    return min(runs)


@pytest.mark.parametrize("seed", range(6))
def test_trailing_run_matches_a_loop(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    b, h, length = 1 + seed % 2, 1 + seed % 3, 17 + seed
    scores = torch.rand(b, h, length, generator=gen)
    scores[..., -(seed + 1):] += 5 * (seed % 2)  # sometimes a longer run than the window
    valid = torch.ones(b, length, dtype=torch.bool)
    valid[-1, : seed % 4] = False
    window = seed % 3
    sel = select_adaptive(scores, torch.full((b,), 9), window, valid)
    assert sel.trailing_run() == _trailing_reference(sel) >= window


def test_without_tail_cuts_every_head_and_packs() -> None:
    layer, sel, keys, values = _layer(slack=2)
    k_pad, v_pad, valid = layer.to_padded()
    cut = layer.without_tail(2)
    assert torch.equal(cut.lengths, sel.lengths - 2) and cut.slack == 2 and cut.appended == 0
    assert cut.keys.shape[0] == sel.total - 2 * 6 + 6 * 2  # packed: kept minus the cut, plus slack
    k2, v2, valid2 = cut.to_padded()
    for b in range(2):
        for h in range(3):
            n = int(sel.lengths[b, h]) - 2
            assert torch.equal(k2[b, h][valid2[b, h]], k_pad[b, h][valid[b, h]][:n])
            assert torch.equal(v2[b, h][valid2[b, h]], v_pad[b, h][valid[b, h]][:n])
    assert torch.equal(layer.lengths, sel.lengths) and torch.equal(layer.to_padded()[0], k_pad)  # untouched
    cut.append(torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8))  # the slack is there
    with pytest.raises(RuntimeError, match="nothing appended"):
        cut.without_tail(1)
    with pytest.raises(ValueError, match=r"n must be an integer in \[1, 7\]"):
        layer.without_tail(8)
    with pytest.raises(ValueError, match="n must be"):
        layer.without_tail(0)


def _bad_launches() -> list[tuple[str, dict[str, Any]]]:
    q, k = torch.randn(2, 4, 16), torch.randn(50, 16)
    st, ln = torch.zeros(2, 2, dtype=torch.int32), torch.ones(2, 2, dtype=torch.int32)
    base = dict(q=q, k=k, v=k, starts=st, lengths=ln)
    return [
        ("dtype", {**base, "k": k.half(), "v": k.half()}),
        ("dtype", {**base, "q": q.double(), "k": k.double(), "v": k.double()}),
        ("stride 1", {**base, "k": torch.randn(16, 50).t()}),
        ("int32", {**base, "starts": st.long()}),
        ("multiple of KV heads", {**base, "starts": torch.zeros(2, 3, dtype=torch.int32),
                                  "lengths": torch.ones(2, 3, dtype=torch.int32)}),
        ("head dims", {**base, "k": torch.randn(50, 8), "v": torch.randn(50, 8)}),
        ("expected q", {**base, "q": q[None]}),
    ]


@pytest.mark.parametrize("problem,kwargs", _bad_launches(), ids=[p for p, _ in _bad_launches()])
def test_launcher_rejects(problem: str, kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    mod = pytest.importorskip("snapkv.kernels.decode_ragged")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # checks only: every case fails before launch
    with pytest.raises(ValueError, match=problem):
        mod.ragged_decode_attention(**kwargs, max_len=4, sm_scale=0.25)


def test_launcher_rejects_cpu_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    mod = pytest.importorskip("snapkv.kernels.decode_ragged")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    st = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="CUDA"):
        mod.ragged_decode_attention(torch.randn(1, 2, 16), torch.randn(5, 16), torch.randn(5, 16), st, st + 1,
                                    max_len=4, sm_scale=0.25)


# ---------------------------------------------------------------------------------------------
# CUDA: realistic shapes, graph capture, measured memory.

GPU_CASES = [
    _case("llama3_b4_bf16", 4, 8, 4, 128, 4096, dtype="bfloat16", block_n=None, slack=256),
    _case("llama3_b1_fp16_long_head", 1, 8, 4, 128, 16384, dtype="float16", block_n=None, long_head=True),
    _case("gemma_d256_bf16", 8, 1, 4, 256, 2048, dtype="bfloat16", block_n=None),
    _case("smollm_d64_fp32", 3, 3, 3, 64, 1500, block_n=None, empty=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=[c["name"] for c in GPU_CASES])
def test_kernel_matches_twin_gpu(case: dict[str, Any]) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    r = run_case(case, "cuda", 0)
    assert r["finite"] and r["empty_is_zero"] and r["max_rel"] <= 2 * TOL[case["dtype"]], r


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_path_kernel_gpu(dtype: torch.dtype) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    r = run_decode_path("cuda", 0, use_kernel=True, dtype=dtype, b=4, hkv=8, g=4, length=700, d=128)
    assert r["lengths_ok"] and r["max_rel"] <= (2e-2 if dtype == torch.bfloat16 else 2e-3), r


@pytest.mark.gpu
def test_graph_capture_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from snapkv.kernels.decode_ragged import ragged_decode_attention

    gen = torch.Generator().manual_seed(0)
    b, hkv, g, d, length, steps = 2, 8, 4, 128, 1024, 6
    keys = torch.randn(b, hkv, length, d, generator=gen).cuda().bfloat16()
    values = torch.randn(b, hkv, length, d, generator=gen).cuda().bfloat16()
    sel = select_adaptive(torch.rand(b, hkv, length, generator=gen).cuda(), torch.tensor([300, 200]).cuda(), 32)
    layer = RaggedLayer.from_selection(keys, values, sel, slack=steps + 1)
    q_in = torch.zeros(b, hkv * g, d, device="cuda", dtype=torch.bfloat16)
    k_in, v_in = torch.zeros_like(keys[:, :, 0]), torch.zeros_like(values[:, :, 0])

    def step() -> torch.Tensor:
        layer.append(k_in, v_in)
        return ragged_decode_attention(q_in, layer.keys, layer.values, layer.starts, layer.lengths,
                                       max_len=layer.max_capacity, sm_scale=d**-0.5)

    step()  # warm-up (compiles), then roll the append back
    layer.lengths.sub_(1)
    layer.appended = 0
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records the append and the kernel, runs neither
        out = step()
    for _ in range(steps):
        q_in.copy_(torch.randn_like(q_in, dtype=torch.float32))
        k_in.copy_(torch.randn_like(k_in, dtype=torch.float32))
        v_in.copy_(torch.randn_like(v_in, dtype=torch.float32))
        graph.replay()
        ref = ragged_decode_reference(q_in, layer.keys, layer.values, layer.starts, layer.lengths, scaling=d**-0.5)
        assert _compare(out, ref)["max_rel"] <= 2e-2
    assert torch.equal(layer.lengths, sel.lengths + steps)


@pytest.mark.gpu
def test_memory_measured_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gen = torch.Generator().manual_seed(0)
    b, hkv, length, d = 4, 8, 8192, 128
    keys = torch.randn(b, hkv, length, d, generator=gen).cuda().bfloat16()
    values = torch.randn(b, hkv, length, d, generator=gen).cuda().bfloat16()
    sel = select_adaptive(torch.rand(b, hkv, length, generator=gen).cuda(), torch.full((b,), 1024).cuda(), 32)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    layer = RaggedLayer.from_selection(keys, values, sel, slack=256)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before
    kept_plus_slack = 2 * (b * hkv * (1024 + 256)) * d * 2
    assert layer.kv_bytes() == kept_plus_slack
    assert kept_plus_slack <= held <= 1.05 * kept_plus_slack, (held, kept_plus_slack)


if __name__ == "__main__":
    _interpreter_main(int(sys.argv[1]))
