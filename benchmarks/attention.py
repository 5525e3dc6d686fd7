"""Attention kinds vs dense SDPA: forward+backward time, peak memory, speedup and ideal speedup.

    python benchmarks/attention.py                       # n in 1024 4096 8192 16384, causal
    python benchmarks/attention.py --sizes 4096 --kinds local moba --repeats 5
    python benchmarks/attention.py --bidirectional --json out.json
    python benchmarks/attention.py --quality                 # train the presets with each kind
    python benchmarks/attention.py --device cuda --dtype bf16 --sizes 16384 131072   # on a GPU

Batch 1, 8 heads, head dim 64, fp32, the attention operation alone (q, k, v given; projections
excluded) by default; ``--device cuda --dtype bf16`` times the same on a GPU, where the kinds with
``attention.backend`` run on FlexAttention (``--backend`` forces one) and peak memory is CUDA's
allocator peak.

Each round times dense SDPA and then every kind, fwd+bwd, in the same process; the
reported speedup is the median over rounds of the paired ratio dense / kind (timing on a shared
machine is noisy). The ideal speedup is dense FLOPs / the kind's FLOPs, counting only the (query,
key) pairs the kind's definition allows (for learned kinds: the pairs of the routes it chose).
Peak memory is the growth of peak RSS during one fwd+bwd (Linux /proc), inputs excluded, measured
in a child process whose allocator unmaps every freed tensor (so RSS follows live tensors). ``kmeans-loop`` is a straightforward per-group implementation, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from common import write_json

from routelab import ModelConfig
from routelab.attention import build_attention

H, HD = 8, 64
BACKEND_KINDS = (
    "local",
    "strided",
    "fixed",
    "longformer",
    "bigbird",
    "kmeans",
    "moba",
    "block_topp",
)  # attention.backend
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Setup:
    """Where and how the kinds run: device, dtype, attention backend (None = the kind's default)."""

    def __init__(self, device: str = "cpu", dtype: str = "fp32", backend: str | None = None) -> None:
        self.device, self.dtype, self.backend = torch.device(device), DTYPES[dtype], backend
        self.dtype_name = dtype

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


CPU = Setup()


def kind_configs(n: int) -> dict[str, dict]:
    """The configuration benchmarked for each kind (fixed across n unless stated)."""
    return {
        "local": dict(kind="local", window=256, block_size=128),
        "strided": dict(kind="strided", stride=128, window=128, block_size=128),
        "fixed": dict(kind="fixed", stride=128, summary=8),
        "longformer": dict(kind="longformer", window=256, global_tokens=[0], block_size=128),
        "bigbird": dict(kind="bigbird", block_size=64, window_blocks=3, num_global_blocks=2, num_random_blocks=3),
        "synthesizer": dict(kind="synthesizer"),
        "kmeans": dict(kind="kmeans", num_clusters=max(n // 256, 1)),  # groups of ~256 tokens
        "moba": dict(kind="moba", block_size=128, top_k=3),
        "block_topp": dict(kind="block_topp", block_size=128, top_p=0.9, max_blocks=3),
    }


def build(attention: dict, n: int, causal: bool, setup: Setup = CPU):
    if setup.backend and attention["kind"] in BACKEND_KINDS:
        attention = dict(attention, backend=setup.backend)
    cfg = ModelConfig(
        vocab_size=2,
        d_model=H * HD,
        n_heads=H,
        max_seq_len=n,
        causal=causal,
        head="lm" if causal else "classification",
        num_labels=None if causal else 2,
        positions="none",
        attention=attention,
    )
    return build_attention(cfg, layer_idx=0).to(setup.device, setup.dtype)


# ----------------------------------------------------------------------------------------------
# the functions timed: (q, k, v) -> (out, routes or None)


def runner(name: str, n: int, causal: bool, setup: Setup = CPU):
    """The timed function of a kind; ``fn.attn`` is its module (None for dense SDPA)."""
    fn = _runner(name, n, causal, setup)
    fn.attn = getattr(fn, "attn", None)
    return fn


def _runner(name: str, n: int, causal: bool, setup: Setup):
    if name == "dense":
        return lambda q, k, v: (F.scaled_dot_product_attention(q, k, v, is_causal=causal), None)
    if name == "kmeans-loop":
        attn = build(kind_configs(n)["kmeans"], n, causal, setup).eval()
        return lambda q, k, v: kmeans_loop(attn, q, v)
    attn = build(kind_configs(n)[name], n, causal, setup).eval()
    if name == "synthesizer":
        x = torch.randn(
            1, n, H * HD, device=setup.device, dtype=setup.dtype, requires_grad=True
        )  # the synthesizer routes from x, not q . k

        def synth(q, k, v):
            out, routes = attn(x, return_routes=True)
            return out.view(1, n, H, HD).transpose(1, 2), routes

        return synth
    if name == "kmeans":
        fn = lambda q, k, v: attn._full(q, q, v, None)  # noqa: E731  (shared QK: q routes and is the key)
    elif name in ("moba", "block_topp"):
        fn = lambda q, k, v: attn.attend_routes(q, k, v, None, None)  # noqa: E731
    else:
        fn = lambda q, k, v: (attn.attend(q, k, v, None, 0), None)  # noqa: E731
    fn.attn = attn
    return fn


def kmeans_loop(attn, q, v):
    """The straightforward version: for every (batch, head, group) a gather and an SDPA call, then
    one scatter of all group outputs. Same groups and results as ``kmeans``."""
    _, routes = attn._full(q.detach(), q.detach(), v.detach(), None)
    B, Hh, T, hd = q.shape
    index, outs = [], []
    for b in range(B):
        for h in range(Hh):
            g, qh, vh = routes.groups[b, h], q[b, h], v[b, h]  # (T,), (T, hd), (T, hd)
            for gid in torch.unique(g[g >= 0]).tolist():
                idx = (g == gid).nonzero().squeeze(1)  # positions of the group, in order
                qi = qh[idx][None]
                outs.append(F.scaled_dot_product_attention(qi, qi, vh[idx][None], is_causal=attn.causal)[0])
                index.append((torch.full_like(idx, b), torch.full_like(idx, h), idx))
    bi, hi, ti = (torch.cat(x) for x in zip(*index))
    return q.new_zeros(B, Hh, T, hd).index_put((bi, hi, ti), torch.cat(outs)), routes


# ----------------------------------------------------------------------------------------------
# allowed (query, key) pairs per head


def allowed_pairs(name: str, n: int, causal: bool, routes, setup: Setup = CPU) -> float:
    if name in ("dense", "synthesizer"):
        return n * (n + 1) / 2 if causal else n * n
    if name in ("kmeans", "kmeans-loop"):
        g = routes.groups.flatten(0, 1)  # (BH, T)
        sizes = torch.zeros(g.shape[0], n + 1, device=g.device).scatter_add_(
            1, torch.where(g >= 0, g, n), torch.ones_like(g, dtype=torch.float)
        )[:, :n]
        per = (sizes * (sizes + 1) / 2).sum(-1) if causal else (sizes**2).sum(-1)
        return float(per.mean())
    if name in ("moba", "block_topp"):
        b = routes.block_size
        chosen = (routes.blocks >= 0).sum(-1).double()  # (B, H, nqb)
        own = b * (b + 1) / 2 if causal else b * b
        return float((chosen * b * b + own).sum(-1).mean())
    attn = build(kind_configs(n)[name], n, causal, setup)
    pos = torch.arange(n, device=setup.device)
    total = 0.0
    step = 256
    for a in range(0, n, step):  # the kind's own definition, evaluated in row chunks
        m = attn.allow(pos[a : a + step, None], pos[None, :])
        total += float(m.sum()) / (m.shape[0] if m.dim() == 3 else 1)
    return total


# ----------------------------------------------------------------------------------------------
# measurement


def fwd_bwd(fn, q, k, v, g, setup: Setup = CPU) -> tuple[float, object]:
    setup.sync()
    t0 = time.perf_counter()
    out, routes = fn(q, k, v)
    out.backward(g)
    setup.sync()
    dt = time.perf_counter() - t0
    for t in (q, k, v):
        t.grad = None
    return dt, routes


def _status() -> dict:
    d = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                key, val = line.split(":")
                d[key] = int(val.split()[0]) / 1024
    return d


def peak_mb(fn, q, k, v, g) -> float | None:
    """Growth of peak RSS over one fwd+bwd (MB), or None where /proc cannot reset the peak.

    Meaningful in a process whose allocator returns freed memory to the OS (see ``memory_table``).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _status()["VmRSS"]
    fwd_bwd(fn, q, k, v, g)
    return _status()["VmHWM"] - base


def memory_table(n: int, kinds: list[str], causal: bool, limit_gb: float) -> dict[str, float | None]:
    """Peak memory per kind, measured in a child process with MALLOC_MMAP_THRESHOLD_=64 KiB, so
    that every tensor is mapped on allocation and unmapped on free: RSS then tracks live tensors."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--memory-only", str(n), "--kinds", *kinds, "--synthesizer-gb", str(limit_gb)]
    cmd += ["--threads", str(torch.get_num_threads())] + ([] if causal else ["--bidirectional"])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        return {}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_only(n: int, kinds: list[str], causal: bool, limit_gb: float) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, n, HD, requires_grad=True) for _ in range(3))
    g = torch.randn(1, H, n, HD)
    peaks = {}
    for name in ["dense", *kinds]:
        if name == "synthesizer" and not synthesizer_fits(n, limit_gb):
            continue
        fn = runner(name, n, causal)
        fwd_bwd(fn, q, k, v, g)  # plans and caches exist before the measured call
        peaks[name] = peak_mb(fn, q, k, v, g)
    print(json.dumps(peaks))


