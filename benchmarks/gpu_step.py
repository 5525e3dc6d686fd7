"""Training throughput on a GPU: tokens/s of full optimizer steps (forward + backward + AdamW) of a
RoutedTransformer with a routed attention kind and an MoE FFN, under ``--precision`` (bf16 by
default: routelab's ``train.precision`` path), against the same model with dense attention and a
dense FFN of equal active width.

    python benchmarks/gpu_step.py --device cuda [--seq-len 8192] [--attention moba] [--experts 64]

fp32 master weights, autocast for the forward, float32 routing (``routelab.precision``); fp16 adds
the loss scaler. Attention kinds
with ``attention.backend`` run on FlexAttention on CUDA (``auto``). Writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from common import write_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from routelab import ModelConfig, RoutedTransformer  # noqa: E402
from routelab.precision import autocast, grad_scaler  # noqa: E402

ATTENTION = {
    "dense": dict(kind="dense"),
    "local": dict(kind="local", window=512, block_size=128),
    "bigbird": dict(kind="bigbird", block_size=128, window_blocks=3, num_global_blocks=1, num_random_blocks=2),
    "moba": dict(kind="moba", block_size=128, top_k=3),
}


def model_config(args, attention: str, moe: bool) -> ModelConfig:
    hidden = 4 * args.d_model // args.top_k if moe else 4 * args.d_model  # equal active width
    ffn = dict(kind="dense", hidden=4 * args.d_model)
    if moe:
        ffn = dict(kind="moe", num_experts=args.experts, hidden=hidden, router=dict(kind="topk", top_k=args.top_k))
    return ModelConfig(
        vocab_size=32000,
        d_model=args.d_model,
        n_heads=args.d_model // 64,
        n_layers=args.layers,
        max_seq_len=args.seq_len,
        causal=True,
        attention=ATTENTION[attention],
        ffn=ffn,
    )


def tokens_per_s(cfg: ModelConfig, args, device) -> dict:
    torch.manual_seed(0)
    model = RoutedTransformer(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), device=device)
    scaler = grad_scaler(device, args.precision)
    times = []
    for i in range(args.warmup + args.steps):
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        t0 = time.perf_counter()
        with autocast(device, args.precision):
            out = model(ids, labels=ids)
        scaler.scale(out.loss).backward()  # out.loss includes the MoE auxiliary losses
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return dict(step_s=med, tokens_per_s=args.batch * args.seq_len / med, peak_gb=peak, loss=float(out.loss))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--attention", nargs="+", default=["moba", "local"], choices=list(ATTENTION))
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (compiles happen here)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for attention, moe in [("dense", False), *[(a, True) for a in args.attention]]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        r = dict(attention=attention, ffn=f"moe-e{args.experts}-top{args.top_k}" if moe else "dense")
        r.update(seq_len=args.seq_len, batch=args.batch, d_model=args.d_model, layers=args.layers, precision=args.precision)
        r.update(tokens_per_s(model_config(args, attention, moe), args, device))
        rows.append(r)
        print(
            f"{r['attention']:8s} {r['ffn']:16s} {r['tokens_per_s']:10.0f} tok/s  step {1000 * r['step_s']:7.1f} ms"
            f"  peak {r['peak_gb'] or 0:.1f} GB  loss {r['loss']:.3f}",
            flush=True,
        )
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
