"""A safetensors checkpoint read lazily, one tensor at a time.

``Tensors`` names the tensors of a folder's ``model.safetensors`` (or of the shards a
``model.safetensors.index.json`` lists) without reading any. A ``Source`` says how one tensor of
the model is made from the checkpoint's (renamed, rows reordered, experts stacked) and writes it
into the model's tensor piece by piece (``fill``), so an import holds the model plus at most one
checkpoint tensor, never a second copy of the whole checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from routelab.io import DamagedFileError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class Tensors:
    """The tensors of a checkpoint, by name, read lazily from one or more safetensors files."""

    def __init__(self, files: dict[str, Path], folder: Path) -> None:
        self.files = files  # tensor name -> the file holding it
        self.folder = folder

    @classmethod
    def open(cls, folder: Path) -> Tensors:
        from safetensors import safe_open

        index = folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise DamagedFileError(index, f"it is not a safetensors index with a weight_map ({e})") from None
            files = {name: folder / file for name, file in weight_map.items()}
            for f in sorted(set(files.values())):
                if not f.is_file():
                    raise FileNotFoundError(f"{str(f)!r} is listed in {INDEX_FILE} but missing")
            return cls(files, folder)
        single = folder / WEIGHTS_FILE
        if not single.is_file():
            pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
            hint = (
                f"; found {', '.join(sorted(pickled))}, a pickle: routelab reads safetensors only "
                "(convert it with transformers: model.save_pretrained(dir, safe_serialization=True))"
                if pickled else ""
            )
            raise FileNotFoundError(f"{str(folder)!r} has neither {WEIGHTS_FILE} nor {INDEX_FILE}{hint}")
        try:
            with safe_open(str(single), framework="pt") as f:
                names = list(f.keys())
        except Exception as e:  # safetensors raises its own error types on a damaged header
            raise DamagedFileError(single, f"it is not a readable safetensors file ({e})") from None
        return cls({name: single for name in names}, folder)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def require(self, name: str) -> str:
        """``name``, checked to be in the checkpoint: a missing one raises ``DamagedFileError`` naming it."""
        if name not in self.files:
            where = sorted(set(self.files.values()))
            raise DamagedFileError(where[0] if len(where) == 1 else where[0].parent, f"tensor {name!r} is missing from the checkpoint")
        return name

    def get(self, name: str) -> Tensor:
        """The tensor ``name`` in its stored dtype (read now, nothing else is)."""
        from safetensors import safe_open

        self.require(name)
        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name)

    def source(self, name: str, change: Callable[[Tensor], Tensor] | None = None) -> Source:
        """The model tensor that is checkpoint tensor ``name`` (through ``change``, if given)."""
        return Source(self, (self.require(name),), change)

    def stacked(self, names: list[str], change: Callable[[Tensor], Tensor] | None = None) -> Source:
        """The model tensor that stacks the checkpoint tensors ``names`` (each through ``change``)
        along a new first dimension."""
        return Source(self, tuple(self.require(n) for n in names), change, stacked=True)



@dataclass(frozen=True)
class Source:
    """How one tensor of the model is made from the checkpoint: tensor ``names[0]`` through
    ``change``, or with ``stacked`` the tensors ``names``, each through ``change``, stacked along a
    new first dimension (Mixtral's experts)."""

    tensors: Tensors
    names: tuple[str, ...]
    change: Callable[[Tensor], Tensor] | None = None
    stacked: bool = False

    def piece(self, i: int) -> Tensor:
        w = self.tensors.get(self.names[i])
        return self.change(w) if self.change is not None else w

    def read(self) -> Tensor:
        """The whole tensor, in the checkpoint's dtype."""
        return torch.stack([self.piece(i) for i in range(len(self.names))]) if self.stacked else self.piece(0)

    def fill(self, dest: Tensor, name: str) -> None:
        """Copy the tensor into the model's ``dest`` (named ``name``), converting the dtype as it
        goes; a stack is copied one checkpoint tensor at a time. A shape other than ``dest``'s
        raises ``DamagedFileError``."""
        parts = [(dest[i], i, f"{name}[{i}]") for i in range(len(self.names))] if self.stacked else [(dest, 0, name)]
        if self.stacked and len(self.names) != dest.shape[0]:
            self.mismatch(name, (len(self.names), *dest.shape[1:]), dest)
        with torch.no_grad():
            for part, i, part_name in parts:
                w = self.piece(i)
                if w.shape != part.shape:
                    self.mismatch(part_name, w.shape, part)
                part.copy_(w)
                del w  # the next piece is read only once this one is gone

    def mismatch(self, name: str, shape: tuple[int, ...], dest: Tensor) -> None:
        raise DamagedFileError(self.tensors.folder, f"its tensor for {name} has shape {tuple(shape)}, config.json implies {tuple(dest.shape)}")
