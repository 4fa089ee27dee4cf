"""Which of the needle's value tokens survive SnapKV at kernel 7 vs 31 (SmolLM2, niah_single_2, 4K).

    python results/ablation/needle_kept.py [N]   -> results/ablation/needle_kept.json

For the first N prompts of the pooling ablation: one captured prefill each, then the kept positions
of every layer and KV head at budget 1024 for each kernel; reports the share of the value's
tokens (its digits) kept, over layers x heads, and the share of (layer, head) pairs keeping all.
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
    sample = make_sample("niah_single_2", codec, 4096, index)
    ids = list(sample.input_ids)
    value = sample.answers[0]
    digits = [codec.encode(ch)[-1] for ch in value]
    starts = [i for i in range(len(ids) - len(digits)) if ids[i:i + len(digits)] == digits]
    span = torch.arange(starts[0], starts[0] + len(digits))
    with torch.no_grad(), SnapKVSession(model, SnapKVConfig(window=32), capture=True) as s:
        src = s.new_cache()
        model(input_ids=torch.tensor([ids]), **s.cache_kwargs(src))
        row = {"index": index, "value": value, "value_at": int(span[0]), "depth": sample.depth}
        for kernel in (7, 31):
            cache = s.derive(src, method=SnapKV(kernel=kernel), config=SnapKVConfig(budget=1024, window=32))
            kept = torch.stack([torch.isin(span, layer.positions[0, h].long()).float()
                                for layer in cache.layers for h in range(layer.positions.shape[1])])
            row[f"k{kernel}_value_tokens_kept"] = float(kept.mean())
            row[f"k{kernel}_heads_keeping_all"] = float((kept.min(-1).values == 1).float().mean())
    rows.append(row)
    print(json.dumps(row), flush=True)
Path(__file__).with_name("needle_kept.json").write_text(json.dumps(rows, indent=1))