def synthesizer_fits(n: int, limit_gb: float) -> bool:
    # W2 (d_model x H*n) plus logits, probabilities and their grads, (H, n, n) each
    return (H * HD * H * n + 4 * H * n * n) * 4 / 1e9 < limit_gb


def cuda_peaks(fns: dict, q, k, v, g, setup: Setup) -> dict[str, float]:
    """Growth of CUDA's allocator peak over one fwd+bwd per kind (MB), inputs excluded."""
    peaks = {}
    for name, fn in fns.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(fn, q, k, v, g, setup)
        peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return peaks


def bench_size(n: int, kinds: list[str], causal: bool, repeats: int, limit_gb: float, setup: Setup = CPU) -> list[dict]:
    torch.manual_seed(0)
    like = dict(device=setup.device, dtype=setup.dtype)
    q, k, v = (torch.randn(1, H, n, HD, **like, requires_grad=True) for _ in range(3))
    g = torch.randn(1, H, n, HD, **like)
    kinds = [x for x in kinds if x != "synthesizer" or synthesizer_fits(n, limit_gb)]
    fns = {name: runner(name, n, causal, setup) for name in ["dense", *kinds]}
    routes = {}
    for name, fn in fns.items():  # warm up: plans, compiles, first touch of memory
        routes[name] = fwd_bwd(fn, q, k, v, g, setup)[1]
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():  # dense first in every round: paired ratios
            times[name].append(fwd_bwd(fn, q, k, v, g, setup)[0])
    dense_pairs = allowed_pairs("dense", n, causal, None)
    if setup.cuda:
        peaks = cuda_peaks(fns, q, k, v, g, setup)
    else:
        peaks = memory_table(n, [x for x in fns if x != "dense"], causal, limit_gb)
    rows = []
    for name in fns:
        ratios = [d / t for d, t in zip(times["dense"], times[name])]
        ideal = dense_pairs / allowed_pairs(name, n, causal, routes[name], setup)
        row = dict(
            n=n,
            kind=name,
            device=setup.device.type,
            dtype=setup.dtype_name,
            backend=backend_of(fns[name]) if name != "dense" else "sdpa",
            ms=1000 * statistics.median(times[name]),
            dense_ms=1000 * statistics.median(times["dense"]),
            speedup=statistics.median(ratios),
            ideal=ideal,
            peak_mb=peaks.get(name),
        )
        if routes[name] is not None and getattr(routes[name], "stats", None):
            row["stats"] = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in routes[name].stats.items()}
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def backend_of(fn) -> str:
    """The backend a kind's training step ran on (a failed flex fell back to the engine)."""
    attn = fn.attn
    if attn is None or not hasattr(attn.cfg, "backend"):
        return "engine"
    if attn.__dict__.get("_flex_failed", False):
        return "engine (flex failed)"
    import routelab.attention.flex as flex

    probe = torch.empty(0, device=next(attn.parameters()).device)
    with torch.enable_grad():
        return flex.choose_backend(attn.cfg, probe, None, 0.0)


