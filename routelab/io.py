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

Safetensors files are written tensor by tensor (``write_safetensors``): the header first, then each
tensor's bytes as its producer hands it over, hashed on the way, so the extra memory of a write is one
tensor (a contiguous host copy at most), never the serialized model. The bytes are those
``safetensors.torch.save_file`` writes for the same tensors (same order, header and padding), so
checksums do not depend on which writer wrote a file; with several metadata keys (routelab writes one)
safetensors orders them differently in each process, and this writer keeps the order given.

Reading is strict: a truncated or corrupted safetensors file, a file whose SHA-256 differs from the
one recorded when it was written, or malformed JSON raises ``DamagedFileError`` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open


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
    room for them raises ``DiskFullError`` before anything is written. Written by
    ``write_safetensors``: one tensor at a time (a GPU tensor is copied to the host alone).

    Tensors sharing storage (tied weights) are stored once and restored as aliases on load."""
    size = safetensors_size(state)
    check_free_space(Path(path).parent, size, Path(path).name)
    tensors, aliases = unique_tensors(state)
    meta = dict(metadata or {})
    meta["routelab_aliases"] = json.dumps(aliases)
    specs = [TensorSpec(name, tuple(t.shape), t.dtype, lambda t=t: t.detach()) for name, t in tensors.items()]
    return write_safetensors(path, specs, meta, size)


# ----------------------------------------------------------------------------------------------
# the safetensors format, written one tensor at a time

# safetensors' dtype names, in the order its writer ranks them: a file holds the highest rank's tensors
# first (then by name), which keeps every tensor aligned to its element size
SAFETENSORS_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2", torch.float8_e4m3fn: "F8_E4M3",
    torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32",
    torch.uint32: "U32", torch.float32: "F32", torch.complex64: "C64", torch.float64: "F64", torch.int64: "I64",
    torch.uint64: "U64",
}
DTYPE_OF = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
_RANK = {dtype: i for i, dtype in enumerate(SAFETENSORS_DTYPES)}


class TensorSpec(NamedTuple):
    """One tensor of a file to write: known up front (the header needs it), produced only when its
    bytes are written (``produce()`` returns a tensor of that shape and dtype, on any device)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]


