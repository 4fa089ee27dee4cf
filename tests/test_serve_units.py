"""The server's parts without HTTP: slot cache, scheduler, document-cache prefill, LRU, text stream."""

from __future__ import annotations

import threading

import pytest
import torch

from snapkv.config import SnapKVConfig
from snapkv.generation import Engine
from snapkv.generation.adapter import DecoderParts
from snapkv.generation.prefill import prefill
from snapkv.generation.static_cache import StaticKVCache
from snapkv.serve.backend import PrefillJob
from snapkv.serve.batcher import EngineBackend
from snapkv.serve.doc_cache import DocCache, DocEntry
from snapkv.serve.extend import compress_context, extend, method_for
from snapkv.serve.sampling import SamplingParams, make_generator, sample_token
from snapkv.serve.scheduler import Request, Scheduler
from snapkv.serve.textstream import TextStream
from tiny_models import tiny_model

CFG = SnapKVConfig(budget=40, window=8, kernel=5, pooling="avg")
pytestmark = pytest.mark.usefixtures("one_thread")


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (n,), generator=g).tolist()


def _alone(model, ids: list[int], steps: int, config=CFG) -> list[int]:
    out = Engine(model, config, prefill_chunk=32).generate(torch.tensor([ids]), max_new_tokens=steps)
    return out.tokens[0].tolist()


class _Collector:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.done = threading.Event()
        self.result = None

    def __call__(self, kind, payload) -> None:
        if kind == "token":
            self.tokens.append(payload)
        elif kind in ("done", "error"):
            self.result = (kind, payload)
            self.done.set()


def _backend(model, rows=2, slot_tokens=64, doc_bytes=0, fused=None):
    return EngineBackend(model, rows=rows, slot_tokens=slot_tokens, doc_cache=DocCache(doc_bytes),
                         probe=[5, 6, 7, 8, 9, 10, 11, 12, 13], prefill_chunk=32, fused=fused)


@pytest.mark.parametrize("fused", [False, True], ids=["plain-step", "fused-twins"])
def test_rows_join_and_leave_and_match_engine_alone(fused):
    """Five requests through two rows: each joins when a row frees, and decodes as it would alone."""
    model = tiny_model("llama")
    backend = _backend(model, fused=fused)
    assert (backend.runner.ops is not None) == fused
    sched = Scheduler(backend, max_queue=8)
    sched.start()
    try:
        jobs = [(_prompt(n, s), steps) for s, (n, steps) in enumerate([(100, 6), (30, 3), (70, 9), (12, 4), (55, 5)])]
        sinks = []
        for ids, steps in jobs:
            sink = _Collector()
            sched.submit(Request(PrefillJob(ids, CFG), SamplingParams(max_tokens=steps, temperature=0.0), sink))
            sinks.append(sink)
        for sink in sinks:
            assert sink.done.wait(60)
        for (ids, steps), sink in zip(jobs, sinks, strict=True):
            assert sink.result[0] == "done" and sink.result[1].finish_reason == "length"
            assert sink.tokens == _alone(model, ids, steps)
        stats = sched.stats()
        assert stats["busy_rows"] == 0 and stats["kv_bytes_held"] == 0 and stats["queued"] == 0
        assert not any(backend.slots.busy) and int(backend.slots.active.sum()) == 0
    finally:
        sched.stop()


def test_cancel_frees_the_row():
    model = tiny_model("llama")
    backend = _backend(model, rows=1, slot_tokens=200)
    sched = Scheduler(backend, max_queue=4)
    sched.start()
    try:
        sink = _Collector()
        req = Request(PrefillJob(_prompt(20, 1), CFG), SamplingParams(max_tokens=150, temperature=0.0), sink)
        sched.submit(req)
        while len(sink.tokens) < 3:
            threading.Event().wait(0.01)
        sched.cancel(req)
        assert sink.done.wait(10) and sink.result[1].finish_reason == "cancelled"
        assert sched.stats()["busy_rows"] == 0 and not any(backend.slots.busy)
    finally:
        sched.stop()


