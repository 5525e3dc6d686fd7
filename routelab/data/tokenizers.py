"""Tokenizers: raw UTF-8 bytes (no training) and byte-level BPE (Sennrich et al. 2016; GPT-2's
byte-level variant, Radford et al. 2019) through the optional Hugging Face ``tokenizers`` package.

Every tokenizer has the same small interface (``Tokenizer`` below): four special ids
(``pad_id``, ``bos_id``, ``eos_id``, ``cls_id``), ``vocab_size``, ``encode``/``decode``,
``id_to_token`` and ``save(directory)``, which writes ``tokenizer.json``; ``load_tokenizer``
reads back any kind (byte, BPE, the ListOps vocabulary of the expressions in ``routelab.data.listops``,
or ``hf``: the tokenizer that came with an imported Hugging Face model, see ``HFTokenizer``).
``encode`` never adds special tokens; callers add BOS/EOS/CLS where their task needs them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from routelab.data.errors import DataError, hf_missing
from routelab.io import atomic_write, atomic_write_text

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<cls>")  # pad, bos, eos, cls: in this order everywhere


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of routelab needs from a tokenizer."""

    kind: str  # 'byte', 'bpe', 'listops' or 'hf'
    pad_id: int
    bos_id: int
    eos_id: int
    cls_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def id_to_token(self, i: int) -> str: ...

    def save(self, directory: str | Path) -> Path: ...


def as_id_list(ids: Any) -> list[int]:
    """Turn a list, tuple or 1-D tensor/array of ids into a list of Python ints."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


def check_ids(ids: list[int], vocab_size: int, kind: str) -> None:
    """Raise ``DataError`` naming the first id outside ``[0, vocab_size)``."""
    for i in ids:
        if not 0 <= i < vocab_size:
            raise DataError(f"token id {i} is outside the {kind} tokenizer's vocabulary [0, {vocab_size})")


def write_json(directory: str | Path, data: dict) -> Path:
    """Write ``data`` as ``directory/tokenizer.json`` (creating the folder); return the file path."""
    path = Path(directory) / TOKENIZER_FILE
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")
    return path


# ----------------------------------------------------------------------------------------------
# bytes


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then ``<pad>``=256, ``<s>``=257, ``</s>``=258, ``<cls>``=259."""

    kind = "byte"
    pad_id = 256
    bos_id = 257
    eos_id = 258
    cls_id = 259
    vocab_size = 260

    def encode(self, text: str) -> list[int]:
        """Return the UTF-8 bytes of ``text`` as ids, shape ``(len(text.encode()),)``; no specials."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Return the text of ``ids``, skipping special ids; invalid UTF-8 becomes U+FFFD."""
        ids = as_id_list(ids)
        check_ids(ids, self.vocab_size, self.kind)
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def id_to_token(self, i: int) -> str:
        """Printable ASCII as itself, other bytes as ``<0xNN>``, specials by name."""
        check_ids([int(i)], self.vocab_size, self.kind)
        if i >= 256:
            return SPECIAL_TOKENS[i - 256]
        return chr(i) if 32 <= i < 127 else f"<0x{i:02X}>"

    def save(self, directory: str | Path) -> Path:
        return write_json(
            directory,
            {
                "routelab_tokenizer": "byte",
                "vocab_size": self.vocab_size,
                "special_tokens": dict(zip(SPECIAL_TOKENS, range(256, 260))),
            },
        )

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=260)"


# ----------------------------------------------------------------------------------------------
# byte-level BPE (optional dependency)


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise hf_missing("tokenizers") from None
    return tokenizers