def safetensors_layout(tensors: Iterable[TensorSpec], metadata: dict[str, str] | None = None) -> tuple[bytes, list[TensorSpec]]:
    """The header (length prefix included) and the tensors in the order their bytes follow it.

    The safetensors format: an 8-byte little-endian header length N, N bytes of JSON (``__metadata__``
    first when given, then name -> dtype, shape and [begin, end) byte offsets into the data, in data
    order), padded with spaces to a multiple of 8, then the tensors' raw little-endian bytes."""
    ordered = sorted(tensors, key=lambda s: (-_rank(s), s.name))
    names = [s.name for s in ordered]
    if len(set(names)) != len(names):
        raise ValueError(f"tensor names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    header: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for s in ordered:
        end = offset + _nbytes(s)
        header[s.name] = {"dtype": SAFETENSORS_DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, ordered


def _rank(spec: TensorSpec) -> int:
    if spec.dtype not in _RANK:
        raise ValueError(f"tensor {spec.name!r} has dtype {spec.dtype}, which routelab does not write to safetensors; "
                         f"allowed: {', '.join(str(d).removeprefix('torch.') for d in SAFETENSORS_DTYPES)}")
    return _RANK[spec.dtype]


def _nbytes(spec: TensorSpec) -> int:
    return math.prod(spec.shape) * torch.empty((), dtype=spec.dtype).element_size()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``t`` (no copy for a contiguous host tensor on a little-endian host)."""
    flat = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    if sys.byteorder == "big" and t.element_size() > 1:
        flat = flat.view(-1, t.element_size()).flip(1).reshape(-1)
    return memoryview(flat.numpy()).cast("B")


def write_safetensors(
    path: str | Path, tensors: Iterable[TensorSpec], metadata: dict[str, str] | None = None, size: int | None = None
) -> str:
    """Write a safetensors file atomically, holding one tensor at a time; return its SHA-256 (hex),
    hashed as the bytes are written. ``size``: the bytes to find free first (default: the file's own).
    A produced tensor whose shape or dtype differs from its spec raises ``ValueError`` (the header
    already promised them) and leaves no file."""
    header, ordered = safetensors_layout(tensors, metadata)
    digest = hashlib.sha256()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(header)
            digest.update(header)
            for spec in ordered:
                t = spec.produce()
                if tuple(t.shape) != tuple(spec.shape) or t.dtype != spec.dtype:
                    raise ValueError(f"tensor {spec.name!r} was announced as {spec.dtype} {tuple(spec.shape)} but"
                                     f" produced as {t.dtype} {tuple(t.shape)}")
                data = tensor_bytes(t)
                f.write(data)
                digest.update(data)
                del t, data  # before the next one is produced

    atomic_write(path, write, size if size is not None else len(header) + sum(_nbytes(s) for s in ordered))
    return digest.hexdigest()


RowSelector = Callable[[str, tuple[int, ...]], tuple[int, int] | None]  # (name, stored shape) -> rows to read, None = all


def load_state_dict(
    path: str | Path, map_location: str | torch.device = "cpu", sha256: str | None = None,
    rows: RowSelector | None = None, keys: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Load a file written by ``save_state_dict`` (or any safetensors file), checking ``sha256`` if given.

    ``rows(name, shape)`` (shape as stored) may return ``(lo, hi)``: only rows lo:hi of dimension 0 of
    that tensor are read (``get_slice``: the other rows are never copied; expert parallelism reads
    its experts so). ``keys(name)`` False: that tensor is not read at all."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found")
    verify_sha256(path, sha256)

    def read(f: Any, k: str) -> torch.Tensor:
        part = f.get_slice(k)
        span = rows(k, tuple(part.get_shape())) if rows is not None else None
        return f.get_tensor(k) if span is None else part[span[0] : span[1]]

    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            state = {k: read(f, k) for k in f.keys() if keys is None or keys(k)}
            meta = f.metadata() or {}
        aliases = json.loads(meta.get("routelab_aliases", "{}"))
    except Exception as e:  # SafetensorError (truncated, bad header), JSON in the metadata, I/O
        raise DamagedFileError(path, f"cannot read it as safetensors ({type(e).__name__}: {e})") from None
    for alias, target in aliases.items():
        if keys is not None and not keys(alias):
            continue
        if target not in state:
            raise DamagedFileError(path, f"alias {alias!r} points at missing tensor {target!r}")
        state[alias] = state[target]
    return state


def lazy_tensors(path: str | Path) -> tuple[list[TensorSpec], dict[str, str] | None]:
    """A safetensors file's tensors as ``TensorSpec``s whose ``produce()`` reads that one tensor, and
    its metadata: what ``write_safetensors`` takes to rewrite the file holding one tensor at a time.
    Only the header is read here. Each tensor is read through its own ``safe_open``, which maps the
    file: closing it unmaps the pages read, which would otherwise stay resident until the last one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            found = [(name, f.get_slice(name)) for name in f.keys()]
            layout = [(name, tuple(s.get_shape()), s.get_dtype()) for name, s in found]
    except Exception as e:
        raise DamagedFileError(path, f"cannot read it as safetensors ({type(e).__name__}: {e})") from None
    if meta:  # in the file's order: safe_open's mapping comes from a hash map, whose order varies by process
        meta = _header_metadata(path) or meta
    specs = []
    for name, shape, dtype in layout:
        if dtype not in DTYPE_OF:
            raise DamagedFileError(path, f"tensor {name!r} has dtype {dtype}, which routelab does not read")
        specs.append(TensorSpec(name, shape, DTYPE_OF[dtype], lambda name=name: _read_tensor(path, name)))
    return specs, meta


def _header_metadata(path: Path) -> dict[str, str] | None:
    """A safetensors file's ``__metadata__`` as its header lists it (8-byte little-endian header
    length, then the JSON header), or None if the header cannot be read that way."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


def _read_tensor(path: Path, name: str) -> torch.Tensor:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)
    except OSError:
        raise
    except Exception as e:
        raise DamagedFileError(path, f"cannot read tensor {name!r} ({type(e).__name__}: {e})") from None


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
