"""Benchmark the Triton window-votes kernel against its torch twin on CUDA.

    python scripts/bench_score.py --L 4096 16384 65536 131072

Times are medians of ``triton.testing.do_bench`` (which warms up and synchronizes). Not a test.
"""

from __future__ import annotations

import argparse

import torch


def bench_score(
    L: int,
    *,
    batch: int = 1,
    q_heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    window: int = 32,
    dtype: torch.dtype = torch.bfloat16,
    gqa_reduce: str = "mean",
    softcap: float | None = None,
    padded: bool = False,
    chunk_size: int = 8192,
) -> dict[str, float]:
    """Time kernel and twin on one random layer (Llama-3-8B shape by default).

    Returns ``L``, ``kernel_ms``, ``ref_ms``, ``speedup``, ``kernel_gbps`` (keys read by both
    passes plus the output, over the kernel time), the extra peak memory of each in MiB, and the
    relative error ``||kernel - ref|| / ||ref||``.
    """
    from triton.testing import do_bench

    from snapkv.kernels.ref import reduced_window_votes_ref
    from snapkv.kernels.score import reduced_window_votes_triton

    if not torch.cuda.is_available():
        raise RuntimeError("bench_score needs CUDA")
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    q_win = torch.randn(batch, q_heads, window, head_dim, device=dev, generator=gen).to(dtype)
    keys = torch.randn(batch, kv_heads, L, head_dim, device=dev, generator=gen).to(dtype)
    valid = None
    if padded:
        valid = torch.ones(batch, L, dtype=torch.bool, device=dev)
        valid[:, : L // 10] = False
    args = dict(q_win=q_win, keys=keys, key_valid=valid, scaling=head_dim**-0.5, softcap=softcap, gqa_reduce=gqa_reduce)

    def kernel() -> torch.Tensor:
        return reduced_window_votes_triton(**args)

    def ref() -> torch.Tensor:
        return reduced_window_votes_ref(**args, chunk_size=chunk_size)

    def extra_peak_mib(fn: object) -> float:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()  # type: ignore[operator]
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    out, expect = kernel(), ref()
    rel = ((out - expect).norm() / expect.norm()).item()
    kernel_ms = do_bench(kernel, return_mode="median")
    ref_ms = do_bench(ref, return_mode="median")
    moved = 2 * keys.numel() * keys.element_size() + out.numel() * 4
    return dict(
        L=L,
        kernel_ms=kernel_ms,
        ref_ms=ref_ms,
        speedup=ref_ms / kernel_ms,
        kernel_gbps=moved / (kernel_ms * 1e-3) / 1e9,
        kernel_peak_mib=extra_peak_mib(kernel),
        ref_peak_mib=extra_peak_mib(ref),
        rel_err=rel,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--L", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--gqa-reduce", choices=["mean", "max"], default="mean")
    p.add_argument("--softcap", type=float, default=None)
    p.add_argument("--padded", action="store_true")
    a = p.parse_args()
    cols = ["L", "kernel_ms", "ref_ms", "speedup", "kernel_gbps", "kernel_peak_mib", "ref_peak_mib", "rel_err"]
    print(" ".join(f"{c:>15}" for c in cols))
    for length in a.L:
        r = bench_score(
            length,
            batch=a.batch,
            q_heads=a.q_heads,
            kv_heads=a.kv_heads,
            head_dim=a.head_dim,
            window=a.window,
            dtype=getattr(torch, a.dtype),
            gqa_reduce=a.gqa_reduce,
            softcap=a.softcap,
            padded=a.padded,
        )
        print(" ".join(f"{r[c]:>15.4g}" for c in cols))


if __name__ == "__main__":
    main()
