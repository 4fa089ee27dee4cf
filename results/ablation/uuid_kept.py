"""niah_single_3 (UUID values) at 2K on SmolLM2: which of the UUID's tokens survive SnapKV, by place in the UUID.

    python results/ablation/uuid_kept.py [N]   -> results/ablation/uuid_kept.json

For the first N prompts: one captured prefill each, then the kept positions of every layer and KV head at
budgets 256 and 1024 for pooling kernels 7 and 31; reports, for each token of the UUID (in order), the share
of (layer, head) pairs that keep it, and the share of pairs keeping the whole UUID. Full-cache answers copy
the UUID; SnapKV answers start it right and lose it midway (records in results/smollm2-2k-ruler).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from snapkv import SnapKVConfig, SnapKVSession
from snapkv.eval.runner import codec_for, load
from snapkv.eval.tasks import make_sample
from snapkv.methods import SnapKV

N = int(sys.argv[1]) if len(sys.argv) > 1 else 4
torch.set_num_threads(1)
model, tok = load("smollm2")
codec = codec_for(tok, "auto")
rows = []
for index in range(N):
    sample = make_sample("niah_single_3", codec, 2048, index)
    ids = list(sample.input_ids)
    value = sample.answers[0]
    pieces = [tok.decode([t]) for t in ids]  # the UUID's tokens: those overlapping its characters
    ends = torch.tensor([len(p) for p in pieces]).cumsum(0)
    at = "".join(pieces).index(value)
    first = int((ends > at).nonzero()[0])
    last = int((ends >= at + len(value)).nonzero()[0])
    want = ids[first : last + 1]
    starts = [first]
    span = torch.arange(starts[0], starts[0] + len(want))
    with torch.no_grad(), SnapKVSession(model, SnapKVConfig(window=32), capture=True) as s:
        src = s.new_cache()
        model(input_ids=torch.tensor([ids]), **s.cache_kwargs(src))
        row = {"index": index, "value": value, "value_tokens": len(want), "value_at": int(span[0]),
               "prompt_tokens": len(ids)}
        for budget in (256, 1024):
            for kernel in (7, 31):
                cache = s.derive(src, method=SnapKV(kernel=kernel), config=SnapKVConfig(budget=budget, window=32))
                kept = torch.stack([torch.isin(span, layer.positions[0, h].long()).float()
                                    for layer in cache.layers for h in range(layer.positions.shape[1])])
                key = f"b{budget}_k{kernel}"
                row[f"{key}_kept_by_token"] = [round(float(x), 2) for x in kept.mean(0)]
                row[f"{key}_heads_keeping_all"] = round(float((kept.min(-1).values == 1).float().mean()), 3)
    rows.append(row)
    print(json.dumps(row), flush=True)
Path(__file__).with_name("uuid_kept.json").write_text(json.dumps(rows, indent=1))
