"""Training: the loop, checkpoints, the LR schedule, metrics logging, evaluation and run folders.

    from routelab.train import train, evaluate, load_run
    summary = train(cfg, "runs/lm-tiny")                 # fresh run
    summary = train(cfg, "runs/lm-tiny", resume=True)    # continue from the newest checkpoint
    cfg, model, tokenizer, data = load_run("runs/lm-tiny", with_data=True)
    evaluate(model, data, cfg, split="val", max_batches=0)
"""

from routelab.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from routelab.train.evaluation import bits_per_byte, evaluate
from routelab.train.metrics import read_metrics
from routelab.train.optim import build_optimizer, param_groups
from routelab.train.run import LoadedRun, RunError, load_run
from routelab.train.schedule import lr_at
from routelab.train.trainer import train

__all__ = [
    "LoadedRun",
    "RunError",
    "bits_per_byte",
    "build_optimizer",
    "evaluate",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_run",
    "lr_at",
    "param_groups",
    "read_metrics",
    "save_checkpoint",
    "train",
]
