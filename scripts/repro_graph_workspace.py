"""Does a CUDA graph survive the destruction of another graph captured on the same stream? (GPU only)

Plain torch, no snapkv: two graphs of the same GEMMs; ``shared`` captures both on torch's
default capture stream (what snapkv's decode runner did before), ``owned`` gives each its own
stream and clears torch's cached cuBLAS workspaces right before each capture (what it does
now). Graph A is destroyed, memory is released and refilled, and graph B is replayed against
the eager result. Each mode runs in its own process (a fault poisons the CUDA context)::

    python scripts/repro_graph_workspace.py            # both modes, one line each
"""

from __future__ import annotations

import gc
import subprocess
import sys

import torch


def run(mode: str) -> str:
    dev = "cuda"
    torch.manual_seed(0)
    ws = [torch.randn(4096, 14336, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(4)]
    x = torch.randn(8, 4096, device=dev, dtype=torch.bfloat16)

    def step(out: torch.Tensor) -> None:
        acc = x
        for w in ws:
            acc = (acc @ w)[:, :4096]
        out.copy_(acc)

    ref = torch.empty(8, 4096, device=dev, dtype=torch.bfloat16)
    step(ref)
    graphs, outs, streams = [], [], []
    for _ in range(2):
        out = torch.empty_like(ref)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step(out)
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        if mode == "owned":
            torch._C._cuda_clearCublasWorkspaces()
            with torch.cuda.graph(g, stream=s):
                step(out)
        else:
            with torch.cuda.graph(g):
                step(out)
        graphs.append(g)
        outs.append(out)
        streams.append(s)
    del graphs[0]
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    junk = [torch.full((256, 1024, 1024), float("nan"), device=dev, dtype=torch.bfloat16) for _ in range(8)]
    for _ in range(3):
        graphs[-1].replay()
    torch.cuda.synchronize()
    del junk
    diff = float((outs[-1].float() - ref.float()).abs().max())
    return f"{mode}: graph B after A's destruction: max diff {diff:.3g} ({'ok' if diff < 1e-2 else 'WRONG'})"


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(run(sys.argv[1]), flush=True)
        raise SystemExit(0)
    for mode in ("shared", "owned"):
        p = subprocess.run([sys.executable, __file__, mode], capture_output=True, text=True, timeout=300)
        tail = (p.stdout.strip() or p.stderr.strip().splitlines()[-1] if (p.stdout or p.stderr) else "")
        print(f"{mode}: rc {p.returncode}: {tail}", flush=True)
