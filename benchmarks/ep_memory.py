"""Peak resident memory of each process, training the same model on the same global batch in one
process and with its experts spread over P processes (``train.expert_parallel``): each process
builds, loads and trains only its E / P experts (parameters, gradients, AdamW moments), so its peak
falls with P. Default model: 2 layers, d_model 256, 32 SwiGLU experts of width 1024, 6 steps.

    python benchmarks/ep_memory.py [--procs 1 2] [--steps 6]

Prints one line per process count: the peak RSS (MB) of each process (``ru_maxrss``)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"d_model": 256, "n_layers": 2, "n_heads": 4, "max_seq_len": 64, "dropout": 0.0,
         "ffn": {"kind": "moe", "num_experts": 32, "hidden": 1024, "activation": "swiglu",
                 "router": {"kind": "topk", "top_k": 2}}}


def worker(config: str, out: str, ep: int) -> None:
    from routelab.config import Config
    from routelab.train import train

    train(Config.load(config, [f"train.expert_parallel={ep}"]), out)
    rank = int(os.environ.get("RANK", "0"))
    print(json.dumps({"rank": rank, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def measure(procs: int, steps: int, tmp: Path) -> list[float]:
    corpus = tmp / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)))
    cfg = {"model": MODEL, "data": {"source": str(corpus), "seq_len": 64, "val_fraction": 0.1},
           "train": {"steps": steps, "batch_size": 8, "warmup_steps": 1, "eval_every": 0, "log_every": 1,
                     "checkpoint_every": 0, "progress": False, "device": "cpu", "threads": 1}}
    config = tmp / f"cfg{procs}.json"
    config.write_text(json.dumps(cfg))
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)] if procs > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ran = subprocess.run([sys.executable, *launch, __file__, "--worker", str(config), str(tmp / f"run{procs}"), str(procs)],
                         capture_output=True, text=True, env=env)
    if ran.returncode:
        sys.exit(f"ep_memory: the {procs}-process run failed:\n{ran.stderr[-2000:]}")
    rows = [json.loads(line) for line in ran.stdout.splitlines() if line.startswith("{")]
    return [r["peak_rss_mb"] for r in sorted(rows, key=lambda r: r["rank"])]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for procs in args.procs:
            peaks = measure(procs, args.steps, Path(tmp))
            print(f"{procs} process(es), expert_parallel={procs}: peak RSS per process " + ", ".join(f"{m:,.0f} MB" for m in peaks))


if __name__ == "__main__":
    main()
