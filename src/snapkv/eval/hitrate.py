"""The paper's key observation, measured: do generated tokens attend where the window voted?

Per layer (SnapKV, Li et al. 2024, arXiv:2404.14469, section 3): the observation window's
votes select the top ``top_frac`` (5%) of prefix positions per query head; a generated
token *attends* to the prefix positions whose attention weight exceeds ``threshold`` (0.05).
The hit rate is the fraction of attended positions that were selected, averaged over
query heads and generated tokens (pairs that attend to nothing above the threshold are skipped).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from snapkv.config import SnapKVConfig
from snapkv.core.scoring import window_votes
from snapkv.eval.engine import greedy
from snapkv.eval.tasks import Codec, make_sample
from snapkv.integration.session import SnapKVSession


def layer_hit_rate(
    queries: torch.Tensor,
    keys: torch.Tensor,
    prompt_len: int,
    window: int,
    *,
    scaling: float,
    softcap: float | None = None,
    top_frac: float = 0.05,
    threshold: float = 0.05,
) -> float:
    """Hit rate of one layer.

    Args:
        queries: ``[1, Hq, L + T, D]`` post-RoPE queries of the prompt and ``T`` generated tokens.
        keys: ``[1, Hkv, L + T, D]`` post-RoPE keys.
        prompt_len: ``L``; the window is the prompt's last ``window`` tokens, the prefix the rest.
    """
    _, hq, total, d = queries.shape
    hkv = keys.shape[1]
    prefix = prompt_len - window
    votes = window_votes(queries[:, :, prompt_len - window : prompt_len], keys[:, :, :prompt_len],
                         scaling=scaling, softcap=softcap)[0, :, :prefix]  # [Hq, prefix]
    k = max(1, math.ceil(top_frac * prefix))
    chosen = torch.zeros_like(votes, dtype=torch.bool)
    chosen.scatter_(1, votes.topk(k, dim=-1).indices, True)
    q = queries[0, :, prompt_len:].float()  # [Hq, T, D]
    kk = keys[0].float().repeat_interleave(hq // hkv, dim=0)  # [Hq, L+T, D]
    logits = torch.matmul(q, kk.transpose(-1, -2)) * scaling  # [Hq, T, L+T]
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    t = q.shape[1]
    causal = torch.arange(total)[None, :] <= (prompt_len + torch.arange(t))[:, None]
    probs = torch.softmax(logits.masked_fill(~causal[None], float("-inf")), dim=-1)[..., :prefix]
    attended = probs > threshold  # [Hq, T, prefix]
    n_att = attended.sum(-1)  # [Hq, T]
    hits = (attended & chosen[:, None, :]).sum(-1)
    ok = n_att > 0
    if not bool(ok.any()):
        return math.nan
    return float((hits[ok].float() / n_att[ok].float()).mean())


def sample_hit_rates(model: torch.nn.Module, codec: Codec, ids: Sequence[int], window: int, new_tokens: int,
                     **kw: Any) -> list[float]:
    """Per compressed layer: hit rates for one prompt, after a full-cache greedy answer."""
    device = next(model.parameters()).device
    with torch.no_grad(), SnapKVSession(model, SnapKVConfig(window=window), capture=True) as s:
        cache = s.new_cache()
        out = model(input_ids=torch.tensor([list(ids)], device=device), **s.cache_kwargs(cache))
        gen = greedy(model, s, cache, out.logits[:, -1], len(ids), new_tokens, frozenset())
    full = list(ids) + gen
    with torch.no_grad(), SnapKVSession(model, SnapKVConfig(window=window), capture=True) as s:
        cache = s.new_cache()
        model(input_ids=torch.tensor([full], device=device), **s.cache_kwargs(cache))
        rates = []
        for layer in sorted(s.captured):
            inputs = s.captured[layer].inputs
            rates.append(layer_hit_rate(inputs.queries, inputs.keys, len(ids), window, scaling=inputs.scaling,
                                        softcap=inputs.softcap, **kw))
        return rates


def run_hitrate(model: torch.nn.Module, codec: Codec, model_name: str, tasks: Sequence[str], length: int,
                samples: int, out: Path, window: int = 32, new_tokens: int = 16, seed: int = 0) -> Path:
    """Hit rates per layer averaged over samples; writes ``hitrate_<model>_<length>.{json,png}``."""
    per_sample: list[list[float]] = []
    for index in range(samples):
        for task in tasks:
            sample = make_sample(task, codec, length, index, seed)
            per_sample.append(sample_hit_rates(model, codec, sample.input_ids, window, new_tokens))
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"hitrate_{model_name}_{length}"
    data = {"model": model_name, "length": length, "tasks": list(tasks), "samples": samples, "window": window,
            "new_tokens": new_tokens, "top_frac": 0.05, "threshold": 0.05, "per_sample": per_sample}
    stem.with_suffix(".json").write_text(json.dumps(data), encoding="utf-8")
    plot_hitrate(data, stem.with_suffix(".png"))
    return stem.with_suffix(".png")


def plot_hitrate(data: dict[str, Any], path: Path) -> Path:
    """Mean hit rate per layer with a 95% t-interval band over prompts."""
    from snapkv.eval.plots import _plt

    plt = _plt()
    rows = torch.tensor(data["per_sample"], dtype=torch.float64)  # [N, layers]
    mean = rows.nanmean(0)
    n = (~rows.isnan()).sum(0).clamp_min(1)
    sd = torch.sqrt(((rows - mean).nan_to_num(0) ** 2).sum(0) / (n - 1).clamp_min(1))
    half = 1.96 * sd / n.sqrt()
    x = list(range(rows.shape[1]))
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.plot(x, (100 * mean).tolist(), marker="o", ms=3)
    ax.fill_between(x, (100 * (mean - half)).tolist(), (100 * (mean + half)).tolist(), alpha=0.25)
    ax.set_ylim(0, 100)
    ax.set_xlabel("compressed layer (index among full-attention layers)")
    ax.set_ylabel("hit rate (%)")
    ax.set_title(f"{data['model']}, {data['length']} tokens, {len(rows)} prompts ({', '.join(data['tasks'])})\n"
                 f"top-5% votes of a {data['window']}-token window vs positions generated tokens attend > 0.05",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
