"""Tensor parallelism on CPU: two gloo ranks on loopback, each holding half the heads and MLP columns.

Teacher-forced logits of the rank-local models (transformers path with a SnapKV cache, and the
engine) equal the whole model's, at a budget below the prompt and with the full cache.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from snapkv.generation.tp import local_config, shard_model
from tests.tiny_models import tiny_model

FAMILIES = ("llama", "qwen2", "qwen3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _teacher_forced_hf(model, ids, cache_kwargs, steps):
    from snapkv.integration.hf import cache_argument

    logits = []
    out = model(input_ids=ids, **cache_kwargs)
    logits.append(out.logits[:, -1].float())
    pos = ids.shape[1]
    cache = next(iter(cache_kwargs.values()))
    for t in range(steps):
        tok = torch.full((ids.shape[0], 1), 5 + t)
        step = model(input_ids=tok, position_ids=torch.full_like(tok, pos + t), **{cache_argument(model): cache})
        logits.append(step.logits[:, -1].float())
    return logits


def _teacher_forced_engine(engine, ids, steps):
    with torch.inference_mode():
        cache, logits, _ = engine.prefill(ids, max_new_tokens=steps + 1)
        runner = engine.runner(cache)
        out = [logits.float()]
        for t in range(steps):
            runner.feed(torch.full((ids.shape[0],), 5 + t))
            runner.step()
            out.append(runner.logits.float().clone())
    return out


def _run_both(model, ids, config, tp_context):
    from snapkv import SnapKVSession
    from snapkv.generation import Engine

    results = {}
    with tp_context(), torch.no_grad():
        with SnapKVSession(model, config) as s:
            results["hf"] = _teacher_forced_hf(model, ids, s.cache_kwargs(s.new_cache()), 4)
        results["engine"] = _teacher_forced_engine(Engine(model, config), ids, 4)
    return results


def _worker(rank: int, world: int, port: int, family: str, queue) -> None:
    import contextlib

    from snapkv import SnapKVConfig
    from snapkv.generation.tp import TensorParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        full = tiny_model(family)
        ids = torch.randint(3, 256, (1, 70), generator=torch.Generator().manual_seed(1))
        errors = {}
        for label, config in (("budget", SnapKVConfig(budget=24, window=6)), ("full", SnapKVConfig(budget=1.0))):
            ref = _run_both(full, ids, config, contextlib.nullcontext)
            local = shard_model(full, rank, world)
            got = _run_both(local, ids, config, lambda m=local: TensorParallel(m))
            for path in ("hf", "engine"):
                errors[f"{label}/{path}"] = max(float((a - b).abs().max()) for a, b in zip(ref[path], got[path],
                                                                                             strict=True))
            errors[f"{label}/heads"] = local.config.num_attention_heads
        alone = _run_both(local, ids, SnapKVConfig(budget=24, window=6), contextlib.nullcontext)  # no all-reduce
        errors["no_reduce"] = max(float((a - b).abs().max()) for a, b in zip(ref["hf"], alone["hf"], strict=True))
        queue.put((rank, errors))
    except BaseException as err:  # report, never hang the parent
        queue.put((rank, repr(err)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_equal_one_model(family, monkeypatch):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    # The spawned ranks import snapkv and tests as this process does.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in sys.path if p))
    procs = [ctx.Process(target=_worker, args=(r, 2, port, family, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank, errors in results.items():
        assert isinstance(errors, dict), f"rank {rank}: {errors}"
        for key, err in errors.items():
            if key.endswith("heads"):
                assert err == 2, "each rank holds half of the 4 query heads"
            elif key == "no_reduce":
                assert err > 1e-2, "without the all-reduce a rank's logits must differ (the test can fail)"
            else:
                assert err < 1e-4, f"rank {rank} {key}: max |logit diff| {err}"


def test_local_config_refuses_what_does_not_divide():
    model = tiny_model("llama")
    assert local_config(model.config, 2).num_key_value_heads == 1
    with pytest.raises(ValueError, match="num_key_value_heads \\(2\\) must be divisible by the world size \\(4\\)"):
        local_config(model.config, 4)
    with pytest.raises(ValueError, match="model types"):
        local_config(tiny_model("gemma2").config, 2)
    with pytest.raises(ValueError, match="rank must lie"):
        shard_model(model, 2, 2)
