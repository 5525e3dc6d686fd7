"""Expert parallelism on one machine: what the all-to-all costs, measured, then modelled.

1. **Training steps** of ``lm-moe-topk-tiny`` (4 blocks, top-2 of 8 SwiGLU experts) on the same
   global batch (16 x 256 tokens of the standard-library corpus) in 1, 2 and 4 processes over gloo
   on loopback, experts spread over all of them (``train.expert_parallel`` = the number of
   processes), with and without device-limited routing (``max_ranks_per_token=1``). Each step is
   the trainer's own ``train_step`` (forward, backward, gradient reduction, AdamW). Reported: step
   time, tokens/s, bytes each process sent per step (the layers' counters), the same bytes derived
   independently from the routing decisions (recorded by hooks on the routers and gathered from
   every process) and whether they agree, tokens per process reaching other processes, the share of
   the step inside the exchanges.
2. **Exchange cost on loopback**: ``all_to_all_single`` of B bytes to each peer, 2 and 4 processes;
   the fit ``time = alpha + bytes_sent / beta`` per exchange, by least squares, for each number of
   processes (with 4 processes on 2 cores the exchange is CPU-bound: the 2-process fit is the one
   projected).
3. **Projection** (computed, not measured): one MoE layer of a stated large model on clusters of
   8-GPU nodes, 8 to 64 nodes, 100 to 400 Gb/s per GPU: the fitted alpha, the link's beta.

    python benchmarks/expert_parallel.py [--steps 12] [--warmup 3] [--out benchmarks/results/expert_parallel.json]

The machine's cores are shared by the processes: 4 processes on 2 cores measure the exchange and
its bytes, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESET = "lm-moe-topk-tiny"
GLOBAL_BATCH = 16


# ---------------------------------------------------------------------------------------------
# 1. training steps (one worker per process)


def step_worker(steps: int, warmup: int, max_ranks: int | None, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from routelab import RoutedTransformer
    from routelab.config import Config
    from routelab.moe.layer import MoE
    from routelab.moe.parallel import expert_groups
    from routelab.presets import resolve_config_path
    from routelab.train.distributed import init_distributed
    from routelab.train.optim import build_optimizer
    from routelab.train.run import load_task_data, resolve_config
    from routelab.train.sharded import ShardedExperts
    from routelab.train.trainer import train_step

    world = int(os.environ.get("WORLD_SIZE", "1"))
    sets = [f"train.batch_size={GLOBAL_BATCH}", "data.max_bytes=2000000", "train.device=cpu", f"train.expert_parallel={world}"]
    if max_ranks:
        sets.append(f"model.ffn.max_ranks_per_token={max_ranks}")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    cfg = Config.load(resolve_config_path(PRESET), sets)
    ctx = init_distributed("gloo", 120, torch.device("cpu"))
    torch.manual_seed(0)
    data = load_task_data(cfg, None)
    cfg = resolve_config(cfg, data)
    model = RoutedTransformer(cfg.model)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    experts = ShardedExperts(model, expert_groups(world, ctx.rank, world, timeout_s=120)) if world > 1 else None
    optimizer = build_optimizer(model, cfg.train)
    trained = model
    if world > 1:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, experts.names)
        trained = DistributedDataParallel(model)
    decisions: list = []
    for m in layers:  # the routing decisions, to derive the bytes independently of the counters
        m.router.register_forward_hook(lambda mod, args, r: decisions.append(r.expert_idx.detach().clone()))
    E, D, L = cfg.model.ffn.num_experts, cfg.model.d_model, cfg.model.ffn.num_experts // world
    rows = []
    perms: dict = {}
    for step in range(1, warmup + steps + 1):
        decisions.clear()
        t0 = time.perf_counter()
        result = train_step(trained, optimizer, cfg, data, step, perms, torch.device("cpu"), ctx, experts)
        dt = time.perf_counter() - t0
        if step <= warmup:
            continue
        derived = 0.0
        if world > 1:
            mine = torch.stack([routing_counts(idx // L, world) for idx in decisions])  # (layers, 2, world)
            every = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(every, mine)
            derived = sum(expected_bytes(torch.stack([e[i] for e in every]), r, E, D, 4) for r in range(world) for i in range(len(layers))) / world
        comm = result.get("communication", {})
        rows.append({"step_s": dt, "tokens": result["tokens"], "loss": result["loss"], "derived_bytes": derived, **comm})
    if ctx.rank == 0:
        Path(out).write_text(json.dumps(rows))
    if world > 1:
        dist.destroy_process_group()


def routing_counts(dest, world: int):
    """dest (T, K) the rank of each chosen expert -> (2, world): pairs and rows (distinct tokens) per destination."""
    import torch

    pairs = torch.bincount(dest.reshape(-1), minlength=world)
    reached = torch.zeros(dest.shape[0], world, dtype=torch.bool).scatter_(1, dest, True)
    return torch.stack([pairs, reached.sum(0)])


def expected_bytes(counts, rank: int, E: int, D: int, b: int) -> float:
    """What rank ``rank`` sends in one MoE layer's step (``routelab.moe.comm``'s formula), from every
    rank's (2, world) pairs/rows counts stacked as (world, 2, world)."""
    C, U = counts[:, 0], counts[:, 1]  # (src, dst)
    P = counts.shape[0]
    n, u = int(C[rank, rank]), int(U[rank, rank])
    N, M, rows_out, rows_in = int(C[rank].sum()), int(C[:, rank].sum()), int(U[rank].sum()), int(U[:, rank].sum())
    return 16 * (P - 1) + 2 * ((rows_out - u) + (rows_in - u)) * D * b + (N - n) * (8 + b) + (M - n) * b


