"""Bytes to text for every file ``routelab.data`` reads as text.

Files are decoded with ``data.encoding`` under ``data.encoding_errors`` (``strict`` by default, so
a file in another encoding is refused rather than trained on with U+FFFD characters); a file whose
first 8 KiB hold a NUL byte is refused as binary whatever the policy (NUL is normal only in UTF-16
and UTF-32, so those encodings skip the test). Every error names the file, the byte offset and the
setting to change. Python source of the standard library is decoded as Python reads it (PEP 263).
"""

from __future__ import annotations

import codecs
import contextlib
import io
import tokenize
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from routelab.data.errors import DataError

BINARY_PROBE = 8192  # bytes searched for a NUL at the start of a file (git and grep use the same idea)
WIDE_ENCODINGS = ("utf-16", "utf-32")  # NUL bytes are part of ordinary text in these
CHUNK = 1 << 20  # bytes decoded at a time when locating an undecodable byte


def _is_wide(encoding: str) -> bool:
    return codecs.lookup(encoding).name.startswith(WIDE_ENCODINGS)


def check_not_binary(path: Path, head: bytes, encoding: str) -> None:
    """Refuse ``path`` if ``head`` (its first bytes) holds a NUL byte and ``encoding`` is not UTF-16/32."""
    nul = head.find(b"\0", 0, BINARY_PROBE)
    if nul >= 0 and not _is_wide(encoding):
        raise DataError(
            f"{str(path)!r} looks binary (a NUL byte at offset {nul}), not text; routelab reads text files"
            " only: remove it from the source, or set data.encoding=utf-16/utf-32 if it is text in that encoding"
        )


def _undecodable_error(path: Path, encoding: str, offset: int, bad: bytes, reason: str, line: int | None) -> DataError:
    where = f"offset {offset}" + (f" (line {line})" if line is not None else "")
    return DataError(
        f"{str(path)!r} is not valid {encoding} text: byte {bad[:4].hex(' ')} at {where} cannot be decoded"
        f" ({reason}); set data.encoding to the file's encoding (e.g. data.encoding=latin-1) or"
        " data.encoding_errors=replace|ignore"
    )


def _line_of(data: bytes, offset: int, encoding: str) -> int | None:
    """1-based line of byte ``offset``, for encodings that write a newline as the byte 0x0A; else None."""
    return data.count(b"\n", 0, offset) + 1 if "\n".encode(encoding) == b"\n" else None


def decode_bytes(path: Path, data: bytes, encoding: str, errors: str) -> str:
    """Decode a whole file's ``data`` (read from ``path``, named in errors); see the module docstring."""
    check_not_binary(path, data[:BINARY_PROBE], encoding)
    try:
        return data.decode(encoding, errors)
    except UnicodeDecodeError as e:
        line = _line_of(data, e.start, encoding)
        raise _undecodable_error(path, encoding, e.start, e.object[e.start : e.end], e.reason, line) from None


def read_text(path: Path, encoding: str, errors: str) -> str:
    """The text of ``path``: its bytes decoded by ``decode_bytes`` (newlines kept as they are)."""
    return decode_bytes(path, path.read_bytes(), encoding, errors)


def first_undecodable(path: Path, encoding: str) -> DataError:
    """The error naming the first byte of ``path`` that ``encoding`` cannot decode, found by decoding
    the file again chunk by chunk (a text stream's own error does not know the file offset)."""
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    offset = 0  # bytes fed to the decoder before the current chunk
    newlines = 0  # 0x0A bytes before the current chunk
    counts_lines = "\n".encode(encoding) == b"\n"
    with path.open("rb") as f:
        while True:
            chunk = f.read(CHUNK)
            pending = len(decoder.getstate()[0])  # bytes of an unfinished character, kept from the last chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:  # e.object = pending bytes + chunk
                line = newlines + e.object.count(b"\n", 0, e.start) + 1 if counts_lines else None
                return _undecodable_error(
                    path, encoding, offset - pending + e.start, e.object[e.start : e.end], e.reason, line
                )
            if not chunk:
                break
            newlines += chunk.count(b"\n")
            offset += len(chunk)
    return DataError(f"{str(path)!r} could not be decoded as {encoding}; set data.encoding or data.encoding_errors")


@contextlib.contextmanager
def open_text(path: Path, encoding: str, errors: str, newline: str | None = None) -> Iterator[TextIO]:
    """Open ``path`` as a text stream after the binary test; a decoding error while reading it
    becomes the ``DataError`` of ``first_undecodable``."""
    with path.open("rb") as f:
        check_not_binary(path, f.read(BINARY_PROBE), encoding)
    try:
        with path.open(encoding=encoding, errors=errors, newline=newline) as f:
            yield f
    except UnicodeDecodeError:
        raise first_undecodable(path, encoding) from None


def read_python_source(path: Path) -> str:
    """The text of a Python source file decoded as the interpreter decodes it: the PEP 263 coding
    cookie, else UTF-8 (PEP 3120), strictly, newlines kept. Python refuses source it cannot decode,
    so an installed standard library always decodes this way."""
    data = path.read_bytes()
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError as e:  # an unknown coding cookie, or non-UTF-8 bytes in the first two lines
        decode_bytes(path, data, "utf-8", "strict")  # names the undecodable byte, if that is the cause
        raise DataError(f"{str(path)!r} is not readable Python source: {e}") from None
    return decode_bytes(path, data, encoding, "strict")