def format_row(r: dict) -> str:
    pct = 100 * r["speedup"] / r["ideal"]
    mem = f"{r['peak_mb']:8.0f}" if r["peak_mb"] is not None else "     n/a"
    extra = f"  {r['stats']}" if r.get("stats") else ""
    return (
        f"{r['n']:6d}  {r['kind']:12s} {r['ms']:9.1f} {r['dense_ms']:9.1f} {r['speedup']:8.2f}x "
        f"{r['ideal']:8.2f}x {pct:6.0f}% {mem}{extra}"
    )


# ----------------------------------------------------------------------------------------------
# quality: the presets trained with each kind

LISTOPS_KINDS = {  # sequences of 20..120 tokens
    "dense": dict(kind="dense"),
    "local": dict(kind="local", window=16, block_size=16),
    "longformer": dict(kind="longformer", window=16, global_tokens=[0], block_size=16),
    "bigbird": dict(kind="bigbird", block_size=16, window_blocks=3, num_global_blocks=1, num_random_blocks=2),
    "synthesizer": dict(kind="synthesizer"),
    "kmeans": dict(kind="kmeans", num_clusters=4),
    "moba": dict(kind="moba", block_size=16, top_k=2),
}
LM_KINDS = {  # windows of 256 bytes
    "dense": dict(kind="dense"),
    "local": dict(kind="local", window=64, block_size=64),
    "strided": dict(kind="strided", stride=32, window=32, block_size=32),
    "fixed": dict(kind="fixed", stride=64, summary=8),
    "longformer": dict(kind="longformer", window=64, global_tokens=[0], block_size=64),
    "bigbird": dict(kind="bigbird", block_size=32, window_blocks=3, num_global_blocks=1, num_random_blocks=2),
    "synthesizer": dict(kind="synthesizer"),
    "kmeans": dict(kind="kmeans", num_clusters=4, local_heads=2, window=64),
    "moba": dict(kind="moba", block_size=32, top_k=3),
    "block_topp": dict(kind="block_topp", block_size=32, top_p=0.9, max_blocks=4),
}