class _TokenizersBacked:
    """encode/decode of the kinds that wrap a Hugging Face ``tokenizers.Tokenizer`` (``self._tok``)."""

    kind: str
    vocab_size: int
    _tok: Any

    def encode(self, text: str) -> list[int]:
        """Return the ids of ``text``, shape ``(n_tokens,)``; no specials added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (parallel in Rust)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        ids = as_id_list(ids)
        check_ids(ids, self.vocab_size, self.kind)
        return self._tok.decode(ids, skip_special_tokens=True)

    def id_to_token(self, i: int) -> str:
        check_ids([int(i)], self.vocab_size, self.kind)
        return self._tok.id_to_token(int(i))


class BPETokenizer(_TokenizersBacked):
    """Byte-level BPE from Hugging Face ``tokenizers``; specials ``<pad> <s> </s> <cls>`` are ids 0..3.

    Text that happens to contain ``"<s>"`` etc. is encoded as ordinary text, never as a special id.
    """

    kind = "bpe"

    def __init__(self, hf_tokenizer: Any) -> None:
        self._tok = hf_tokenizer
        self._tok.encode_special_tokens = True  # literal "<s>" in a text stays text
        ids = [self._tok.token_to_id(t) for t in SPECIAL_TOKENS]
        missing = [t for t, i in zip(SPECIAL_TOKENS, ids) if i is None]
        if missing:
            raise DataError(f"BPE tokenizer lacks the special tokens {missing}; it needs all of {list(SPECIAL_TOKENS)}")
        self.pad_id, self.bos_id, self.eos_id, self.cls_id = ids
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn merges from ``texts`` until the vocabulary has ``vocab_size`` entries (or no pair is left).

        Args:
            texts: training documents (the train split only).
            vocab_size: target size including the 256 byte symbols and the 4 specials (>= 260).
        """
        if vocab_size < 260:
            raise DataError(f"bpe_vocab_size={vocab_size} is too small; allowed: >= 260 (256 bytes + 4 specials)")
        tk = _import_tokenizers()
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        tk = _import_tokenizers()
        try:
            return cls(tk.Tokenizer.from_file(str(path)))
        except Exception as e:  # the Rust side raises a bare Exception on a malformed file
            if isinstance(e, DataError):
                raise
            raise DataError(f"{str(path)!r} is not a readable BPE tokenizer file: {e}") from None

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TOKENIZER_FILE
        atomic_write(path, self._tok.save)
        return path

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


# ----------------------------------------------------------------------------------------------
# a pretrained model's own tokenizer (optional dependency)

SPECIAL_ROLES = ("pad", "bos", "eos", "cls")


class HFTokenizer(_TokenizersBacked):
    """The ``tokenizer.json`` of a Hugging Face model folder, through ``tokenizers``, with the four
    special ids routelab needs chosen from the folder's files (``from_folder``).

    ``encode`` adds nothing, as every routelab tokenizer; ``encode_with_specials`` applies the model's
    own template (BERT: ``[CLS] ... [SEP]``; Llama: ``<s> ...``). Saved as ``tokenizer.json`` holding
    ``{"routelab_tokenizer": "hf", "special_ids": {...}, "tokenizer": <the Hugging Face file>}``.
    """

    kind = "hf"

    def __init__(self, hf_tokenizer: Any, special_ids: dict[str, int]) -> None:
        self._tok = hf_tokenizer
        self._tok.no_padding()  # a file may pad/truncate to the model's length; routelab's collators do that
        self._tok.no_truncation()
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        missing = [r for r in SPECIAL_ROLES if not isinstance(special_ids.get(r), int)]
        if missing:
            raise DataError(f"hf tokenizer: special ids {missing} are not set; it needs ids for all of {list(SPECIAL_ROLES)}")
        self.special_ids = {r: int(special_ids[r]) for r in SPECIAL_ROLES}
        self.pad_id, self.bos_id, self.eos_id, self.cls_id = (self.special_ids[r] for r in SPECIAL_ROLES)

    @classmethod
    def from_folder(cls, folder: str | Path, model_config: dict | None = None) -> HFTokenizer:
        """Read ``folder/tokenizer.json`` and choose the specials from ``special_tokens_map.json``,
        ``tokenizer_config.json`` and the model's ``config.json`` ids, in that order:

        - BERT-style (a ``cls_token``): cls = bos = ``[CLS]``, eos = ``[SEP]``, pad = ``[PAD]``.
        - Llama-style: bos = ``<s>`` (cls = bos: decoders have no CLS), eos = ``</s>``; without a
          pad token, pad = eos (padded positions are masked out, so only its being a valid id matters).
        """
        tk = _import_tokenizers()
        folder = Path(folder)
        file = folder / TOKENIZER_FILE
        if not file.is_file():
            raise DataError(f"{str(folder)!r} has no {TOKENIZER_FILE}; the import needs the model's tokenizer as a tokenizers file")
        try:
            tok = tk.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception on a malformed file
            raise DataError(f"{str(file)!r} is not a readable tokenizers file: {e}") from None
        names: dict[str, str] = {}
        for extra in ("tokenizer_config.json", "special_tokens_map.json"):  # the later one wins
            path = folder / extra
            if path.is_file():
                data = json.loads(path.read_text(encoding="utf-8"))
                for role in ("pad", "bos", "eos", "cls", "sep", "unk"):
                    value = data.get(f"{role}_token")
                    value = value.get("content") if isinstance(value, dict) else value
                    if isinstance(value, str):
                        names[role] = value
        ids = {role: tok.token_to_id(name) for role, name in names.items()}
        ids = {role: i for role, i in ids.items() if i is not None}
        for role in ("pad", "bos", "eos"):  # the model config's ids where the tokenizer files are silent
            value = (model_config or {}).get(f"{role}_token_id")
            value = value[0] if isinstance(value, list) and value else value
            if role not in ids and isinstance(value, int):
                ids[role] = value
        eos = ids.get("sep", ids.get("eos")) if "cls" in ids else ids.get("eos", ids.get("sep"))
        bos = ids.get("cls", ids.get("bos")) if "cls" in ids else ids.get("bos", eos)
        special = {"eos": eos, "bos": bos, "cls": ids.get("cls", bos), "pad": ids.get("pad", eos)}
        if eos is None:
            raise DataError(f"{str(folder)!r}: no end-of-sequence token found (eos_token or sep_token in special_tokens_map.json / tokenizer_config.json, or eos_token_id in config.json)")
        return cls(tok, special)

    @classmethod
    def from_dict(cls, data: dict, path: str | Path) -> HFTokenizer:
        tk = _import_tokenizers()
        try:
            tok = tk.Tokenizer.from_str(json.dumps(data["tokenizer"]))
        except Exception as e:
            raise DataError(f"{str(path)!r} does not hold a readable hf tokenizer: {e}") from None
        return cls(tok, data.get("special_ids") or {})

    def encode_with_specials(self, text: str) -> list[int]:
        """The ids the original model saw: its own template of special tokens around ``text``."""
        return self._tok.encode(text, add_special_tokens=True).ids

    def save(self, directory: str | Path) -> Path:
        data = {"routelab_tokenizer": "hf", "special_ids": self.special_ids, "tokenizer": json.loads(self._tok.to_str())}
        return write_json(directory, data)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, special_ids={self.special_ids})"


