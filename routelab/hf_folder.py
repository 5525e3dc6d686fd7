"""A Hugging Face model folder on disk: the folder itself or a hub cache entry's snapshot, its
``config.json``, and whether a folder is one at all.

Below ``train`` and ``pretrained``: ``routelab.pretrained.hf`` reads checkpoints from such folders,
and ``routelab.train.init_from`` recognises one (``hf_model_type``) to refuse it with the import
command to run first, without importing ``pretrained`` (which builds on ``train``).
"""

from __future__ import annotations

import json
from pathlib import Path

from routelab.io import DamagedFileError

__all__ = ["CONFIG_FILE", "hf_model_type", "read_config", "resolve_folder"]

CONFIG_FILE = "config.json"


def resolve_folder(path: str | Path) -> Path:
    """A model folder: ``path`` itself, or for a hub cache entry (``models--org--name``) the snapshot
    that ``refs/main`` names (or the only snapshot)."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{str(folder)!r} does not exist; give a local model folder (config.json + model.safetensors)")
    if not folder.is_dir():
        raise NotADirectoryError(f"{str(folder)!r} is a file; give the model folder that holds config.json")
    snapshots = folder / "snapshots"
    if not (folder / CONFIG_FILE).is_file() and snapshots.is_dir():
        ref = folder / "refs" / "main"
        if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
            return snapshots / ref.read_text().strip()
        found = [p for p in snapshots.iterdir() if p.is_dir()]
        if len(found) == 1:
            return found[0]
    return folder


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found: {str(folder)!r} is not a Hugging Face model folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedFileError(path, f"it is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DamagedFileError(path, "it does not hold a JSON object")
    return data


def hf_model_type(path: str | Path) -> str | None:
    """The ``model_type`` (else the first of ``architectures``) when ``path`` is a Hugging Face model
    folder or hub cache entry, else None: routelab's own ``config.json`` has neither key."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    try:
        c = read_config(resolve_folder(folder))
    except (OSError, ValueError):
        return None
    found = c.get("model_type") or c.get("architectures")
    if isinstance(found, list):
        found = found[0] if found else None
    return str(found) if found else None
