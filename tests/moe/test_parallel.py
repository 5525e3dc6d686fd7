"""Expert parallelism in real processes (gloo over loopback): the MoE layer with its experts spread
over 2 or 4 ranks gives the outputs and every gradient (input, router, experts) of the same layer in
one process on the same tokens."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

LAYER_CHECK = textwrap.dedent(
    """
    import os, sys
    import torch, torch.distributed as dist
    from routelab.moe import MoE
    from routelab.moe.parallel import apply_expert_parallel, expert_groups, gather_experts

    router, opts, training = sys.argv[1], eval(sys.argv[2]), sys.argv[3] == "train"
    low = len(sys.argv) > 4 and sys.argv[4] == "bf16"  # under bf16 autocast: rows travel and experts run in bf16
    tol = dict(atol=2e-2, rtol=2e-2) if low else dict(atol=1e-5, rtol=1e-5)
    amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=low)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    D, E, H, T = 8, 8, 6, 11
    full = MoE(d_model=D, num_experts=E, hidden=H, router=router, vocab_size=29, activation="swiglu", **opts)
    ep = MoE(d_model=D, num_experts=E, hidden=H, router=router, vocab_size=29, activation="swiglu", **opts)
    ep.load_state_dict(full.state_dict())
    with torch.no_grad():
        for n, p in full.named_parameters():
            if n.startswith("experts.b"):
                p.normal_()  # non-zero biases, copied below
        ep.load_state_dict(full.state_dict())
    x = torch.randn(world, 2, T, D, generator=torch.Generator().manual_seed(1))  # every rank's tokens
    ids = torch.randint(0, 29, (world, 2, T), generator=torch.Generator().manual_seed(2))
    gy = torch.randn(world, 2, T, D, generator=torch.Generator().manual_seed(3))
    full.train(training); ep.train(training)
    # one process: all ranks' tokens (capacity is per group of tokens, so per rank here too)
    xs = x.clone().requires_grad_(True)
    with amp():
        outs = [full(xs[r], token_ids=ids[r]) for r in range(world)]
    loss = sum((o.hidden.float() * gy[r]).sum() + o.aux_loss for r, o in enumerate(outs))
    loss.backward()
    groups = expert_groups(world, rank, world, timeout_s=120)
    names = apply_expert_parallel(ep, groups)
    xr = x[rank].clone().requires_grad_(True)
    with amp():
        out = ep(xr, token_ids=ids[rank])
    ((out.hidden.float() * gy[rank]).sum() + out.aux_loss).backward()
    assert out.hidden.dtype == (torch.bfloat16 if low else torch.float32)
    torch.testing.assert_close(out.hidden.float(), outs[rank].hidden.float(), **tol)
    torch.testing.assert_close(xr.grad, xs.grad[rank], **tol)
    g = ep.router.weight.grad.clone() if ep.router.learned else None
    if g is not None:
        dist.all_reduce(g)  # each rank holds its tokens' share of the router gradient
        torch.testing.assert_close(g, full.router.weight.grad, **tol)
    for n in names:
        local = dict(ep.named_parameters())[n].grad
        torch.testing.assert_close(gather_experts(local, groups), dict(full.named_parameters())[n].grad, msg=n, **tol)
    if low:  # the same exchange in fp32 sends more: the rows and gates are half as many bytes in bf16
        bf16_bytes = ep.expert_parallel.counters.take()["a2a_sent_bytes"]
        ep(x[rank].clone().requires_grad_(True), token_ids=ids[rank]).hidden.sum().backward()
        fp32_bytes = ep.expert_parallel.counters.take()["a2a_sent_bytes"]
        assert fp32_bytes / 2 < bf16_bytes < fp32_bytes, (bf16_bytes, fp32_bytes)
    print("ok", rank)
    dist.destroy_process_group()
    """
)


def _torchrun(nproc: int, script: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)


@pytest.mark.parametrize(
    "nproc, router, opts, mode",
    [(2, "topk", {"top_k": 2}, "train"), (4, "topk", {"top_k": 2}, "train"), (2, "switch", {"capacity_factor": 1.0}, "train"),
     (2, "hash", {}, "train"), (2, "gshard", {}, "eval"), (2, "topp", {"top_p": 0.5}, "train"), (2, "random", {}, "eval")],
)  # gshard and random draw random numbers in training: each rank's stream differs from one process's
def test_expert_parallel_layer_equals_one_process(tmp_path, nproc, router, opts, mode):
    script = tmp_path / "check.py"
    script.write_text(LAYER_CHECK)
    ran = _torchrun(nproc, script, router, repr(opts), mode)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.count("ok") == nproc  # every rank got through its checks (lines may interleave)


def test_expert_parallel_layer_in_bf16_equals_one_process_in_bf16(tmp_path):
    """Under bf16 autocast the rows cross in bf16 (2 bytes per value) and the result is the one-process
    bf16 layer's (to bf16 rounding; routing itself is float32 and identical)."""
    script = tmp_path / "check.py"
    script.write_text(LAYER_CHECK)
    ran = _torchrun(2, script, "topk", repr({"top_k": 2}), "train", "bf16")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.count("ok") == 2


