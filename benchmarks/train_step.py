"""Training throughput and peak memory of the tiny presets: the baseline later routed models beat.

For each preset, in its own subprocess (so peak RSS belongs to that preset alone): build the model
from the preset, draw real batches from its data, warm up, then time full optimizer steps
(forward + backward + AdamW). Prints a table and writes JSON.

    python benchmarks/train_step.py [--presets lm-tiny listops-tiny] [--steps 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import write_json

ROOT = Path(__file__).resolve().parent.parent


def measure(preset: str, steps: int, warmup: int) -> dict:
    import torch

    from routelab import RoutedTransformer
    from routelab.config import Config
    from routelab.presets import resolve_config_path
    from routelab.train.run import load_task_data, resolve_config
    from routelab.train.trainer import micro_batch  # the same batches the trainer draws

    cfg = Config.load(resolve_config_path(preset), ["data.max_bytes=2000000"] if "lm" in preset else [])
    torch.manual_seed(0)
    data = load_task_data(cfg, None)
    cfg = resolve_config(cfg, data)
    model = RoutedTransformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    times, tokens = [], []
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    perms: dict = {}
    for step in range(warmup + steps):
        batch = micro_batch(cfg, data, step + 1, 0, perms)
        t0 = time.perf_counter()
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if step >= warmup:
            times.append(dt)
            tokens.append(int(batch["input_ids"].numel()))
    med = statistics.median(times)
    return {
        "preset": preset,
        "parameters": model.num_parameters(),
        "batch_shape": list(batch["input_ids"].shape),
        "step_time_median_s": med,
        "tokens_per_s": statistics.median(tokens) / med,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_training_mb": rss_before / 1024,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["lm-tiny", "listops-tiny"])
    p.add_argument("--steps", type=int, default=20, help="timed steps per preset")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.warmup)))
        return
    results = []
    for preset in args.presets:
        cmd = [sys.executable, __file__, "--child", preset, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"{preset} failed:\n{proc.stderr}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'preset':<14}{'params':>10}{'batch':>12}{'step ms':>10}{'tokens/s':>11}{'peak MB':>9}")
    for r in results:
        shape = "x".join(map(str, r["batch_shape"]))
        print(
            f"{r['preset']:<14}{r['parameters']:>10,}{shape:>12}{1000 * r['step_time_median_s']:>10.1f}"
            f"{r['tokens_per_s']:>11,.0f}{r['peak_rss_mb']:>9.0f}"
        )
    write_json(args.out, results)


if __name__ == "__main__":
    main()
