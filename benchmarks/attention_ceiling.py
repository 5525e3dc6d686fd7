"""How fast can causal local attention get on this CPU? The kernel-only ceiling of a block gather.

    python benchmarks/attention_ceiling.py                     # n = 16384, window 256, 1 thread
    python benchmarks/attention_ceiling.py --n 8192 --blocks 64 128

A block-sparse engine built on ATen's fused CPU flash kernel (the only fused attention kernel with a
CPU backward in this torch) must, for causal window w and query blocks of b, run at least one
kernel call over (b queries) x (b + w keys) per block: (b + w) / (w + 1) times the allowed pairs.
This script times exactly that call, forward + backward, on tensors already gathered and contiguous
(no engine overhead at all), beside causal dense SDPA and routelab's ``local`` kind at the same
block size, all in one process. Its "kernel" speedup is an upper bound on what any gather over this
kernel can reach; the "ideal" speedup counts only the pairs 0 <= i - j <= w (the benchmark's goal
is 60% of ideal).

Shapes: batch 1, H heads, head dim 64, fp32. Times are the minimum over --repeats runs.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from routelab import ModelConfig
from routelab.attention import build_attention

FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
H, HD = 8, 64


def best_ms(fn, repeats: int) -> float:
    fn()  # warm-up: plans, caches, first-touch pages
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


def dense_fn(n: int):
    q, k, v = (torch.randn(1, H, n, HD, requires_grad=True) for _ in range(3))
    g = torch.randn(1, H, n, HD)
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)


def kernel_fn(n: int, b: int, w: int):
    """One fused call over every query block of b and its b + w keys, fwd + bwd, nothing else."""
    nb, lk = n // b, b + w
    q, do = torch.randn(H, nb, b, HD), torch.randn(H, nb, b, HD)
    k, v = torch.randn(H, nb, lk, HD), torch.randn(H, nb, lk, HD)
    i = torch.arange(b)[:, None] + w  # query slot -> position relative to the window start
    j = torch.arange(lk)[None, :]
    mask = torch.zeros(b, lk).masked_fill_(~((i - j >= 0) & (i - j <= w)), float("-inf"))

    def run():
        out, lse = FWD(q, k, v, 0.0, False, attn_mask=mask, scale=HD**-0.5)
        BWD(do, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=HD**-0.5)

    return run


def engine_fn(n: int, b: int, w: int):
    cfg = ModelConfig(
        vocab_size=2, d_model=H * HD, n_heads=H, max_seq_len=n, causal=True, positions="none",
        attention=dict(kind="local", window=w, block_size=b),
    )  # fmt: skip
    attn = build_attention(cfg, layer_idx=0).eval()
    q, k, v = (torch.randn(1, H, n, HD, requires_grad=True) for _ in range(3))
    g = torch.randn(1, H, n, HD)
    return lambda: attn.attend(q, k, v, None, 0).backward(g)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--blocks", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, w = args.n, args.window
    for b in args.blocks:
        if n % b:
            p.error(f"--n {n} must be a multiple of every block size; {b} is not")
    dense_ms = best_ms(dense_fn(n), args.repeats)
    pairs = n * (w + 1) - w * (w + 1) / 2
    ideal = (n * (n + 1) / 2) / pairs
    print(f"torch {torch.__version__}, {args.threads} thread(s), n={n}, causal window {w}, {H} heads, head dim {HD}")
    print(f"dense causal SDPA fwd+bwd: {dense_ms:.0f} ms; ideal speedup {ideal:.1f}x (60% = {0.6 * ideal:.1f}x)")
    print(f"{'block':>6s} {'keys/query':>10s} {'kernel ms':>10s} {'kernel x':>9s} {'of ideal':>8s} "
          f"{'engine ms':>10s} {'engine x':>9s} {'of ideal':>8s}")  # fmt: skip
    for b in args.blocks:
        k_ms = best_ms(kernel_fn(n, b, w), args.repeats)
        e_ms = best_ms(engine_fn(n, b, w), args.repeats)
        ks, es = dense_ms / k_ms, dense_ms / e_ms
        print(f"{b:6d} {b + w:10d} {k_ms:10.0f} {ks:8.1f}x {ks / ideal:8.0%} {e_ms:10.0f} {es:8.1f}x {es / ideal:8.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
