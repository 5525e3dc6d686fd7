"""Files that never end up half-written: atomic writes and safetensors state dicts.

Every write goes to a temporary file in the target's folder, is flushed to disk, then renamed over
the target (``os.replace`` is atomic on POSIX), so a killed process leaves the old file or the new
one, never a broken one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then atomically move the temporary file to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save tensors to safetensors atomically. Tensors sharing storage (tied weights) are stored once
    and restored as aliases on load."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride())) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    meta = dict(metadata or {})
    meta["routelab_aliases"] = json.dumps(aliases)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_state_dict(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a file written by ``save_state_dict`` (or any safetensors file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    with safe_open(str(path), framework="pt", device=str(map_location)) as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    for alias, target in json.loads(meta.get("routelab_aliases", "{}")).items():
        state[alias] = state[target]
    return state


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