# ----------------------------------------------------------------------------------------------
# ListOps: whitespace tokens of the expressions in routelab.data.listops

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")  # ListOps operators (Nangia & Bowman 2018), each opening a bracket
END = "]"  # closes an operator's argument list


class ListOpsTokenizer:
    """Whitespace tokens: specials ``<pad> <s> </s> <cls>`` = 0..3, digits 0..9 = 4..13,
    ``[MIN [MAX [MED [SM`` = 14..17, ``]`` = 18."""

    kind = "listops"
    pad_id = 0
    bos_id = 1
    eos_id = 2
    cls_id = 3

    def __init__(self) -> None:
        self.vocab: list[str] = [*SPECIAL_TOKENS, *map(str, range(10)), *OPERATORS, END]
        self.vocab_size = len(self.vocab)
        self._ids = {t: i for i, t in enumerate(self.vocab)}

    @classmethod
    def from_dict(cls, data: dict) -> ListOpsTokenizer:
        tok = cls()
        if data.get("vocab") != tok.vocab:
            raise DataError(f"saved ListOps vocabulary {data.get('vocab')!r} differs from this version's {tok.vocab!r}")
        return tok

    def encode(self, text: str) -> list[int]:
        """Split ``text`` on whitespace and map each token; an unknown token raises ``DataError``."""
        ids = []
        for tok in text.split():
            i = self._ids.get(tok)
            if i is None:
                raise DataError(f"unknown ListOps token {tok!r}; allowed: {' '.join(self.vocab[4:])}")
            ids.append(i)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Tokens joined by spaces, specials skipped."""
        ids = as_id_list(ids)
        check_ids(ids, self.vocab_size, self.kind)
        return " ".join(self.vocab[i] for i in ids if i >= 4)

    def id_to_token(self, i: int) -> str:
        check_ids([int(i)], self.vocab_size, self.kind)
        return self.vocab[int(i)]

    def save(self, directory: str | Path) -> Path:
        return write_json(directory, {"routelab_tokenizer": "listops", "vocab": self.vocab})

    def __repr__(self) -> str:
        return f"ListOpsTokenizer(vocab_size={self.vocab_size})"


# ----------------------------------------------------------------------------------------------
# loading


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer saved by any ``save``: ``path`` is the folder or its ``tokenizer.json``."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"no tokenizer at {str(path)!r}: expected a folder holding {TOKENIZER_FILE} or that file")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{str(file)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"{str(file)!r} does not describe a tokenizer (expected a JSON object)")
    kind = data.get("routelab_tokenizer")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "listops":
        return ListOpsTokenizer.from_dict(data)
    if kind == "hf":
        return HFTokenizer.from_dict(data, file)
    if kind is None and "model" in data:  # a Hugging Face tokenizers file
        return BPETokenizer.from_file(file)
    raise DataError(f"{str(file)!r} has unknown tokenizer kind {kind!r}; allowed: 'byte', 'listops', 'hf', or a BPE file")
