"""Files that never end up half-written, and that say so when they are damaged.

Every write goes to a temporary file in the target's folder, is flushed to disk, then renamed over
the target (``os.replace`` is atomic on POSIX), so a killed process leaves the old file or the new
one, never a broken one. Folders (checkpoints, a finished model) are staged the same way: written
under a hidden temporary name, then swapped in, the old one removed only after the new one is in
place. Temporary files and folders get the permissions a plain ``open``/``mkdir`` would give under
the process's umask (``tempfile`` alone would make them private, 0600/0700).

A full disk (or quota) raises ``DiskFullError``, an ``OSError`` whose one-line message names the
folder, the bytes the write needed and the bytes free, and leaves no temporary file behind. Writers
that know their size (``save_state_dict``, a checkpoint) check the free space before writing anything.

Reading is strict: a truncated or corrupted safetensors file, a file whose SHA-256 differs from the
one recorded when it was written, or malformed JSON raises ``DamagedFileError`` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class DamagedFileError(ValueError):
    """A file is unreadable, truncated, malformed or fails its checksum; the message names it."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        super().__init__(f"{str(path)!r} is damaged or not what routelab expects: {reason}")


class DiskFullError(OSError):
    """A write that failed, or could not fit, for want of disk space (``errno`` is ``ENOSPC``).
    ``what`` (a file or folder name) is written into ``folder``; a staging folder (``make_temp_dir``),
    which is gone by the time the message is read, is named by its parent and final name instead."""

    def __init__(self, folder: str | Path, what: str, needed: int | None, free: int | None) -> None:
        folder = Path(folder)
        staged = re.fullmatch(r"\.(.+)\.[^.]+\.tmp", folder.name)
        if staged:
            folder, what = folder.parent, f"{staged.group(1)}/{what}"
        self.folder, self.needed, self.free = folder, needed, free
        need = f"about {format_bytes(needed)} needed" if needed is not None else "more space needed"
        have = f"{format_bytes(free)} free" if free is not None else "free space unknown"
        super().__init__(
            f"not enough disk space in {str(folder)!r} to write {what} ({need}, {have});"
            " free some space or write elsewhere"
        )
        self.errno = errno.ENOSPC


def format_bytes(n: int) -> str:
    """``1536`` -> ``1.5 KiB``: a size in the largest binary unit that keeps it >= 1."""
    size, unit = float(n), "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{int(size)} bytes" if unit == "bytes" else f"{size:.1f} {unit}"


def free_bytes(folder: str | Path) -> int | None:
    """Bytes an unprivileged process may still write on ``folder``'s file system (its nearest existing
    ancestor's), or None when the OS cannot say."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def check_free_space(folder: str | Path, needed: int, what: str) -> None:
    """Raise ``DiskFullError`` before writing ``what`` (``needed`` bytes) into ``folder`` when its
    file system has less free space than that."""
    free = free_bytes(folder)
    if free is not None and needed > free:
        raise DiskFullError(folder, what, needed, free)


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` reports a full disk or an exhausted quota: ``OSError`` ENOSPC/EDQUOT, or the
    ``SafetensorError`` safetensors raises around that I/O error (it is no ``OSError``)."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error)
    return type(error).__name__ == "SafetensorError" and any(
        s in text for s in ("No space left on device", "StorageFull", "Disk quota exceeded", "QuotaExceeded")
    )


@contextlib.contextmanager
def disk_full_as_error(folder: str | Path, what: str, needed: int | None = None) -> Iterator[None]:
    """Turn an out-of-space error raised inside into ``DiskFullError`` naming ``folder`` and ``what``."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise DiskFullError(folder, what, needed, free_bytes(folder)) from None


# ----------------------------------------------------------------------------------------------
# permissions


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back at once
    os.umask(mask)
    return mask


def _plain_mode(path: str | Path, is_dir: bool) -> None:
    """Give a ``tempfile``-made file or folder the mode ``open``/``mkdir`` would have given it."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~current_umask())


def make_temp_dir(parent: str | Path, prefix: str) -> Path:
    """A new hidden folder ``parent/.<prefix>*.tmp`` with the umask's permissions, for staging."""
    with disk_full_as_error(parent, prefix):
        Path(parent).mkdir(parents=True, exist_ok=True)
        path = tempfile.mkdtemp(prefix=f".{prefix}.", suffix=".tmp", dir=parent)
    _plain_mode(path, is_dir=True)
    return Path(path)


