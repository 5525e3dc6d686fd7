"""Language-modelling text: read documents, split them by document, tokenise into one id stream.

Sources (``DataConfig.source``): ``'stdlib'`` (the ``.py`` files of Python's standard library,
already on every machine, about 13 MB), a text file, a folder of ``.txt``/``.md``/``.py`` files,
a ``.jsonl``/``.csv`` file (``DataConfig.text_column``), or ``'hf:NAME_OR_PATH'`` (Hugging Face
``datasets``; nothing is downloaded unless ``data.hf_allow_download=true``).

Files are decoded with ``data.encoding`` and ``data.encoding_errors`` (strict by default; binary
files refused), see ``routelab.data.decoding``. The standard library is Python source and is decoded
as Python decodes it (PEP 263 coding cookie, else UTF-8), strictly, whatever ``data.encoding`` says:
every file of CPython 3.6-3.13's library decodes this way to the same text as strict UTF-8.

Shape legend: N = train tokens, M = validation tokens, B = batch size, T = ``seq_len``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import sysconfig
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from routelab.config import DataConfig
from routelab.data.decoding import open_text, read_python_source, read_text
from routelab.data.errors import DataError, hf_missing
from routelab.data.tokenizers import TOKENIZER_FILE, BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer

Document = tuple[str, str]  # (name, text)

TEXT_SUFFIXES = (".txt", ".md", ".py")
STDLIB_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


# ----------------------------------------------------------------------------------------------
# reading


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files without ``site-packages`` and test folders, sorted by
    relative path (POSIX form), so every machine with the same Python lists them in the same order."""
    root = stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def folder_files(folder: Path) -> list[Path]:
    """``.txt``/``.md``/``.py`` files under ``folder`` (hidden files and folders skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if f.endswith(TEXT_SUFFIXES) and not f.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


class _Budget:
    """Collects documents until ``max_bytes`` UTF-8 bytes; the last one is cut to fit exactly."""

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self.total = 0
        self.docs: list[Document] = []

    @property
    def full(self) -> bool:
        return self.max_bytes is not None and self.total >= self.max_bytes

    def add(self, name: str, text: str) -> None:
        data = text.encode("utf-8")
        if self.max_bytes is not None and self.total + len(data) > self.max_bytes:
            text = data[: self.max_bytes - self.total].decode("utf-8", errors="ignore")  # drop a cut character
            self.total = self.max_bytes  # reached: reading stops here
        else:
            self.total += len(data)
        if text:
            self.docs.append((name, text))


def table_rows(path: Path, column: str, cfg: DataConfig) -> Iterator[tuple[str, dict]]:
    """Yield ``(row_name, row)`` from a ``.jsonl`` (one JSON object a line) or ``.csv``/``.tsv`` file,
    checking that ``column`` exists; ``row_name`` is ``FILE:LINE``. Decoded with ``cfg.encoding``
    and ``cfg.encoding_errors``."""
    if path.suffix == ".jsonl":
        with open_text(path, cfg.encoding, cfg.encoding_errors) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{str(path)!r} line {lineno} is not valid JSON: {e}") from None
                if not isinstance(row, dict) or column not in row:
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise DataError(f"{str(path)!r} line {lineno} has no column {column!r}; it has {keys}")
                yield f"{path.name}:{lineno}", row
        return
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # long documents in one cell
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with open_text(path, cfg.encoding, cfg.encoding_errors, newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None or column not in reader.fieldnames:
            has_bom = bool(reader.fieldnames) and reader.fieldnames[0].startswith("\ufeff")
            bom = " (it starts with a byte-order mark: set data.encoding=utf-8-sig)" if has_bom else ""
            raise DataError(f"{str(path)!r} has no column {column!r}; its header is {reader.fieldnames}{bom}")
        for lineno, row in enumerate(reader, start=2):
            yield f"{path.name}:{lineno}", row


@contextlib.contextmanager
def _hf_offline(enabled: bool) -> Iterator[None]:
    """Switch Hugging Face Hub access off (environment and the already-imported flags) if ``enabled``."""
    if not enabled:
        yield
        return
    import datasets.config
    import huggingface_hub.constants as hub_constants

    env_keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    os.environ.update({k: "1" for k in env_keys})
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_hf_rows(name: str, split: str, allow_download: bool) -> Any:
    """Load split ``split`` of a Hugging Face dataset (a hub name, a local folder, or a
    ``save_to_disk`` folder) without network access unless ``allow_download``."""
    try:
        import datasets
    except ImportError:
        raise hf_missing("datasets") from None
    try:
        with _hf_offline(not allow_download):
            if (Path(name) / "dataset_info.json").is_file() or (Path(name) / "dataset_dict.json").is_file():
                ds = datasets.load_from_disk(name)
                if isinstance(ds, datasets.DatasetDict):
                    if split not in ds:
                        raise DataError(f"HF dataset {name!r} has no split {split!r}; it has {sorted(ds)}")
                    ds = ds[split]
                return ds
            return datasets.load_dataset(name, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many kinds (FileNotFoundError, ConnectionError, ValueError, ...)
        hint = "" if allow_download else " (downloads are off: set data.hf_allow_download=true to fetch it)"
        raise DataError(
            f"HF dataset {name!r} split {split!r} could not be loaded{hint}: {type(e).__name__}: {e}"
        ) from None


def read_texts(source: str, cfg: DataConfig) -> list[Document]:
    """Read the documents of ``source`` (see the module docstring), at most ``cfg.max_bytes`` bytes.

    Returns:
        ``(name, text)`` documents in a deterministic order; empty documents are dropped.
    """
    budget = _Budget(cfg.max_bytes)
    if source == "stdlib":
        root = stdlib_root()
        for path in stdlib_files():
            if budget.full:
                break
            budget.add(path.relative_to(root).as_posix(), read_python_source(path))
    elif source.startswith("hf:"):
        name = source[3:]
        rows = load_hf_rows(name, cfg.hf_split, cfg.hf_allow_download)
        if cfg.text_column not in rows.column_names:
            raise DataError(f"HF dataset {name!r} has no column {cfg.text_column!r}; it has {rows.column_names}")
        i = 0
        for batch in rows.select_columns([cfg.text_column]).iter(batch_size=1024):
            for text in batch[cfg.text_column]:
                if budget.full:
                    break
                budget.add(f"{name}:{i}", str(text or ""))
                i += 1
    elif source == "listops":
        raise DataError("data.source='listops' is a classification task; set data.task=classification")
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(
                f"data.source {source!r} does not exist; allowed: 'stdlib', 'hf:NAME', or a file/folder path"
            )
        if path.is_dir():
            for f in folder_files(path):
                if budget.full:
                    break
                budget.add(f.relative_to(path).as_posix(), read_text(f, cfg.encoding, cfg.encoding_errors))
        elif path.suffix in (".jsonl", ".csv"):
            for name, row in table_rows(path, cfg.text_column, cfg):
                if budget.full:
                    break
                budget.add(name, str(row[cfg.text_column] or ""))
        else:
            budget.add(path.name, read_text(path, cfg.encoding, cfg.encoding_errors))
    if not budget.docs:
        raise DataError(f"no text found in {source!r}")
    return budget.docs


def holdout_indices(n: int, val_fraction: float, seed: int) -> set[int]:
    """Indices of ``round(n * val_fraction)`` held-out items (at least 1, at most n - 1; n >= 2),
    drawn by ``random.Random(seed)``."""
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    return set(random.Random(seed).sample(range(n), n_val))


def split_documents(docs: Sequence[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Hold out ``round(len(docs) * val_fraction)`` whole documents (at least one, and at least one
    left for training), chosen by ``random.Random(seed)``; both splits keep the input order.
    A single document is cut instead at the ``1 - val_fraction`` point of its text."""
    if not docs:
        raise DataError("cannot split an empty corpus")
    if len(docs) == 1:
        name, text = docs[0]
        if len(text) < 2:
            raise DataError(f"document {name!r} is too short ({len(text)} chars) to split into train and validation")
        cut = min(max(int(len(text) * (1.0 - val_fraction)), 1), len(text) - 1)
        return [(name, text[:cut])], [(f"{name}[val]", text[cut:])]
    val_idx = holdout_indices(len(docs), val_fraction, seed)
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


