"""Peak memory per process of a 2-process run, ``train.data_parallel`` ddp vs fsdp.

A model whose dense weights dominate (d_model 512, 4 blocks, dense GELU FFN, about 12.6 M
parameters in the blocks; seq_len 64, global batch 8) trains a few steps on a small synthetic
corpus in 2 processes (gloo on loopback), then checkpoints and exports as every run does. Each process reports
its peak resident set size (``getrusage``'s ``ru_maxrss``): under DDP each holds all the weights,
their gradients and AdamW's two moments; under FSDP (``routelab.train.fsdp``) each holds half of
them, and rank 0 gathers the whole state for the checkpoint and the final export.

Each mode runs three times: with glibc's default allocator settings, under which the CPU
all-gathers' short-lived buffers (allocated and freed per block and step) stay in the heap and push
FSDP's peak up; with ``MALLOC_MMAP_THRESHOLD_=65536``, under which buffers over 64 KiB are mapped and
handed back to the system when freed; and with the setting ``routelab train`` chooses
(``routelab.threads.KEEP_FREED_MEMORY``: nothing mapped, freed memory kept).

    python benchmarks/fsdp_memory.py [--steps 4] [--out benchmarks/results/fsdp_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"d_model": 512, "n_layers": 4, "n_heads": 8, "max_seq_len": 64, "dropout": 0.0}


def child(cfg_path: str, out: str, mode: str) -> None:
    """One process of the run (started by torchrun): train, then write this rank's peak RSS."""
    from routelab.config import Config
    from routelab.train import train

    train(Config.load(cfg_path, [f"train.data_parallel={mode}"]), out)
    rank = os.environ["RANK"]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    (Path(out) / f"peak_rss_rank{rank}.json").write_text(json.dumps({"rank": int(rank), "peak_rss_mib": peak_mib}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.txt"
        corpus.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(2000)))
        cfg = {"model": MODEL, "data": {"source": str(corpus), "seq_len": 64, "val_fraction": 0.1},
               "train": {"steps": args.steps, "batch_size": 8, "warmup_steps": 1, "eval_every": 0, "eval_batches": 2,
                         "checkpoint_every": 0, "progress": False, "device": "cpu", "threads": 1}}
        cfg_path = tmp / "cfg.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        sys.path.insert(0, str(ROOT))
        from routelab.threads import ALLOCATOR_VAR, KEEP_FREED_MEMORY

        settings = {  # name -> environment
            "glibc defaults": {},
            "MALLOC_MMAP_THRESHOLD_=65536": {"MALLOC_MMAP_THRESHOLD_": "65536"},
            "routelab train's (keep freed memory)": {ALLOCATOR_VAR: KEEP_FREED_MEMORY},
        }
        base = {k: v for k, v in os.environ.items() if k not in (ALLOCATOR_VAR, "MALLOC_MMAP_THRESHOLD_")}
        for i, (malloc, mode) in enumerate([(m, d) for m in settings for d in ("ddp", "fsdp")]):
            env = {**base, **settings[malloc], "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
            out = tmp / f"run{i}"
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            __file__, "--child", str(cfg_path), str(out), mode], check=True, env=env, capture_output=True)
            ranks = [json.loads((out / f"peak_rss_rank{r}.json").read_text())["peak_rss_mib"] for r in (0, 1)]
            params = json.loads((out / "summary.json").read_text())["num_parameters"]
            results[f"{mode}, {malloc}"] = {"peak_rss_mib": ranks, "num_parameters": params}
            print(f"{malloc:38s} {mode:5s} peak RSS rank 0 {ranks[0]:7.1f} MiB, rank 1 {ranks[1]:7.1f} MiB ({params / 1e6:.1f} M parameters)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main()
