"""Is a Gemma reuse loss a selection problem? Each global layer keeps the query-aware selection, in reuse order.

For the Gemma-3-270M reuse losses (``results/gemma_margins.py``), the probe's cache (``Probe()``:
budget 1024, kernel 31, the context's last 32 kept) is rebuilt with the query-aware kernel-31
selection's context positions (the question in the window, as in ``query`` mode) forced into
chosen global layers, the rest filled by the probe's votes; then the question is fed after it
(reuse order) and the answer decoded. If even the query-aware positions on every layer lose the
answer, no selection from the same budget would be expected to keep it.

    PYTHONPATH=src python results/gemma_selection_swap.py > results/gemma3-4k-margins/selection_swap.txt
"""

from __future__ import annotations

import dataclasses

import torch

from snapkv.cache.compressed import CompressedLayer
from snapkv.config import SnapKVConfig
from snapkv.eval import engine as E
from snapkv.eval.methods import METHODS, PROBE_TEXT, EvalMethod
from snapkv.eval.runner import codec_for, load
from snapkv.eval.tasks import make_sample
from snapkv.integration.session import SnapKVSession
from snapkv.methods import SnapKV

PROMPTS = [("passkey", 0, 9), ("passkey", 1, 4), ("niah_single_2", 0, 2)]


@dataclasses.dataclass(slots=True)
class Forced(SnapKV):
    """SnapKV whose scores put the given positions of the given layers first."""

    forced: dict = dataclasses.field(default_factory=dict)

    def score(self, inputs):  # noqa: D102
        s = SnapKV.score(self, inputs)
        if inputs.layer_idx in self.forced:
            s = s.clone()
            s[..., torch.tensor(sorted(self.forced[inputs.layer_idx]))] += 1e4
        return s


def main() -> None:
    torch.set_num_threads(1)
    model, tok = load("gemma3-270m")
    codec = codec_for(tok, "plain")
    for task, seed, index in PROMPTS:
        s = make_sample(task, codec, 4096, index, seed)
        lc, q = len(s.context_ids), s.question_ids
        with torch.no_grad(), SnapKVSession(model, SnapKVConfig(window=32), capture=True) as session:
            full = E.Prefill(model, session, s.input_ids)
            ctx = E.Prefill(model, session, s.context_ids)
            METHODS["_q31"] = EvalMethod("_q31", lambda: SnapKV(kernel=31, pooling="max"), uses_queries=True)
            qc = E._derive(session, full, E.Setting("_q31", "query", 1024), 32)
            chosen = {i: {p for p in layer.positions[0, 0].tolist() if p < lc}
                      for i, layer in enumerate(qc.layers) if isinstance(layer, CompressedLayer)}
            pids = list(codec.encode(PROBE_TEXT))
            pre = E.Prefill(model, session, list(s.context_ids) + pids)
            print(f"{task} seed {seed} #{index}: answer {s.answers[0]}; global layers {sorted(chosen)}", flush=True)
            layer_sets = [[], *([L] for L in chosen), sorted(chosen)]
            for layers in layer_sets:
                forced = {L: chosen[L] for L in layers}
                METHODS["_swap"] = EvalMethod("_swap", lambda f=forced: Forced(kernel=31, pooling="max", forced=f),
                                              uses_queries=True)
                pre.methods = {}
                cache = E._derive(session, pre, E.Setting("_swap", "probe", 1024), 32, probe=len(pids))
                E._cut_tail(cache, len(pids), ctx.cache)
                session.activate(cache)
                out = model(input_ids=E._ids(q, "cpu"), position_ids=E._positions(lc, len(q), "cpu"),
                            logits_to_keep=1, **session.cache_kwargs(cache))
                toks = E.greedy(model, session, cache, out.logits[:, -1].float(), len(s.input_ids), 12, codec.eos)
                print(f"  query-aware positions on layers {layers or 'none (Probe())'}: {codec.decode(toks)!r}",
                      flush=True)
            METHODS.pop("_q31"), METHODS.pop("_swap")


if __name__ == "__main__":
    main()