def route_stats(run_dir, cfg, batches: int = 4) -> dict:
    """Mean routing statistics of the trained model's attention layers on validation batches."""
    from routelab.train import load_run

    run = load_run(run_dir, with_data=True)
    model = run.model.eval()
    stats: dict[str, list[float]] = {}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(batches):
            if cfg.data.task == "lm":
                from routelab.data import sample_lm_batch

                ids, pad = sample_lm_batch(run.data.val, 8, cfg.data.seq_len, g), None
            else:
                from routelab.data import collate_classification

                rows = [run.data.val[i] for i in torch.randint(len(run.data.val), (8,), generator=g).tolist()]
                batch = collate_classification(rows, run.data.tokenizer, cfg.data.seq_len, cfg.data.truncate)
                ids, pad = batch["input_ids"], batch["attention_mask"] == 0
                pad = pad if bool(pad.any()) else None
            x = model.tok_emb(ids)
            if model.pos_emb is not None:
                x = x + model.pos_emb(torch.arange(ids.shape[1]))
            for layer in model.layers:
                x, _, routes = layer(x, padding_mask=pad, return_routes=True)
                for key, val in (getattr(routes, "stats", None) or {}).items():
                    stats.setdefault(key, []).append(float(val))
    return {k: sum(v) / len(v) for k, v in stats.items()}


