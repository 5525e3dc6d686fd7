"""Checkpoints: ``<run>/checkpoints/step_{step:07d}/`` holding three files.

- ``model.safetensors``: the model's state dict (tied weights stored once, see ``routelab.io``).
- ``optimizer.safetensors``: every optimizer state tensor as ``state.{param_idx}.{name}`` plus the
  random-number generator states as uint8 tensors (``rng.torch``, ``rng.cuda``), plus trained
  tensors that are not the model's (e.g. ``distill.projection.weight``, see ``routelab.train.distill``).
- ``state.json``: the step, the optimizer's param groups and non-tensor state, the Python and NumPy
  RNG states, and the trainer's bookkeeping. Written last.

A checkpoint is written into a hidden temporary folder and renamed into place, and only a folder
with ``state.json`` counts, so a run killed mid-write leaves the previous checkpoint as the newest
complete one. A checkpoint that the disk cannot hold is refused before anything is written, and one
that fills the disk while writing removes its temporary folder: both raise ``DiskFullError``
(``routelab.io``), and the older checkpoints stay as they were. ``state.json`` records the SHA-256
of both tensor files, so a checkpoint damaged after it was written (a truncated copy, a bad disk) is
detected before it is used: ``verify_checkpoint``.
Nothing is pickled: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from routelab.device import device_of
from routelab.io import (
    DamagedFileError,
    RowSelector,
    atomic_write_json,
    check_free_space,
    load_state_dict,
    make_temp_dir,
    read_json,
    read_shapes,
    replace_dir,
    safetensors_size,
    save_state_dict,
    verify_sha256,
)

CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d{7,})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Valid checkpoints (folders ``step_NNNNNNN`` holding ``state.json``), oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _NAME.match(path.name)
        if m and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest valid checkpoint folder, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# ----------------------------------------------------------------------------------------------
# optimizer and RNG state <-> (tensors, JSON)


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (``state.{idx}.{name}``) and JSON-able data."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, param_state in sd["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of ``optimizer_to_flat``: a dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else dict(g) for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def capture_rng(device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """The torch (CPU, and CUDA for a CUDA ``device``), Python and NumPy RNG states."""
    tensors = {"rng.torch": torch.get_rng_state()}  # uint8 tensor
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict, device: torch.device) -> None:
    """Inverse of ``capture_rng``."""
    torch.set_rng_state(tensors["rng.torch"].cpu())
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"].cpu(), device)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ----------------------------------------------------------------------------------------------
# save / load


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    bookkeeping: dict[str, Any],
    keep: int,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_tensors: dict[str, torch.Tensor] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically, then keep only the ``keep`` newest; return its folder.

    ``bookkeeping`` (JSON-able trainer counters) is stored in ``state.json``, with the SHA-256 of
    both tensor files, checked on load. ``model_state`` / ``optimizer_tensors`` replace the model's
    state dict and the optimizer's tensors (expert parallelism passes the experts gathered from all
    ranks, so a checkpoint is the same whatever the number of processes). ``extra_tensors``: trained
    tensors outside the model (names not starting with ``state.`` or ``rng.``), stored in the optimizer
    file and read back with ``read_extra_tensors``.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / checkpoint_name(step)
    weights = model_state if model_state is not None else model.state_dict()
    opt_tensors, opt_meta = optimizer_to_flat(optimizer)
    if optimizer_tensors is not None:
        opt_tensors = optimizer_tensors
    rng_tensors, rng_meta = capture_rng(device_of(model))
    extra = extra_tensors or {}
    if any(k.startswith(("state.", "rng.")) for k in extra):
        raise ValueError(f"extra checkpoint tensor names must not start with 'state.' or 'rng.': {sorted(extra)}")
    optimizer_file = {**opt_tensors, **rng_tensors, **extra}
    # the whole checkpoint (tensors, and state.json within 256 KiB) must fit beside the older ones, which are
    # pruned only once it is written: checked before any write
    needed = safetensors_size(weights) + safetensors_size(optimizer_file) + (1 << 18)
    check_free_space(root, needed, f"checkpoint {final.name}")
    tmp = make_temp_dir(root, final.name)
    try:
        files = {MODEL_FILE: save_state_dict(weights, tmp / MODEL_FILE)}
        files[OPTIMIZER_FILE] = save_state_dict(optimizer_file, tmp / OPTIMIZER_FILE)
        state = {
            "format": FORMAT_VERSION, "step": step, **bookkeeping,
            "optimizer": opt_meta, "rng": rng_meta, "sha256": files,
        }
        atomic_write_json(tmp / STATE_FILE, state)  # last: marks the checkpoint complete
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints, and leftovers of killed writes
    (hidden temporary folders, ``step_*`` folders without ``state.json``). Folders set aside as
    damaged (``step_*.damaged``) are left for the user."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    valid = list_checkpoints(run_dir)
    for _, path in valid[: max(len(valid) - keep, 0)]:
        shutil.rmtree(path)
    valid_paths = {p for _, p in valid}
    for path in root.iterdir():
        if path.is_dir() and path not in valid_paths and (path.name.startswith(".") or _NAME.match(path.name)):
            shutil.rmtree(path, ignore_errors=True)


def read_checkpoint_state(path: str | Path) -> dict:
    """The ``state.json`` of checkpoint folder ``path``; ``DamagedFileError`` if it is malformed."""
    state_path = Path(path) / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{str(state_path)!r} not found: {str(path)!r} is not a complete checkpoint")
    state = read_json(state_path)
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise DamagedFileError(state_path, "it holds no checkpoint state (a mapping with an integer 'step')")
    if state.get("format") != FORMAT_VERSION:
        raise DamagedFileError(state_path, f"format {state.get('format')!r}; this version reads {FORMAT_VERSION}")
    for key in ("optimizer", "rng"):
        if not isinstance(state.get(key), dict):
            raise DamagedFileError(state_path, f"its {key!r} entry is missing or not a mapping")
    return state


def verify_checkpoint(
    path: str | Path, shapes: dict[str, tuple[int, ...]] | None = None, files: tuple[str, ...] = (MODEL_FILE, OPTIMIZER_FILE)
) -> dict:
    """Check checkpoint folder ``path`` without loading it: ``state.json`` is well-formed, the tensor
    ``files`` (default both) exist, match the SHA-256 recorded in ``state.json`` (checkpoints that predate checksums:
    their headers parse), and, given ``shapes`` (name -> shape of the model), the weights have exactly
    those tensors. Returns ``state.json``; raises ``DamagedFileError`` naming the bad file."""
    from routelab.model import check_weights_file

    path = Path(path)
    state = read_checkpoint_state(path)
    sums = state.get("sha256") or {}
    for name in files:
        verify_sha256(path / name, sums.get(name))
        if name not in sums:
            read_shapes(path / name)  # no checksum recorded: at least the header must parse
    if shapes is not None:
        check_weights_file(shapes, path / MODEL_FILE, f"the model of {str(path / STATE_FILE)!r}")
    return state


def newest_intact_checkpoint(
    run_dir: str | Path, shapes: dict[str, tuple[int, ...]] | None = None
) -> tuple[Path | None, list[tuple[Path, DamagedFileError]]]:
    """The newest checkpoint that passes ``verify_checkpoint``, and the newer ones that failed, with why."""
    damaged = []
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path, shapes)
            return path, damaged
        except DamagedFileError as e:
            damaged.append((path, e))
    return None, damaged


def set_aside(path: str | Path) -> Path:
    """Rename a damaged checkpoint folder to ``step_NNNNNNN.damaged`` (kept, no longer listed)."""
    path = Path(path)
    target = path.with_name(path.name + ".damaged")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged{n}")
    os.replace(path, target)
    return target


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    rng: bool = True,
    rows: dict[str, tuple[int, int, int]] | None = None,
    moment_rows: RowSelector | None = None,
) -> dict:
    """Load weights into ``model`` (and state into ``optimizer``, and the RNG states if ``rng``),
    after ``verify_checkpoint`` (checksums, and the weights' shapes against ``model``).

    The weights are read straight onto the model's device, whichever device wrote them (safetensors
    records none), so a run resumes on another device; the optimizer's moments follow their
    parameters (``Optimizer.load_state_dict``) and the RNG states stay host tensors.

    ``rows`` (name -> (lo, hi, total)): the model holds rows lo:hi of that stored (total, ...) tensor
    (expert parallelism's slice of the experts), and only they are read; ``moment_rows`` likewise
    for the optimizer's tensors (``load_optimizer_state``).

    Returns:
        the checkpoint's ``state.json`` (step and bookkeeping).
    """
    path = Path(path)
    rows = rows or {}
    shapes = {k: (rows[k][2], *v.shape[1:]) if k in rows else tuple(v.shape) for k, v in model.state_dict().items()}
    state = verify_checkpoint(path, shapes)
    weights = load_state_dict(path / MODEL_FILE, map_location=device_of(model), rows=lambda k, _: rows[k][:2] if k in rows else None)
    model.load_state_dict(weights)
    del weights
    if optimizer is not None or rng:
        load_optimizer_state(path, optimizer, state, device=device_of(model) if rng else None, rows=moment_rows)
    return state


def read_extra_tensors(path: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """The ``extra_tensors`` saved in checkpoint folder ``path`` whose names start with ``prefix``
    (after ``verify_checkpoint``, which checks the file's checksum)."""
    return load_state_dict(Path(path) / OPTIMIZER_FILE, keys=lambda k: k.startswith(prefix))


def load_optimizer_state(
    path: str | Path,
    optimizer: torch.optim.Optimizer | None,
    state: dict,
    device: torch.device | None = None,
    tensor_map: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    rows: RowSelector | None = None,
    apply: Callable[[dict], None] | None = None,
) -> None:
    """Load a checkpoint's optimizer state into ``optimizer`` (if given) and its RNG states (if
    ``device``); ``tensor_map(key, tensor)`` may transform each ``state.{idx}.{name}`` tensor first;
    ``rows(key, stored shape)`` may name the rows lo:hi of a tensor to read instead of all (expert
    parallelism reads only this rank's slice of the experts' moments). Without ``optimizer`` only
    the RNG tensors are read. ``apply(state_dict)`` replaces ``optimizer.load_state_dict`` (FSDP
    keeps this rank's shards: ``routelab.train.fsdp``)."""
    path = Path(path)
    wanted = None if optimizer is not None else (lambda k: k.startswith("rng."))
    tensors = load_state_dict(path / OPTIMIZER_FILE, rows=rows, keys=wanted)
    if tensor_map is not None:
        tensors = {k: tensor_map(k, t) if k.startswith("state.") else t for k, t in tensors.items()}
    try:
        if optimizer is not None:
            (apply or optimizer.load_state_dict)(optimizer_from_flat(tensors, state["optimizer"]))
        if device is not None:
            restore_rng(tensors, state["rng"], device)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise DamagedFileError(path / OPTIMIZER_FILE, f"its optimizer or RNG state does not fit ({type(e).__name__}: {e})") from None