def run_steps(world: int, steps: int, warmup: int, max_ranks: int | None) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rows.json")
        args = ["--worker", "steps", "--steps", str(steps), "--warmup", str(warmup), "--rows", out]
        if max_ranks:
            args += ["--max-ranks", str(max_ranks)]
        launch(world, args)
        return json.loads(Path(out).read_text())


def launch(world: int, args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world), __file__, *args]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)


# ---------------------------------------------------------------------------------------------
# 2. the exchange alone


def exchange_worker(sizes: list[int], reps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    rows = []
    for size in sizes:  # bytes to each peer
        n = max(1, size // 4)
        x = torch.randn(world * n)
        y = torch.empty_like(x)
        times = []
        for i in range(reps + 2):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_to_all_single(y, x)
            dt = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the exchange ends for everyone when the slowest is done
            if i >= 2:
                times.append(float(dt))
        rows.append({"world": world, "bytes_per_peer": n * 4, "bytes_sent": n * 4 * (world - 1), "seconds": statistics.median(times)})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def fit(points: list[dict]) -> dict:
    """Least squares of seconds = alpha + bytes_sent / beta (relative errors, coefficients >= 0)."""
    import torch

    A = torch.tensor([[1.0, p["bytes_sent"]] for p in points], dtype=torch.float64)
    t = torch.tensor([p["seconds"] for p in points], dtype=torch.float64)
    w = 1.0 / t  # relative error: small exchanges count as much as large ones
    coef = torch.linalg.lstsq(A * w[:, None], t * w).solution
    alpha, inv_beta = (max(float(c), 0.0) for c in coef)
    pred = (A @ torch.tensor([alpha, inv_beta], dtype=torch.float64)).tolist()
    worst = max(abs(p - q) / q for p, q in zip(pred, t.tolist()))
    return {"alpha_s": alpha, "beta_bytes_per_s": 1.0 / inv_beta if inv_beta else math.inf, "worst_relative_error": worst}


# ---------------------------------------------------------------------------------------------
# 3. projection

LARGE = {  # one MoE layer of a DeepSeek-V3-sized model (Liu et al. 2024): the stated model of the projection
    "d_model": 7168, "num_experts": 256, "top_k": 8, "expert_hidden": 2048, "bytes_per_element": 2,
    "tokens_per_gpu": 4096, "gpus_per_node": 8, "gpu_tflops": 989.0, "mfu": 0.4,
}


def distinct_expected(groups: int, per_group: int, k: int, E: int) -> float:
    """Expected number of distinct groups (of ``per_group`` experts each, ``groups`` of them) that
    k experts drawn uniformly without replacement from E fall in."""
    miss = math.comb(E - per_group, k) / math.comb(E, k) if E - per_group >= k else 0.0
    return groups * (1.0 - miss)


def project(model: dict, fitted: dict, nodes: list[int], gbps: list[float], max_ranks: int | None) -> list[dict]:
    """Per MoE layer and training step on one GPU: bytes leaving its node and the all-to-all time of
    the four row exchanges (forward dispatch and combine, and their backward), against expert compute."""
    D, E, K, H, b = model["d_model"], model["num_experts"], model["top_k"], model["expert_hidden"], model["bytes_per_element"]
    T, g = model["tokens_per_gpu"], model["gpus_per_node"]
    flops = 3 * 2 * 3 * D * H * K * T  # SwiGLU: 3 matmuls, 2 FLOPs per MAC, forward + backward = 3x forward
    compute_s = flops / (model["gpu_tflops"] * 1e12 * model["mfu"])
    rows = []
    for n in nodes:
        G = min(n * g, E)  # the expert-parallel group: at most one expert per GPU
        ranks = distinct_expected(G, E // G, K, E)  # rows per token: one per distinct GPU reached
        if max_ranks:
            ranks = min(ranks, max_ranks)
        remote = ranks * (1.0 - g / G)  # rows per token to other nodes (uniform routing)
        bytes_out = T * remote * D * b  # per exchange
        for link in gbps:
            beta = link * 1e9 / 8
            a2a_s = 4 * (fitted["alpha_s"] + bytes_out / beta)
            rows.append({"nodes": n, "gpus": n * g, "ep": G, "link_gbps": link, "max_ranks_per_token": max_ranks,
                         "rows_per_token": ranks, "mb_off_node_per_exchange": bytes_out / 1e6, "a2a_ms": a2a_s * 1e3,
                         "expert_ms": compute_s * 1e3, "a2a_over_compute": a2a_s / compute_s})
    return rows


# ---------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "expert_parallel.json"))
    p.add_argument("--worker", choices=["steps", "exchange"], help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    p.add_argument("--max-ranks", type=int, help=argparse.SUPPRESS)
    p.add_argument("--sizes", type=int, nargs="+", default=[2**k for k in range(10, 23, 2)], help="bytes to each peer")
    args = p.parse_args()
    if args.worker == "steps":
        return step_worker(args.steps, args.warmup, args.max_ranks, args.rows)
    if args.worker == "exchange":
        return exchange_worker(args.sizes, 10, args.rows)

    from common import write_json

    sys.path.insert(0, str(ROOT))
    results: dict = {"preset": PRESET, "global_batch": GLOBAL_BATCH, "cpu_count": os.cpu_count(), "steps": []}
    print(f"1. training steps of {PRESET}, global batch {GLOBAL_BATCH} x 256 tokens, gloo on loopback")
    header = f"{'procs':>5} {'limit':>5} {'step ms':>8} {'tok/s':>7} {'MB sent/proc':>12} {'derived':>8} {'tok away':>8} {'local':>6} {'ranks/tok':>9} {'a2a share':>9} {'loss':>7}"
    print(header)
    for world in args.worlds:
        for limit in ([None] if world == 1 else [None, 1]):
            rows = run_steps(world, args.steps, args.warmup, limit)
            step_s = statistics.median(r["step_s"] for r in rows)
            mean = lambda k, rows=rows: statistics.fmean(r.get(k, 0.0) for r in rows)  # noqa: E731
            row = {"processes": world, "max_ranks_per_token": limit, "step_s": step_s,
                   "tokens_per_s": statistics.fmean(r["tokens"] for r in rows) / step_s,
                   "sent_bytes": mean("a2a_sent_bytes"), "derived_bytes": mean("derived_bytes"),
                   "bytes_equal_routing": all(abs(r.get("a2a_sent_bytes", 0.0) - r["derived_bytes"]) < 1e-6 for r in rows),
                   "tokens_away": mean("a2a_sent_tokens"), "local_fraction": mean("local_fraction") if world > 1 else 1.0,
                   "ranks_per_token": mean("ranks_per_token") if world > 1 else 1.0,
                   "a2a_share": statistics.fmean(r.get("a2a_s", 0.0) / r["step_s"] for r in rows),
                   "expert_share": statistics.fmean(r.get("expert_s", 0.0) / r["step_s"] for r in rows),
                   "loss_last": rows[-1]["loss"]}
            results["steps"].append(row)
            print(f"{world:>5} {str(limit or '-'):>5} {step_s * 1e3:>8.1f} {row['tokens_per_s']:>7.0f} {row['sent_bytes'] / 1e6:>12.3f}"
                  f" {'equal' if row['bytes_equal_routing'] else 'DIFFER':>8} {row['tokens_away']:>8.0f} {row['local_fraction']:>6.1%}"
                  f" {row['ranks_per_token']:>9.2f} {row['a2a_share']:>9.1%} {row['loss_last']:>7.3f}")
    print("\n2. all_to_all_single on loopback (median of 10, the slowest process)")
    points = []
    for world in (2, 4):
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "rows.json")
            launch(world, ["--worker", "exchange", "--rows", out, "--sizes", *map(str, args.sizes)])
            points += json.loads(Path(out).read_text())
    for pt in points:
        print(f"  {pt['world']} processes, {pt['bytes_per_peer']:>9,} B per peer: {pt['seconds'] * 1e6:>9.0f} us")
    fits = {w: fit([p for p in points if p["world"] == w]) for w in (2, 4)}
    results["exchange"], results["fit"] = points, fits
    for w, f in fits.items():
        print(f"  fit, {w} processes: {f['alpha_s'] * 1e6:.0f} us + bytes sent / {f['beta_bytes_per_s'] / 1e9:.2f} GB/s"
              f" (worst relative error {f['worst_relative_error']:.0%})")
    fitted = fits[2]
    print(f"\n3. projected (not measured): one MoE layer of {LARGE}")
    proj = project(LARGE, fitted, [8, 16, 32, 64], [100.0, 200.0, 400.0], None) + project(LARGE, fitted, [8, 16, 32, 64], [100.0, 200.0, 400.0], 4)
    results["projection"] = {"model": LARGE, "rows": proj}
    print(f"{'nodes':>5} {'EP':>4} {'Gb/s':>5} {'limit':>5} {'rows/tok':>8} {'MB off node':>11} {'a2a ms':>7} {'expert ms':>9} {'a2a/compute':>11}")
    for r in proj:
        print(f"{r['nodes']:>5} {r['ep']:>4} {r['link_gbps']:>5.0f} {str(r['max_ranks_per_token'] or '-'):>5} {r['rows_per_token']:>8.2f}"
              f" {r['mb_off_node_per_exchange']:>11.1f} {r['a2a_ms']:>7.1f} {r['expert_ms']:>9.1f} {r['a2a_over_compute']:>11.2f}")
    write_json(args.out, results)


if __name__ == "__main__":
    main()
