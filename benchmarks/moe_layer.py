"""MoE layer speed and memory against a dense FFN with the same *active* FLOPs.

Forward + backward (loss = output.sum(), gradients for x and all parameters), fp32, T = 8192
tokens, d_model 512. The dense reference has hidden K * H (K active experts of width H), so both
do the same expert matmul FLOPs; the MoE also pays for its router, sort, gather and combine.
Baseline and candidate run interleaved in one process after a warm-up; the ratio reported is
the median of the per-pair ratios (timing on shared machines drifts; pairs cancel the drift).
Peak memory: each (case, implementation) runs one step in a fresh subprocess (Linux); we report
the peak RSS growth (VmHWM) over the RSS before that step. Per step of the timed loop, also the minor
page faults and the system CPU time (``getrusage``): fresh pages the kernel had to zero.
The script runs under the process settings ``routelab train`` chooses (OpenMP's wait, glibc's
allocator; ``routelab.threads``), re-executing itself once to set them; ``--os-env`` keeps yours.

    python benchmarks/moe_layer.py [--reps 7] [--cases e8-top1 e64-top2 ...] [--activations relu swiglu]
        [--compare]  # also time the alternatives we measured before settling on the fused path
        [--threads N] [--no-memory] [--out FILE]
    python benchmarks/moe_layer.py --profile --cases e64-top2 --activations swiglu
        # where the time goes: one thread, torch.profiler, per op group, dense beside the MoE
    python benchmarks/moe_layer.py --device cuda --dtype bf16 --cases e64-top2 e128-top4 e256-top8

On ``--device cuda`` the modules and tokens are cast to ``--dtype`` (default fp32), the shipped
layer dispatches through ``torch._grouped_mm`` and peak memory is CUDA's allocator peak growth.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import training_env, write_json
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from routelab.moe import MoE  # noqa: E402
from routelab.moe.dispatch import plan_dispatch  # noqa: E402

T, D = 8192, 512
CASES = {  # name: (experts E, expert hidden H, active K)
    "e8-top1": (8, 1024, 1),
    "e8-top2": (8, 1024, 2),
    "e64-top2": (64, 256, 2),
    "e128-top4": (128, 128, 4),
    "e256-top8": (256, 64, 8),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GOALS = {"e8-top1": 1.05, "e8-top2": 1.05, "e64-top2": 1.15}


class Dense(nn.Module):
    """The reference: one FFN of width K * H (nn.Linear, biases on, like routelab's DenseFFN)."""

    def __init__(self, hidden: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.w_in = nn.Linear(D, hidden)
        self.w_gate = nn.Linear(D, hidden, bias=False) if activation == "swiglu" else None
        self.w_out = nn.Linear(hidden, D)

    def forward(self, x):
        h = self.w_in(x)
        h = F.silu(self.w_gate(x)) * h if self.activation == "swiglu" else F.relu(h)
        return self.w_out(h)


# -- alternatives measured on the way (not in the library) ---------------------------------------


def _route(moe, x):
    r = moe.router(x)
    return r, plan_dispatch(r.expert_idx, r.active, moe.num_experts)


def _act(ex, xs_e, e, w_in, w_gate, b_in):
    h = xs_e @ w_in[e] + b_in[e]
    return F.silu(xs_e @ w_gate[e]) * h if ex.activation == "swiglu" else F.relu(h)


def alt_autograd_loop(moe, x):
    """Sort, then one matmul per expert slice under autograd (split + unbind), index_add combine."""
    ex = moe.experts
    r, plan = _route(moe, x)
    xs = x.index_select(0, plan.token)
    w_in, w_out, b_in, b_out = ex.w_in.unbind(0), ex.w_out.unbind(0), ex.b_in.unbind(0), ex.b_out.unbind(0)
    w_gate = ex.w_gate.unbind(0) if ex.w_gate is not None else None
    outs = [
        _act(ex, part, e, w_in, w_gate, b_in) @ w_out[e] + b_out[e]
        for e, part in enumerate(xs.split(plan.counts))
        if part.shape[0]
    ]
    eo = torch.cat(outs)
    g = r.gates.reshape(-1)[plan.order[: plan.num_pairs]]
    return torch.zeros_like(x).index_add(0, plan.token, eo * g.unsqueeze(1))


def alt_grouped_mm(moe, x):
    """torch._grouped_mm over the sorted buffer (bias added per row), index_add combine."""
    ex = moe.experts
    r, plan = _route(moe, x)
    xs = x.index_select(0, plan.token)
    counts = plan.expert_counts
    offs = torch.cumsum(counts, 0).to(torch.int32)
    h = torch._grouped_mm(xs, ex.w_in, offs=offs) + torch.repeat_interleave(ex.b_in, counts, dim=0)
    if ex.activation == "swiglu":
        h = F.silu(torch._grouped_mm(xs, ex.w_gate, offs=offs)) * h
    else:
        h = F.relu(h)
    eo = torch._grouped_mm(h, ex.w_out, offs=offs) + torch.repeat_interleave(ex.b_out, counts, dim=0)
    g = r.gates.reshape(-1)[plan.order[: plan.num_pairs]]
    return torch.zeros_like(x).index_add(0, plan.token, eo * g.unsqueeze(1))


def alt_padded_bmm(moe, x):
    """Pad every expert's block to the largest count, one bmm per matrix, index_add combine."""
    ex = moe.experts
    E = moe.num_experts
    r, plan = _route(moe, x)
    counts = plan.expert_counts
    C = int(counts.max())
    start = torch.cumsum(counts, 0) - counts
    e_sorted = torch.repeat_interleave(torch.arange(E, device=x.device), counts)
    dest = e_sorted * C + torch.arange(plan.num_pairs, device=x.device) - start[e_sorted]  # row in the (E*C) buffer
    xp = x.new_zeros(E * C, D).index_copy(0, dest, x.index_select(0, plan.token)).view(E, C, D)
    h = torch.baddbmm(ex.b_in.unsqueeze(1), xp, ex.w_in)
    h = F.silu(torch.bmm(xp, ex.w_gate)) * h if ex.activation == "swiglu" else F.relu(h)
    eo = torch.baddbmm(ex.b_out.unsqueeze(1), h, ex.w_out).view(E * C, D).index_select(0, dest)
    g = r.gates.reshape(-1)[plan.order[: plan.num_pairs]]
    return torch.zeros_like(x).index_add(0, plan.token, eo * g.unsqueeze(1))


IMPLS = {
    "dense": lambda m, x: m(x),
    "fused": lambda m, x: m(x).hidden,  # routelab.moe.MoE as shipped
    "autograd_loop": alt_autograd_loop,
    "grouped_mm": alt_grouped_mm,
    "padded_bmm": alt_padded_bmm,
}


def build(case: str, activation: str, impl: str) -> nn.Module:
    E, H, K = CASES[case]
    torch.manual_seed(0)
    if impl == "dense":
        return Dense(K * H, activation)
    router = "switch" if K == 1 else "topk"
    opts = {} if K == 1 else {"top_k": K}
    return MoE(d_model=D, num_experts=E, hidden=H, router=router, activation=activation, **opts)


def _sync(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


KERNEL = {}  # impl -> [minor page faults, system CPU seconds] over its timed steps (this process)


def step(impl: str, module: nn.Module, x: torch.Tensor) -> float:
    _sync(x)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    IMPLS[impl](module, x).sum().backward()
    _sync(x)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    k = KERNEL.setdefault(impl, [0, 0.0])
    k[0] += r1.ru_minflt - r0.ru_minflt
    k[1] += r1.ru_stime - r0.ru_stime
    x.grad = None
    for p in module.parameters():
        p.grad = None
    return dt


def time_case(
    case: str, activation: str, impls: list[str], reps: int, warmup: int, device="cpu", dtype=torch.float32
) -> dict:
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1)).to(device, dtype).requires_grad_(True)
    modules = {impl: build(case, activation, impl).to(device, dtype) for impl in ["dense", *impls]}
    for _ in range(warmup):
        for impl, m in modules.items():
            step(impl, m, x)
    KERNEL.clear()
    times: dict[str, list[float]] = {impl: [] for impl in modules}
    ratios: dict[str, list[float]] = {impl: [] for impl in impls}
    for _ in range(reps):  # interleaved: dense, then each candidate, every repetition
        base = step("dense", modules["dense"], x)
        times["dense"].append(base)
        for impl in impls:
            t = step(impl, modules[impl], x)
            times[impl].append(t)
            ratios[impl].append(t / base)
    return {
        "dense_ms": 1000 * statistics.median(times["dense"]),
        **{f"{impl}_ms": 1000 * statistics.median(times[impl]) for impl in impls},
        **{f"{impl}_ratio": statistics.median(ratios[impl]) for impl in impls},
        **{f"{impl}_faults_per_step": KERNEL[impl][0] / reps for impl in modules},  # minor page faults
        **{f"{impl}_sys_ms_per_step": 1000 * KERNEL[impl][1] / reps for impl in modules},  # kernel time, all threads
    }


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MB (VmHWM: its peak; unlike ru_maxrss it is not
    inherited from the parent across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(case: str, activation: str, impl: str) -> float:
    """Peak RSS growth (MB) of one full-size step, after a 64-token step has initialised the
    libraries (BLAS buffers, thread pools) so that their one-off memory is not counted."""
    m = build(case, activation, impl)
    step(impl, m, torch.randn(64, D).requires_grad_(True))
    x = torch.randn(T, D).requires_grad_(True)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
    except OSError:
        pass  # then the peak may include the warm-up
    before = _status_mb("VmRSS")
    step(impl, m, x)
    return _status_mb("VmHWM") - before


def cuda_peak_memory(case: str, activation: str, impl: str, device, dtype) -> float:
    """Growth of CUDA's allocator peak (MB) over one full-size step, after a warm-up step."""
    m = build(case, activation, impl).to(device, dtype)
    x = torch.randn(T, D, device=device, dtype=dtype).requires_grad_(True)
    step(impl, m, x)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step(impl, m, x)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def peak_memory(case: str, activation: str, impl: str) -> float:
    cmd = [sys.executable, __file__, "--memory-child", case, activation, impl]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"memory child failed:\n{proc.stderr}")
    return float(proc.stdout.strip().splitlines()[-1])


# op name prefix -> group, for --profile (first match wins; the rest is "other")
OP_GROUPS = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::addmm_", "aten::addmv", "aten::bmm", "aten::_grouped_mm")),
    ("gather/combine", ("aten::index_select", "aten::_embedding_bag", "aten::embedding_bag", "aten::index")),
    ("routing", ("aten::topk", "aten::sort", "aten::argsort", "aten::bincount", "aten::_softmax", "aten::scatter")),
    ("elementwise", ("aten::mul", "aten::silu", "aten::add", "aten::gelu", "aten::relu", "aten::threshold")),
    ("reductions", ("aten::sum", "aten::linalg_vecdot", "aten::mean")),
    ("copies/fills", ("aten::copy_", "aten::fill_", "aten::zero_", "aten::zeros")),
)


