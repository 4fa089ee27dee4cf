"""GPU checks run before the sweep: kernels against their twins, the engine against transformers.

``python -m snapkv.bench.checks [--json PATH]`` prints one line per check and exits non-zero if
any fails. Errors are relative: ``||out - ref|| / ||ref||`` on fresh random inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from snapkv.config import SnapKVConfig
from snapkv.generation import DecodeRunner, Engine, NotEnoughMemoryError
from snapkv.generation.attention import causal_chunk_attention, decode_attention, decode_attention_ref
from snapkv.integration.session import SnapKVSession

RESULTS: list[dict[str, Any]] = []


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def check(name: str, fn: Callable[[], dict[str, Any]]) -> None:
    """Run one check; record ``ok`` from its dict (or the exception) and print a line."""
    t0 = time.perf_counter()
    try:
        info = fn()
    except Exception as err:  # a failing check must not hide the others
        info = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    info["seconds"] = round(time.perf_counter() - t0, 2)
    RESULTS.append({"check": name, **info})
    flag = "PASS" if info.get("ok") else ("INFO" if info.get("ok") is None else "FAIL")
    details = ", ".join(f"{k}={v}" for k, v in info.items() if k != "ok")
    print(f"[{flag}] {name}: {details}", flush=True)


def _time_ms(fn: Callable[[], Any], reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def prefill_attention_checks(backends: tuple[str, ...] = ("flash", "cudnn", "cudnn_gqa")) -> None:
    """Each backend against the fp32 reference on odd shapes, then its speed on one 128K layer."""
    dev = "cuda"
    for backend in backends:
        def correctness(backend: str = backend) -> dict[str, Any]:
            worst = 0.0
            for hq, hkv, d, c, s in ((8, 2, 64, 37, 101), (32, 8, 128, 1000, 3001), (4, 4, 128, 64, 64)):
                q = torch.randn(1, hq, c, d, device=dev, dtype=torch.bfloat16)
                k = torch.randn(1, hkv, s, d, device=dev, dtype=torch.bfloat16)
                v = torch.randn(1, hkv, s, d, device=dev, dtype=torch.bfloat16)
                out = causal_chunk_attention(q, k, v, d**-0.5, backend)
                ref = causal_chunk_attention(q.float(), k.float(), v.float(), d**-0.5, "ref")
                worst = max(worst, rel(out, ref))
            return {"ok": worst < 2e-2, "rel_err": f"{worst:.2e}"}

        check(f"prefill attention [{backend}] vs fp32 reference", correctness)

        def speed(backend: str = backend, n: int = 131072, chunk: int = 8192) -> dict[str, Any]:
            k = torch.randn(1, 8, n, 128, device=dev, dtype=torch.bfloat16)
            v = torch.randn_like(k)
            q = torch.randn(1, 32, chunk, 128, device=dev, dtype=torch.bfloat16)

            def layer() -> None:
                for e in range(chunk, n + 1, chunk):
                    causal_chunk_attention(q, k[:, :, :e], v[:, :, :e], 128**-0.5, backend)

            ms = _time_ms(layer, reps=3)
            flops = 2 * 2 * 32 * 128 * sum(chunk * (e - chunk / 2) for e in range(chunk, n + 1, chunk))
            return {"ok": None, "ms_per_layer_128K": round(ms, 1), "tflops": round(flops / ms / 1e9, 0)}

        check(f"prefill attention [{backend}] one 128K layer in 8K chunks", speed)

    def sdpa_full(n: int = 32768) -> dict[str, Any]:
        q = torch.randn(1, 32, n, 128, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, 8, n, 128, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        f = torch.nn.functional.scaled_dot_product_attention
        ms = _time_ms(lambda: f(q, k, v, is_causal=True, enable_gqa=True), reps=3)
        return {"ok": None, "ms_32K": round(ms, 2), "tflops": round(2 * 32 * 128 * n * n / ms / 1e9, 0)}

    check("reference: SDPA is_causal over a whole 32K layer (what transformers' sdpa runs)", sdpa_full)


def decode_attention_check() -> dict[str, Any]:
    """The static-cache decode attention against its float64 twin, with masked slots."""
    worst = 0.0
    for b, hq, hkv, d, cap in ((1, 32, 8, 128, 2113), (3, 14, 2, 64, 517), (8, 4, 4, 128, 33)):
        q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, hkv, cap, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        bias = torch.zeros(b, cap, device="cuda")
        bias[:, : cap // 5] = float("-inf")
        bias[0, -3:] = float("-inf")
        worst = max(worst, rel(decode_attention(q, k, v, bias, d**-0.5), decode_attention_ref(q, k, v, bias, d**-0.5)))
    return {"ok": worst < 2e-2, "rel_err": f"{worst:.2e}"}


def scoring_speed(n: int = 131072) -> dict[str, Any]:
    """Window votes of one 128K layer (the fused kernel when present) and the torch twin."""
    from snapkv.kernels.dispatch import reduced_window_votes, triton_available
    from snapkv.kernels.ref import reduced_window_votes_ref

    q = torch.randn(1, 32, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16)
    kw = dict(scaling=128**-0.5, softcap=None, gqa_reduce="mean")
    fast = _time_ms(lambda: reduced_window_votes(q, k, None, **kw))
    ref = _time_ms(lambda: reduced_window_votes_ref(q, k, None, chunk_size=8192, **kw))
    err = rel(reduced_window_votes(q, k, None, **kw), reduced_window_votes_ref(q, k, None, chunk_size=8192, **kw))
    return {"ok": err < 2e-2, "triton": triton_available(), "ms_dispatch": round(fast, 3), "ms_torch": round(ref, 3),
            "rel_err": f"{err:.2e}"}


def _teacher_forced(engine: Engine, ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Engine logits along a given token path (so bf16 divergence cannot compound)."""
    with torch.inference_mode():
        cache, logits, _ = engine.prefill(ids, mask, max_new_tokens=tokens.shape[1] + 1)
        runner = DecodeRunner(engine.parts, cache)
        out = [logits.float()]
        for t in range(tokens.shape[1] - 1):
            runner.feed(tokens[:, t])
            runner.step()
            out.append(runner.logits.float().clone())
    return out