def test_extend_after_whole_context_equals_plain_prefill():
    """Context kept whole + question fed after it == one prefill of the whole prompt (no compression)."""
    model = tiny_model("llama")
    parts = DecoderParts.from_model(model)
    ids = _prompt(60, 3)
    big = SnapKVConfig(budget=500, window=8)
    entry = compress_context(parts, ids[:45], [5, 6, 7], big, chunk=16)
    assert entry.context_tokens == 45 and entry.kept_tokens == 45
    cache, logits = extend(parts, entry, ids[45:])
    ref = StaticKVCache(parts.num_layers, 1, parts.num_kv_heads, parts.head_dim, 60, 1, dtype=parts.dtype,
                        device=parts.device)
    ref_logits, _ = prefill(parts, [torch.tensor(ids)], ref, config=None, method=method_for(big))
    torch.testing.assert_close(logits, ref_logits[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache.keys, ref.keys, atol=1e-5, rtol=1e-5)
    assert cache.prompt_lengths == [60]


def test_compressed_context_keeps_budget_without_probe():
    model = tiny_model("llama")
    parts = DecoderParts.from_model(model)
    probe = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    entry = compress_context(parts, _prompt(120, 4), probe, SnapKVConfig(budget=40, window=8), chunk=32)
    assert all(k.shape[-2] == 40 for k in entry.keys)  # the budget of context tokens, the probe cut
    cache, logits = extend(parts, entry, _prompt(5, 5))
    assert cache.prompt_slots == 45 and cache.prompt_lengths == [125] and torch.isfinite(logits).all()


def test_doc_cache_lru_by_bytes():
    def entry(n: int) -> DocEntry:
        return DocEntry((torch.zeros(1, n, 4),), (torch.zeros(1, n, 4),), n)

    cache = DocCache(max_bytes=3 * entry(10).nbytes)
    for key in "abc":
        assert cache.put(key, entry(10))
    assert cache.get("a") is not None  # a is now the most recent
    assert cache.put("d", entry(10))  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("c") is not None and len(cache) == 3
    assert cache.bytes == 3 * entry(10).nbytes and cache.evictions == 1
    assert not cache.put("huge", entry(40))
    assert (cache.hits, cache.misses) == (2, 1)


class _CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("stop", [[], ["END"], ["xy", "ND"]])
def test_text_stream_pieces_join_to_the_text(stop):
    stream = TextStream(_CharTokenizer(), stop)
    pieces = [stream.push(ord(c)) for c in "abcENxyzEND tail"]
    pieces.append(stream.finish())
    full = "abcENxyzEND tail"
    cuts = [full.find(s) for s in stop if full.find(s) >= 0]
    expected = full[: min(cuts)] if cuts else full
    assert "".join(pieces) == stream.text == expected


def test_server_sampling_is_the_engines():
    """The server draws through the engine's sampler: greedy is the argmax, a seed fixes the draw, and
    top-p keeps the draw inside the nucleus (0.5 + 0.3 reach 0.75: tokens 0 and 1 only)."""
    from snapkv.generation.sampling import SamplingParams as EngineSampling
    from snapkv.generation.sampling import sample_with

    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert int(sample_token(logits, SamplingParams(temperature=0.0), None)) == 0
    params = SamplingParams(temperature=1.0, top_p=0.75, seed=7)
    draws = [int(sample_token(logits, params, make_generator(params, torch.device("cpu")))) for _ in range(3)]
    assert len(set(draws)) == 1
    gen = EngineSampling(temperature=1.0, top_p=0.75, seed=7).generator("cpu")
    assert draws[0] == int(sample_with(logits[None], EngineSampling(temperature=1.0, top_p=0.75, seed=7), gen)[0])
    gen = make_generator(SamplingParams(temperature=1.0, top_p=0.75, seed=1), torch.device("cpu"))
    seen = {int(sample_token(logits, SamplingParams(temperature=1.0, top_p=0.75), gen)) for _ in range(200)}
    assert seen == {0, 1}


def test_sampling_params_validate():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_bench_serve_script_runs_on_cpu(tmp_path):
    """The GPU load generator's code path, at toy size: every run completes and is written."""
    import json
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_serve.py"
    argv = ["bench_serve.py", "--model", "tiny-llama", "--device", "cpu", "--lengths", "200", "300",
            "--fill-from-document", "300", "--counts", "1", "3", "--fill-counts", "1", "4", "--full-counts", "2",
            "--budget", "48", "--window", "8", "--max-tokens", "48", "--fill-max-tokens", "24", "--steady-steps", "4",
            "--out", str(tmp_path)]
    old = sys.argv
    sys.argv = argv
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = old
    assert done.value.code == 0
    res = json.loads((tmp_path / "bench_serve.json").read_text())
    runs = [r for r in res["runs"] if r.get("fits")]
    assert len(runs) == 6 and all(not r["errors"] and r["decode_tokens_per_s"] > 0 for r in runs)
    assert all(r["repeated_document_ttft_s"] > 0 for r in res["repeated"])


def test_backend_choice_is_explicit():
    """auto picks the engine when it can run the model; engine on a model it cannot run is an error."""
    from snapkv.serve.cli import pick_backend

    assert pick_backend(tiny_model("llama"), "auto") == ("engine", None)
    kind, reason = pick_backend(tiny_model("gemma2"), "auto")
    assert kind == "transformers" and "sliding" in reason
    with pytest.raises(ValueError, match="--backend engine cannot run this model"):
        pick_backend(tiny_model("gemma2"), "engine")
    assert pick_backend(tiny_model("gemma2"), "transformers")[0] == "transformers"


_KERNEL_SLOTS = """
import sys, json, torch
sys.path.insert(0, {tests!r})
from triton_interp import patch_interpreter_for_numpy
patch_interpreter_for_numpy()
from snapkv.config import SnapKVConfig
from snapkv.generation.fused import kernel_ops
from snapkv.serve.backend import PrefillJob
from snapkv.serve.batcher import EngineBackend
from snapkv.serve.doc_cache import DocCache
from snapkv.serve.sampling import SamplingParams
from snapkv.serve.slots import slot_ops
from tiny_models import tiny_model
model = tiny_model("llama")
cfg = SnapKVConfig(budget=40, window=8, kernel=5, pooling="avg")
b = EngineBackend(model, rows=2, slot_tokens=48, doc_cache=DocCache(0), probe=[5], prefill_chunk=32, fused=False)
b.runner.ops = slot_ops(kernel_ops())  # the Triton kernels, through the interpreter
greedy = SamplingParams(temperature=0.0)
rows = {{}}
for row, (n, seed) in enumerate([(70, 0), (25, 1)]):
    ids = torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    pre = b.prefill(PrefillJob(ids, cfg))
    b.load(row, pre)
    rows[row] = [b.first_token(pre, greedy, None)]
    for _ in range(row + 2):  # row 1 joins while row 0 is decoding
        out = b.step({{r: t[-1] for r, t in rows.items()}}, {{}})
        for r in rows:
            rows[r].append(out[r])
print(json.dumps(rows))
"""


def test_fused_kernels_over_slots_match_engine_alone_interpreter():
    """The Triton kernels (ragged attention over per-row segments) through the interpreter, rows joining."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _KERNEL_SLOTS.format(tests=tests)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    model = tiny_model("llama")
    for row, (n, seed) in enumerate([(70, 0), (25, 1)]):
        ids = torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
        got = rows[str(row)]
        assert got == _alone(model, ids, len(got))