def op_group(name: str) -> str:
    for group, prefixes in OP_GROUPS:
        if any(name == p or name.startswith(p + "_") or name.startswith(p + ".") for p in prefixes):
            return group
    return "other"


def profile_case(case: str, activation: str, impls: list[str], steps: int = 3) -> dict[str, dict[str, float]]:
    """Self CPU ms per step and op group, one thread (so every op is on this thread and the
    profiler attributes it exactly), for dense and each candidate."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    out = {}
    for impl in ["dense", *impls]:
        m = build(case, activation, impl)
        for _ in range(2):
            step(impl, m, x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step(impl, m, x)
        groups: dict[str, float] = {}
        for ev in prof.key_averages():
            g = op_group(ev.key)
            groups[g] = groups.get(g, 0.0) + ev.self_cpu_time_total / steps / 1000
        out[impl] = groups
    return out


def print_profile(case: str, activation: str, prof: dict[str, dict[str, float]]) -> None:
    groups = [g for g, _ in OP_GROUPS] + ["other"]
    impls = list(prof)
    print(f"{case} {activation}: self CPU ms per step, 1 thread (torch.profiler)")
    print(f"  {'op group':<16}" + "".join(f"{i:>12}" for i in impls) + f"{'extra':>12}")
    for g in [*groups, "total"]:
        row = [sum(p.values()) if g == "total" else p.get(g, 0.0) for p in prof.values()]
        extra = "".join(f"{r - row[0]:+12.0f}" for r in row[1:])
        print(f"  {g:<16}" + "".join(f"{r:12.0f}" for r in row) + extra)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--activations", nargs="+", default=["relu", "swiglu"], choices=["relu", "gelu", "swiglu"])
    p.add_argument("--reps", type=int, default=7, help="timed pairs per case")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compare", action="store_true", help="also time autograd_loop, grouped_mm, padded_bmm")
    p.add_argument("--impls", nargs="+", help="candidates to time (default: fused, or all with --compare)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own, 2 here)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="modules and tokens (default fp32)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "moe_layer.json"))
    p.add_argument("--profile", action="store_true", help="where the time goes: op groups, one thread")
    p.add_argument("--os-env", action="store_true",
                   help="keep the environment's OpenMP and allocator settings (default: routelab train's)")
    p.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        print(memory_child(*args.memory_child))
        return
    env = training_env(not args.os_env)
    if args.profile:
        for case in args.cases:
            for act in args.activations:
                print_profile(case, act, profile_case(case, act, args.impls or ["fused"]))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    impls = args.impls or (["fused", "autograd_loop", "grouped_mm", "padded_bmm"] if args.compare else ["fused"])
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, T={T}, d_model={D}, {args.dtype}, fwd+bwd, load {load}; {env}")
    results = []
    for case in args.cases:
        for act in args.activations:
            r = {
                "case": case,
                "activation": act,
                "device": device.type,
                "dtype": args.dtype,
                **time_case(case, act, impls, args.reps, args.warmup, device, dtype),
            }
            if not args.no_memory:
                for impl in ["dense", *impls]:
                    if device.type == "cuda":
                        r[f"{impl}_peak_mb"] = cuda_peak_memory(case, act, impl, device, dtype)
                    else:
                        r[f"{impl}_peak_mb"] = peak_memory(case, act, impl)
            results.append(r)
            E, H, K = CASES[case]
            cells = "  ".join(f"{impl} {r[f'{impl}_ms']:7.0f} ms {r[f'{impl}_ratio']:5.2f}x" for impl in impls)
            mem = (
                ""
                if args.no_memory
                else "  peak MB " + "/".join(f"{r[f'{impl}_peak_mb']:.0f}" for impl in ["dense", *impls])
            )
            goal = f" (goal <= {GOALS[case]}x)" if case in GOALS else ""
            faults = "/".join(f"{r[f'{impl}_faults_per_step'] / 1000:.1f}k" for impl in ["dense", *impls])
            sys_ms = "/".join(f"{r[f'{impl}_sys_ms_per_step']:.0f}" for impl in ["dense", *impls])
            mem += f"  faults {faults} sys ms {sys_ms}"
            print(
                f"{case:<10}{act:<7} E={E:<4}H={H:<5}K={K}  dense {r['dense_ms']:7.0f} ms  {cells}{mem}{goal}",
                flush=True,
            )
    write_json(args.out, results)


if __name__ == "__main__":
    main()