def engine_vs_hf(shape: str, layers: int | None, n: int = 3000, steps: int = 12, budget: int = 1024) -> dict[str, Any]:
    """Engine logits against transformers' (full cache, and SnapKVSession at ``budget``), bf16 on GPU."""
    from snapkv.bench.models import random_model

    model = random_model(shape, device="cuda", num_layers=layers)
    vocab = model.lm_head.out_features
    ids = torch.randint(4, vocab, (2, n), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :301] = 0  # left padding: row 1 has n - 301 real tokens
    cfg = SnapKVConfig(budget=budget, window=32, kernel=7, pooling="avg")
    info: dict[str, Any] = {}
    worst = 0.0
    for label, config in (("full", None), (f"snapkv{budget}", cfg)):
        with torch.inference_mode():
            if config is None:
                ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True, pad_token_id=0)
            else:
                with SnapKVSession(model, config) as session:
                    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                                         output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                                         **session.cache_kwargs(session.new_cache()))
        got = _teacher_forced(Engine(model, config), ids, mask, ref.sequences[:, n:])
        errs = [rel(g, r.float()) for g, r in zip(got, ref.logits, strict=True)]
        agree = float(sum((g.argmax(-1) == r.argmax(-1)).float().mean() for g, r in zip(got, ref.logits,
                                                                                        strict=True)) / len(errs))
        info[label] = f"rel_err max {max(errs):.1e} (prefill {errs[0]:.1e}), top1 agree {agree:.2f}"
        worst = max(worst, max(errs))
    del model
    torch.cuda.empty_cache()
    return {"ok": worst < 5e-2, **info}


def graph_vs_eager() -> dict[str, Any]:
    """Replaying the captured step gives the eager step's logits; fused kernels match the plain step.

    Teacher-forced: every variant is fed the same token path (the first variant's greedy tokens), so
    one bf16 argmax flip cannot make every later step differ (the H200 run failed on exactly that).
    """
    from snapkv.bench.models import random_model

    model = random_model("llama3-8b", device="cuda", num_layers=2)
    ids = torch.randint(4, 1000, (3, 5000), device="cuda")
    outs = {}
    same_buffer = True
    path: list[torch.Tensor] = []
    for use_graph, fused in ((False, True), (True, True), (True, False)):
        engine = Engine(model, SnapKVConfig(budget=1024), use_graph=use_graph, fused=fused)
        with torch.inference_mode():
            cache, logits, _ = engine.prefill(ids, max_new_tokens=8)
            runner = engine.runner(cache)
            ptr = cache.keys.data_ptr()
            steps = []
            for t in range(6):
                if len(path) <= t:  # the first variant sets the path
                    path.append((logits if t == 0 else steps[-1]).argmax(-1))
                runner.feed(path[t])
                runner.step()
                steps.append(runner.logits.float().clone())
            same_buffer = same_buffer and cache.keys.data_ptr() == ptr
        outs[(use_graph, fused)] = torch.stack(steps)
    graph_diff = float((outs[(False, True)] - outs[(True, True)]).abs().max())
    fused_err = rel(outs[(True, True)], outs[(True, False)])
    del model
    torch.cuda.empty_cache()
    return {"ok": graph_diff < 1e-2 and fused_err < 2e-2 and same_buffer, "graph_vs_eager_max_diff":
            f"{graph_diff:.1e}", "fused_vs_plain_rel_err": f"{fused_err:.1e}", "cache_in_place": same_buffer}