def test_routers_that_rank_the_whole_batch_refuse_expert_parallelism():
    from routelab import ModelConfig, RoutedTransformer
    from routelab.errors import ConfigError
    from routelab.moe.parallel import check_expert_parallel

    for router in ("expert_choice", "soft"):
        cfg = ModelConfig(vocab_size=11, d_model=16, n_heads=2, head="classification", num_labels=2,
                          ffn={"kind": "moe", "router": router, "num_experts": 4})
        with pytest.raises(ConfigError, match=f"router '{router}' ranks the whole batch together"):
            check_expert_parallel(RoutedTransformer(cfg), 2, 2)
    ok = RoutedTransformer(ModelConfig(vocab_size=11, d_model=16, n_heads=2, ffn={"kind": "moe", "router": "hash", "num_experts": 4}))
    assert len(check_expert_parallel(ok, 2, 4)) == 2  # both MoE layers


COUNTER_CHECK = textwrap.dedent(
    """
    import sys
    import torch, torch.distributed as dist
    from routelab.moe import MoE
    from routelab.moe.parallel import apply_expert_parallel, expert_groups

    M = eval(sys.argv[1])  # device-limited routing: at most M ranks per token (None: unlimited)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    D, E, H, T, K = 8, 8, 6, 13, 3
    torch.manual_seed(0)
    layer = MoE(d_model=D, num_experts=E, hidden=H, router="topk", top_k=K,
                **({"max_ranks_per_token": M, "expert_groups": world} if M else {}))
    x = torch.randn(world, T, D, generator=torch.Generator().manual_seed(1))  # every rank's tokens
    L = E // world
    C = torch.zeros(world, world, dtype=torch.long)  # pairs from rank r to rank s, from the routing itself
    U = torch.zeros(world, world, dtype=torch.long)  # rows: tokens of rank r with an expert on rank s
    reach = []
    for r in range(world):
        dest = layer.router(x[r]).expert_idx // L  # (T, K) the rank of each chosen expert
        C[r] = torch.bincount(dest.reshape(-1), minlength=world)
        U[r] = torch.tensor([sum(s in set(row.tolist()) for row in dest) for s in range(world)])
        reach.append(torch.tensor([len(set(row.tolist())) for row in dest]))
    if M:
        assert max(int(n.max()) for n in reach) <= M
    apply_expert_parallel(layer, expert_groups(world, rank, world, timeout_s=120))
    out = layer(x[rank].clone().requires_grad_(True))
    out.hidden.square().sum().backward()
    c = layer.expert_parallel.counters.take()
    n, u = int(C[rank, rank]), int(U[rank, rank])
    N, M_in, rows_out, rows_in = int(C[rank].sum()), int(C[:, rank].sum()), int(U[rank].sum()), int(U[:, rank].sum())
    assert c["a2a_sent_tokens"] == rows_out - u, (c, rows_out, u)
    expected = 16 * (world - 1) + 2 * ((rows_out - u) + (rows_in - u)) * D * 4 + (N - n) * (8 + 4) + (M_in - n) * 4
    assert c["a2a_sent_bytes"] == expected, (c, expected)
    assert c["local_fraction"] == n / N
    assert abs(c["ranks_per_token"] - float(reach[rank].double().mean())) < 1e-12
    assert c["max_ranks_per_token"] == float(reach[rank].max())
    assert c["a2a_s"] > 0 and c["expert_s"] > 0
    assert layer.expert_parallel.counters.take()["a2a_sent_bytes"] == 0  # take starts a fresh count
    print("ok", rank)
    dist.destroy_process_group()
    """
)


@pytest.mark.parametrize("nproc, max_ranks", [(2, None), (4, None), (2, 1), (4, 2)])
def test_communication_counters_equal_the_counts_derived_from_the_routing(tmp_path, nproc, max_ranks):
    script = tmp_path / "counters.py"
    script.write_text(COUNTER_CHECK)
    ran = _torchrun(nproc, script, repr(max_ranks))
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.count("ok") == nproc
