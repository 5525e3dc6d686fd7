"""Mixed-precision quality: the demo comparison's dense and top-2 variants trained in fp32 and in
bf16 (``train.precision``) for the same steps, on the same batches; the goal is a bf16 validation
loss within 1% of fp32's. Also reports each run's speed relative to its fp32 twin, measured in the
same invocation (on a CPU without bf16 matrix units bf16 is slower: the point here is quality; the
speed goals are the GPU's, ``scripts/gpu_check.sh``).

    python benchmarks/precision.py                       # dense and top2, fp32 vs bf16, 200 steps (~6 min, 2 cores)
    python benchmarks/precision.py --precisions fp32 bf16 fp16 --steps 50 --variants top2

Runs go to a temporary folder (``--keep DIR`` to keep them); ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from common import write_json

from routelab.compare import load_compare_config
from routelab.train import train

GOAL = 0.01  # |bf16 val loss / fp32 val loss - 1| <= 1%


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="compare-lm", help="comparison config whose variants are trained (default: the demo's)")
    p.add_argument("--variants", nargs="+", default=["dense", "top2"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=None, help="override the comparison's step budget")
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep", type=Path, default=None, help="keep the runs in this folder")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if "fp32" not in args.precisions:
        p.error("--precisions must include fp32 (the baseline of every ratio)")
    logging.basicConfig(level=logging.WARNING)
    _, configs = load_compare_config(args.config, budget={"steps": args.steps} if args.steps else None)
    missing = [v for v in args.variants if v not in configs]
    if missing:
        p.error(f"unknown variant(s) {missing}; {args.config} has {sorted(k for k in configs if '/' not in k)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for name in args.variants:
            base = None
            for precision in args.precisions:
                cfg = configs[name]
                cfg.train.precision, cfg.train.device, cfg.train.progress = precision, args.device, False
                summary = train(cfg, root / f"{name}-{precision}")
                row = {"variant": name, "precision": precision, "steps": summary["steps"], "val_loss": summary["val_loss"],
                       "tokens_per_s": summary["tokens_per_s"]}
                if precision == "fp32":
                    base = row
                row["loss_ratio"] = row["val_loss"] / base["val_loss"] if base else None
                row["speed_ratio"] = row["tokens_per_s"] / base["tokens_per_s"] if base else None
                row["within_goal"] = abs(row["loss_ratio"] - 1) <= GOAL if base else None
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n| variant | precision | steps | val loss | / fp32 | tok/s | speed / fp32 | within {GOAL:.0%} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['precision']} | {r['steps']} | {r['val_loss']:.4f} | {r['loss_ratio']:.4f} | "
              f"{r['tokens_per_s']:,.0f} | {r['speed_ratio']:.2f}x | {'yes' if r['within_goal'] else 'NO'} |")
    if args.json:
        write_json(args.json, rows)
    return 0 if all(r["within_goal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