# ----------------------------------------------------------------------------------------------
# tokenising


@dataclass
class LMData:
    """A tokenised LM corpus: documents joined with ``eos_id`` between them.

    ``val_bytes`` counts the UTF-8 bytes of the validation documents plus one byte per separator,
    so bits per byte = ``val_loss_nats * val_tokens / (ln 2 * val_bytes)`` (for the byte tokenizer
    ``val_tokens == val_bytes``, and bits per byte is the loss in bits).
    """

    train: torch.Tensor  # (N,) int64
    val: torch.Tensor  # (M,) int64
    tokenizer: Tokenizer
    val_bytes: int
    val_tokens: int
    train_names: list[str]  # document names in the train split
    val_names: list[str]  # document names in the validation split


def tokenize_documents(texts: Sequence[str], tokenizer: Tokenizer) -> torch.Tensor:
    """Encode ``texts`` and join them with ``tokenizer.eos_id`` between documents.

    Returns:
        ids, shape ``(sum of token counts + len(texts) - 1,)``, int64.
    """
    sep = np.array([tokenizer.eos_id], dtype=np.int64)
    if isinstance(tokenizer, ByteTokenizer):  # vectorised: no Python loop over bytes
        pieces = [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]
    else:
        pieces = [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(list(texts))]
    joined: list[np.ndarray] = []
    for i, p in enumerate(pieces):
        if i:
            joined.append(sep)
        joined.append(p)
    return torch.from_numpy(np.concatenate(joined) if joined else np.zeros(0, dtype=np.int64))


