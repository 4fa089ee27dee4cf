"""Share of the needle value's tokens that KVzip keeps per (layer, KV head) at budget 256 (SmolLM2, 2K).

Output: results/kvzip/needle_kept.txt. Needle tokens are found by matching their text to the answer.
"""
import torch

from snapkv.core.scoring import pool_votes
from snapkv.core.selection import select_topk
from snapkv.eval.runner import codec_for, load
from snapkv.eval.tasks import make_sample
from snapkv.methods.kvzip import DEFAULT_REPLAY_PROMPT, kvzip_scores

torch.set_num_threads(1)
model, tok = load("smollm2"); codec = codec_for(tok)
prompt = list(codec.encode(DEFAULT_REPLAY_PROMPT)) + list(codec.tail)
for task, idx in (("niah_single_2", 1), ("niah_single_1", 1)):
    s = make_sample(task, codec, 2048, idx, 0)
    ctx = list(s.context_ids)
    ans = s.answers[0]
    # positions whose token text overlaps the answer string in the decoded context
    pos = []
    for i in range(len(ctx)):
        t = tok.decode([ctx[i]])
        if t.strip() and t.strip() in ans and any(tok.decode(ctx[j:j+12]).find(ans) >= 0 for j in range(max(0, i-11), i+1)):
            pos.append(i)
    print(task, idx, "answer", ans, "needle token positions", pos, [tok.decode([ctx[p]]) for p in pos])
    sc = kvzip_scores(model, torch.tensor([ctx]), prompt, chunk=512)
    for k in (1, 31):
        fr = []
        for layer in sc:
            sel = select_topk(pool_votes(layer, k, "max"), torch.tensor([256]), 32).indices[0]  # [H, P]
            for h in range(sel.shape[0]):
                kept = set(sel[h].tolist())
                fr.append(sum(p in kept for p in pos) / len(pos))
        fr = torch.tensor(fr)
        print(f"  kernel {k}: needle tokens kept per (layer, head) at 256: mean {fr.mean():.2f}, all kept in {(fr == 1).float().mean():.2f} of heads, none in {(fr == 0).float().mean():.2f}")