def quality(out_root: str, lm_steps: int, listops_steps: int, only: list[str] | None) -> list[dict]:
    from routelab.config import Config
    from routelab.presets import resolve_config_path
    from routelab.train import train

    rows = []
    tasks = [("listops-tiny", LISTOPS_KINDS, listops_steps), ("lm-tiny", LM_KINDS, lm_steps)]
    print(
        f"{'preset':13s} {'kind':12s} {'steps':>5s} {'val acc':>8s} {'val loss':>8s} {'val bpb':>8s} {'tok/s':>8s}  routes"
    )
    for preset, kinds, steps in tasks:
        for name, attention in kinds.items():
            if only and name not in only:
                continue
            sets = [
                f"train.steps={steps}",
                "train.progress=false",
                "train.threads=1",  # one thread: fast and steady for tiny models on a shared machine
                "train.eval_every=0",
                "train.checkpoint_every=0",
                f"train.warmup_steps={max(steps // 10, 1)}",
            ]
            cfg = Config.load(resolve_config_path(preset), sets)
            data = cfg.to_dict()
            data["model"]["attention"] = attention
            cfg = Config.from_dict(data)
            out = os.path.join(out_root, f"{preset}-{name}")
            if os.path.isdir(out):
                import shutil

                shutil.rmtree(out)
            summary = train(cfg, out)
            extra = route_stats(out, cfg) if name in ("moba", "block_topp", "kmeans") else {}
            row = dict(
                preset=preset,
                kind=name,
                steps=steps,
                **{k: summary.get(k) for k in ("val_accuracy", "val_loss", "val_bpb", "tokens_per_s")},
                routes=extra,
            )
            rows.append(row)
            fmt = lambda x: f"{x:8.4f}" if isinstance(x, float) else f"{'':8s}"  # noqa: E731
            print(
                f"{preset:13s} {name:12s} {steps:5d} {fmt(row['val_accuracy'])} {fmt(row['val_loss'])} "
                f"{fmt(row['val_bpb'])} {row['tokens_per_s']:8.0f}  {extra or ''}",
                flush=True,
            )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    p.add_argument("--kinds", nargs="+", default=[*kind_configs(1), "kmeans-loop"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bidirectional", action="store_true", help="encoder attention (default: causal)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (on cuda: FlexAttention for the kinds that have it)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--backend", default=None, choices=["auto", "engine", "flex", "dense"], help="force a backend")
    p.add_argument("--synthesizer-gb", type=float, default=4.0, help="skip synthesizer sizes needing more")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--memory-only", type=int, default=None, help=argparse.SUPPRESS)  # child of memory_table
    p.add_argument("--quality", action="store_true", help="train the presets with each kind instead")
    p.add_argument("--lm-steps", type=int, default=250)
    p.add_argument("--listops-steps", type=int, default=400)
    p.add_argument("--out", default="runs/attention-quality", help="run folders of --quality")
    args = p.parse_args(argv)
    if args.quality:
        only = args.kinds if "--kinds" in (argv or sys.argv) else None
        rows = quality(args.out, args.lm_steps, args.listops_steps, only)
        if args.json:
            write_json(args.json, rows)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    causal = not args.bidirectional
    if args.memory_only:
        _memory_only(args.memory_only, args.kinds, causal, args.synthesizer_gb)
        return 0
    setup = Setup(args.device, args.dtype, args.backend)
    where = torch.cuda.get_device_name(setup.device) if setup.cuda else f"{torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__}, {where}, batch 1, {H} heads, head dim {HD}, "
        f"{'causal' if causal else 'bidirectional'}, {args.dtype}, fwd+bwd, median of {args.repeats} paired rounds"
    )
    print(
        f"{'n':>6s}  {'kind':12s} {'ms':>9s} {'dense ms':>9s} {'speedup':>9s} {'ideal':>9s} {'of ideal':>7s} {'peak MB':>8s}"
    )
    rows = []
    for n in args.sizes:
        kinds = [k for k in args.kinds if not (k == "kmeans-loop" and n > 16384)]
        rows += bench_size(n, kinds, causal, args.repeats, args.synthesizer_gb, setup)
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
