"""Tiny data files and configs for the training tests (d_model 32, 2 layers, seq_len 32)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from routelab.config import Config, apply_overrides

TEXT = "the quick brown fox jumps over the lazy dog. " * 120  # ~5.4 KB, very repetitive


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """``tiny.txt`` (LM) and ``cls.jsonl`` (label 0: letters a-m, label 1: letters n-z)."""
    d = tmp_path_factory.mktemp("train_data")
    (d / "tiny.txt").write_text(TEXT)
    rng = random.Random(0)
    rows = []
    for i in range(240):
        label = i % 2
        letters = "abcdefghijklm" if label == 0 else "nopqrstuvwxyz"
        rows.append({"text": "".join(rng.choice(letters) for _ in range(rng.randint(4, 12))), "label": label})
    (d / "cls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def tiny_config(source: Path | str, task: str = "lm", overrides: list[str] = ()) -> Config:
    """A tiny config for ``task``; ``overrides`` are ``section.key=value`` strings."""
    base = {
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 32, "head": task},
        "data": {"source": str(source), "task": task, "seq_len": 32, "val_fraction": 0.1},
        "train": {
            "steps": 12,
            "batch_size": 8,
            "lr": 3e-3,
            "warmup_steps": 3,
            "log_every": 1,
            "eval_every": 0,
            "eval_batches": 4,
            "checkpoint_every": 0,
            "progress": False,
            "device": "cpu",
        },
    }
    return Config.from_dict(apply_overrides(base, list(overrides)))


@pytest.fixture(scope="session")
def lm_cfg(data_dir):
    def make(*overrides: str) -> Config:
        return tiny_config(data_dir / "tiny.txt", "lm", list(overrides))

    return make


@pytest.fixture(scope="session")
def cls_cfg(data_dir):
    def make(*overrides: str) -> Config:
        return tiny_config(data_dir / "cls.jsonl", "classification", list(overrides))

    return make