def check_folder_target(path: str | Path, what: str = "output folder") -> None:
    """Raise ``NotADirectoryError`` (one clear line) if ``path`` or one of its parents is an existing
    file, so a folder can be created there; a missing or existing folder is fine."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} {str(path)!r} is an existing file, not a folder; choose another path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"cannot create {what} {str(path)!r}: {str(parent)!r} is a file")
            return


# ----------------------------------------------------------------------------------------------
# atomic writes


def atomic_write(path: str | Path, write: Callable[[str], None], size: int | None = None) -> None:
    """Call ``write(tmp_path)`` then atomically move the temporary file to ``path``. ``size``: the
    bytes it will write, when known, checked against the free space first. A full disk raises
    ``DiskFullError``; the temporary file is removed whatever went wrong."""
    path = Path(path)
    with disk_full_as_error(path.parent, path.name, size):
        path.parent.mkdir(parents=True, exist_ok=True)
        if size is not None:
            check_free_space(path.parent, size, path.name)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            write(tmp)
            _plain_mode(tmp, is_dir=False)  # after write: a writer may have replaced the file (safetensors does)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def atomic_write_text(path: str | Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (renames into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Move the complete folder ``src`` to ``dst``. An existing ``dst`` is first renamed aside and
    deleted only once ``src`` is in place, so at every moment one complete folder exists."""
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.replace(src, dst)
    else:
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(old, dst)  # the old folder back in place; the caller removes src
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(dst.parent)


# ----------------------------------------------------------------------------------------------
# reading


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: str | Path, expected: str | None) -> None:
    """Raise ``DamagedFileError`` unless ``path`` exists and (when ``expected``) has that SHA-256."""
    path = Path(path)
    if not path.is_file():
        raise DamagedFileError(path, "the file is missing")
    if expected is not None and file_sha256(path) != expected:
        raise DamagedFileError(path, "its SHA-256 differs from the one recorded when it was written")


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing file raises ``FileNotFoundError``, bad content ``DamagedFileError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedFileError(path, f"not valid JSON ({e})") from None


# ----------------------------------------------------------------------------------------------
# safetensors state dicts


def unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of ``state`` to store (one per shared storage view) and the aliases (name ->
    stored name) of the others, as ``save_state_dict`` writes them."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride())) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t
    return tensors, aliases


def safetensors_size(state: dict[str, torch.Tensor]) -> int:
    """Bytes ``save_state_dict`` writes for ``state`` (tensor data plus a generous header), without
    copying anything: what a write must find free on the disk."""
    tensors, aliases = unique_tensors(state)
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    return data + 1024 + sum(128 + 2 * len(name) for name in (*tensors, *aliases))


def save_state_dict(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> str:
    """Save tensors to safetensors atomically; return the written file's SHA-256 (hex). A disk without
    room for them raises ``DiskFullError`` before anything is written.

    Tensors sharing storage (tied weights) are stored once and restored as aliases on load."""
    size = safetensors_size(state)
    check_free_space(Path(path).parent, size, Path(path).name)
    tensors, aliases = unique_tensors(state)
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    meta = dict(metadata or {})
    meta["routelab_aliases"] = json.dumps(aliases)
    digest: list[str] = []

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=meta)
        digest.append(file_sha256(tmp))  # hashed before the rename: what is in place is what was hashed

    atomic_write(path, write, size)
    return digest[0]


def load_state_dict(
    path: str | Path, map_location: str | torch.device = "cpu", sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """Load a file written by ``save_state_dict`` (or any safetensors file), checking ``sha256`` if given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found")
    verify_sha256(path, sha256)
    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
        aliases = json.loads(meta.get("routelab_aliases", "{}"))
    except Exception as e:  # SafetensorError (truncated, bad header), JSON in the metadata, I/O
        raise DamagedFileError(path, f"cannot read it as safetensors ({type(e).__name__}: {e})") from None
    for alias, target in aliases.items():
        if target not in state:
            raise DamagedFileError(path, f"alias {alias!r} points at missing tensor {target!r}")
        state[alias] = state[target]
    return state


def read_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header, without reading the tensors (aliases
    included), so sizes claimed elsewhere can be checked before anything is allocated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            meta = f.metadata() or {}
        aliases = json.loads(meta.get("routelab_aliases", "{}"))
    except Exception as e:
        raise DamagedFileError(path, f"cannot read it as safetensors ({type(e).__name__}: {e})") from None
    for alias, target in aliases.items():
        if target in shapes:
            shapes[alias] = shapes[target]
    return shapes