def run_tokenizer(kind: str, run_dir: Path | None, make: Callable[[], Tokenizer]) -> Tokenizer:
    """The tokenizer of a run: ``run_dir/tokenizer.json`` if it exists (so a resumed run keeps its
    vocabulary), else ``make()``, saved into ``run_dir`` when given. ``kind`` must match the file."""
    if run_dir is not None and (Path(run_dir) / TOKENIZER_FILE).is_file():
        tok = load_tokenizer(run_dir)
        if tok.kind != kind:
            raise DataError(
                f"{str(Path(run_dir) / TOKENIZER_FILE)!r} holds a {tok.kind!r} tokenizer but this run needs"
                f" {kind!r} (data.tokenizer); use a fresh run folder or set data.tokenizer={tok.kind}"
            )
        return tok
    tok = make()
    if run_dir is not None:
        tok.save(run_dir)
    return tok


def _no_hf_tokenizer() -> Tokenizer:
    raise DataError(
        "data.tokenizer=hf reads the tokenizer.json of a run folder made by `routelab import hf`;"
        " this run folder has none (use the imported folder, or data.tokenizer=byte|bpe)"
    )


def text_tokenizer(cfg: DataConfig, train_texts: Sequence[str], run_dir: Path | None) -> Tokenizer:
    """``cfg.tokenizer`` for text: bytes, or a BPE trained on ``train_texts`` (see ``run_tokenizer``)."""
    if cfg.tokenizer == "byte":
        return run_tokenizer("byte", run_dir, ByteTokenizer)
    if cfg.tokenizer == "hf":
        return run_tokenizer("hf", run_dir, _no_hf_tokenizer)
    return run_tokenizer("bpe", run_dir, lambda: BPETokenizer.train(train_texts, cfg.bpe_vocab_size))


def load_lm_data(cfg: DataConfig, run_dir: Path | None = None) -> LMData:
    """Read ``cfg.source``, split by document, build the tokenizer on the train split, tokenise."""
    docs = read_texts(cfg.source, cfg)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.seed)
    train_texts = [t for _, t in train_docs]
    val_texts = [t for _, t in val_docs]
    tok = text_tokenizer(cfg, train_texts, run_dir)
    train = tokenize_documents(train_texts, tok)
    val = tokenize_documents(val_texts, tok)
    val_bytes = sum(len(t.encode("utf-8")) for t in val_texts) + len(val_texts) - 1
    return LMData(
        train=train,
        val=val,
        tokenizer=tok,
        val_bytes=val_bytes,
        val_tokens=int(val.numel()),
        train_names=[n for n, _ in train_docs],
        val_names=[n for n, _ in val_docs],
    )


# ----------------------------------------------------------------------------------------------
# batches


def _check_long_enough(tokens: torch.Tensor, seq_len: int, batch_size: int) -> None:
    if tokens.dim() != 1:
        raise DataError(f"token stream must be 1-D (N,), got shape {tuple(tokens.shape)}")
    if seq_len < 1 or batch_size < 1:
        raise DataError(f"seq_len={seq_len} and batch_size={batch_size} must both be >= 1")
    if tokens.numel() < seq_len + 1:
        raise DataError(
            f"this split has {tokens.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1};"
            " lower data.seq_len or use more text (data.max_bytes, data.val_fraction)"
        )


def sample_lm_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Random windows of ``tokens``; the same generator state gives the same batch.

    Args:
        tokens: (N,) int64 token stream, N >= seq_len + 1.
        batch_size: B windows.
        seq_len: T tokens per window.
        generator: a CPU ``torch.Generator``, advanced by one ``randint`` call.

    Returns:
        (B, T) int64; row b is ``tokens[s_b : s_b + T]`` with ``s_b`` uniform in ``[0, N - T]``.
    """
    _check_long_enough(tokens, seq_len, batch_size)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (batch_size,), generator=generator)  # (B,)
    return tokens[starts[:, None] + torch.arange(seq_len)]  # (B, T)


def lm_eval_batches(
    tokens: torch.Tensor, batch_size: int, seq_len: int, max_batches: int = 0
) -> Iterator[torch.Tensor]:
    """Non-overlapping windows in order, ``batch_size`` at a time; the last batch may be smaller and
    a tail shorter than ``seq_len`` is dropped. With ``max_batches``, the ``max_batches * batch_size``
    windows are spread evenly over the whole split (a sample of every part of it, not its first
    files), in order.

    Yields:
        (b, T) int64 with b <= B; at most ``max_batches`` batches (0 = all).
    """
    _check_long_enough(tokens, seq_len, batch_size)
    n_windows = tokens.numel() // seq_len
    windows = tokens[: n_windows * seq_len].reshape(n_windows, seq_len)  # (W, T)
    if 0 < max_batches and max_batches * batch_size < n_windows:
        keep = torch.arange(max_batches * batch_size) * n_windows // (max_batches * batch_size)  # evenly spaced
        windows = windows[keep]  # (max_batches * B, T)
    for i in range(math.ceil(windows.shape[0] / batch_size)):
        yield windows[i * batch_size : (i + 1) * batch_size]
