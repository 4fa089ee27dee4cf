"""Ablation: SnapKV's pooling kernel and GQA reduction on SmolLM2-135M, niah_single_2 at 4K.

    python results/ablation/run_kernel.py   (resumable; appends to results/ablation/records.jsonl)

Same prompts and decode as `snapkv eval` (results/smollm2-4k), one prefill per prompt shared by
every variant. Variants are registered as extra eval methods for this script only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from snapkv.eval.engine import Setting, evaluate_sample
from snapkv.eval.methods import METHODS, EvalMethod
from snapkv.eval.runner import codec_for, load
from snapkv.eval.tasks import TASKS, make_sample
from snapkv.methods import SnapKV

VARIANTS = {
    "snapkv_k7": dict(kernel=7, pooling="max"),
    "snapkv_k15": dict(kernel=15, pooling="max"),
    "snapkv_k31": dict(kernel=31, pooling="max"),
    "snapkv_k7_gqamax": dict(kernel=7, pooling="max", gqa_reduce="max"),
}
for name, kw in VARIANTS.items():
    METHODS[name] = EvalMethod(name, lambda kw=kw: SnapKV(**kw), "uniform", True)

OUT = Path(__file__).with_name("records.jsonl")
TASK, LENGTH = sys.argv[1] if len(sys.argv) > 1 else "niah_single_2", 4096
N = int(sys.argv[2]) if len(sys.argv) > 2 else 14
torch.set_num_threads(1)
old = map(json.loads, OUT.open()) if OUT.exists() else ()
done = {(r["task"], r["index"], r["method"], r["budget"]) for r in old}
model, tok = load("smollm2")
codec = codec_for(tok, "auto")
settings = [Setting("full", "query", None)] + [Setting(m, "query", b) for m in VARIANTS for b in (1024, 2048)]
for index in range(N):
    sample = make_sample(TASK, codec, LENGTH, index)
    todo = [s for s in settings if (TASK, index, s.method, s.budget_label) not in done]
    for out, _ in evaluate_sample(model, codec, sample, todo, window=32):
        st = out.setting
        rec = {"task": TASK, "length": LENGTH, "index": index, "method": st.method, "budget": st.budget_label,
               "answers": list(sample.answers), "prediction": out.prediction,
               "score": TASKS[TASK].score(out.prediction, sample.answers)}
        with OUT.open("a") as f:
            f.write(json.dumps(rec) + "\n")
    print(index, flush=True)