def whole_layer_long(n: int = 1 << 20) -> dict[str, Any]:
    """One causal attention call over ``n`` positions (more than 2^31 query elements at 1M) against
    the query-chunk path on slices of rows: the whole-layer path is exact at that size too."""
    from snapkv.generation.attention import whole_layer_attention

    q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    scale = 128**-0.5
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = whole_layer_attention(q, k, v, scale)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    worst = 0.0
    for lo, hi in ((0, 4096), (n // 2 - 2048, n // 2 + 2048), (n - 4096, n)):
        ref = causal_chunk_attention(q[:, :, lo:hi], k[:, :, :hi], v[:, :, :hi], scale, "cudnn_gqa")
        worst = max(worst, rel(out[:, :, lo:hi], ref))
    flops = 2 * 2 * 32 * 128 * n * n / 2
    del q, k, v, out
    torch.cuda.empty_cache()
    return {"ok": worst < 2e-2, "rel_err_vs_chunks": f"{worst:.1e}", "seconds": round(seconds, 2),
            "tflops": round(flops / seconds / 1e12)}


def oom_recovery() -> dict[str, Any]:
    """A prompt that cannot fit is refused before prefill with a hint; a forced OOM leaves the engine usable."""
    from snapkv.bench.models import random_model

    model = random_model("mistral-small", device="cuda")
    base = torch.cuda.memory_allocated()
    engine = Engine(model, None)
    # Sized from this device's free memory: 8 rows whose full caches need twice what is free.
    p = engine.parts
    per_token = 2 * p.num_layers * p.num_kv_heads * p.head_dim * torch.empty((), dtype=p.dtype).element_size()
    length = max(1 << 16, 2 * torch.cuda.mem_get_info()[0] // (8 * per_token))
    big = torch.randint(4, 1000, (8, length), device="cpu")
    message = ""
    try:
        engine.prefill(big)
    except NotEnoughMemoryError as err:
        message = str(err)
    refused = "Would fit" in message
    # Force a real out-of-memory mid-prefill: fill the device, leaving too little for the work.
    free = torch.cuda.mem_get_info()[0]
    filler = torch.empty(max(0, free - (3 << 30)), dtype=torch.uint8, device="cuda")
    raised = False
    import snapkv.generation.generate as gen

    saved, gen.check_fits = gen.check_fits, lambda *a, **k: None
    try:
        engine.prefill(torch.randint(4, 1000, (1, 1 << 18)))
    except NotEnoughMemoryError:
        raised = True
    finally:
        gen.check_fits = saved
        del filler
    torch.cuda.empty_cache()
    after = torch.cuda.memory_allocated()
    with torch.inference_mode():
        out = engine.generate(torch.randint(4, 1000, (1, 2048)), max_new_tokens=4)
    usable = out.tokens.shape == (1, 4)
    del model, engine
    torch.cuda.empty_cache()
    return {"ok": refused and raised and usable and after - base < (64 << 20), "refused_with_hint": refused,
            "oom_raised": raised, "leaked_mib": round((after - base) / 2**20, 1), "usable_after": usable,
            "refused_tokens": f"8 x {length}", "message": message[:200]}


def main(argv: list[str] | None = None) -> int:
    """Run every check; exit status 1 if any failed."""
    parser = argparse.ArgumentParser(prog="python -m snapkv.bench.checks")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--quick", action="store_true", help="skip the engine-vs-transformers model checks")
    parser.add_argument("--long", type=int, default=0,
                        help="only check whole-layer attention at this many positions (e.g. 1048576)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: GPU checks skipped")
        return 0
    torch.manual_seed(0)
    if args.long:
        check(f"whole-layer attention at {args.long} positions vs query chunks", lambda: whole_layer_long(args.long))
        return 0 if RESULTS[-1]["ok"] else 1
    prefill_attention_checks()
    check("decode attention vs float64 twin", decode_attention_check)
    check("window votes at 128K (dispatch vs torch twin)", scoring_speed)
    check("decode: graph replay vs eager, fused kernels vs plain step (Llama-3-8B shape, 2 layers)", graph_vs_eager)
    if not args.quick:
        for shape, layers in (("llama3-8b", 2), ("qwen2-small", None), ("mistral-small", None)):
            check(f"engine vs transformers [{shape}, {layers or 'all'} layers, bf16]",
                  lambda s=shape, ly=layers: engine_vs_hf(s, ly))
        check("out-of-memory: refused early, recovered after", oom_recovery)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(RESULTS, fh, indent=1)
    return 0 if all(r.get("ok") is not False for r in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
