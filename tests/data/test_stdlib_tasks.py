"""The built-in stdlib tasks: the byte tagger (hand-written expectations), stdlib-tokens windows and
splits, stdlib-packages (split by file, balanced, deterministic), and their refusals."""

from __future__ import annotations

import numpy as np
import pytest

from routelab.config import DataConfig
from routelab.data import (
    PACKAGES,
    TAG_NAMES,
    DataError,
    TokenClassificationData,
    load_labelled_data,
    load_stdlib_packages,
    load_stdlib_tokens,
    split_files,
    tag_bytes,
)
from routelab.data.decoding import read_python_source
from routelab.data.stdlib_tasks import package_files, split_by_bytes, tagged_stdlib_files

# one letter per tag, to write expectations character by character under the source
CODE = {".": "space", "n": "newline", "c": "comment", "k": "keyword", "a": "name", "1": "number", "s": "string", "o": "operator"}


def expected_byte_tags(text: str, letters: str) -> list[str]:
    """``letters[i]`` is the tag of character i; a character of k UTF-8 bytes gives k tags."""
    assert len(text) == len(letters)
    return [CODE[c] for ch, c in zip(text, letters) for _ in ch.encode("utf-8")]


SNIPPETS = [
    (  # keywords, names, operators, numbers, a comment and a string with two-byte characters
        'def f(x):\n    return x + 1  # é\ns = "ü"\n',
        "kkk.aoaoon" "....kkkkkk.a.o.1..cccn" "a.o.sssn",
    ),
    (  # a soft keyword is a name; True/None are keywords; an f-string is one string; hex number
        'match = True\ny = f"{match!r}" if None else 0x1F\n',
        "aaaaa.o.kkkkn" "a.o." + "s" * 12 + ".kk.kkkk.kkkk.1111n",
    ),
    (  # indentation, a blank line, a comment line, a line continuation, a multi-line string
        'if x:\n    pass\n\n# done\nz = 1 + \\\n    2\nd = """a\nb"""\n',
        "kk.aon" "....kkkkn" "n" "ccccccn" "a.o.1.o" "......." "1n" "a.o." + "s" * 9 + "n",
    ),
]


@pytest.mark.parametrize(("text", "letters"), SNIPPETS)
def test_tags_of_hand_written_snippets(text: str, letters: str) -> None:
    ids, tags = tag_bytes(text)
    assert ids.tolist() == list(text.encode("utf-8"))
    assert [TAG_NAMES[t] for t in tags] == expected_byte_tags(text, letters)


def test_tokenize_refusal_is_a_data_error() -> None:
    with pytest.raises(DataError, match="tokenize refuses"):
        tag_bytes('s = """never closed\n')


def test_real_stdlib_files_every_byte_tagged_and_deterministic() -> None:
    docs = tagged_stdlib_files(max_bytes=300_000, seed=3)
    assert sum(len(ids) for _, ids, _ in docs) == 300_000
    assert [name for name, _, _ in docs] == sorted(name for name, _, _ in docs)
    again = tagged_stdlib_files(max_bytes=300_000, seed=3)
    assert [n for n, _, _ in again] == [n for n, _, _ in docs]
    for (_, ids, tags), (_, ids2, tags2) in zip(docs, again):
        assert len(ids) == len(tags) and np.array_equal(ids, ids2) and np.array_equal(tags, tags2)
        assert tags.min() >= 0 and tags.max() < len(TAG_NAMES)
    every = np.concatenate([tags for _, _, tags in docs])
    assert set(np.unique(every).tolist()) == set(range(len(TAG_NAMES)))  # every class occurs


def test_utf8_continuation_bytes_share_their_characters_tag() -> None:
    """On stdlib files with non-ASCII text: each continuation byte (0x80..0xBF) has the tag of the byte
    before it, and the byte count matches the file's UTF-8 encoding (character -> byte offsets)."""
    from routelab.data.corpus import stdlib_files

    checked = 0
    for path in stdlib_files():
        text = read_python_source(path)
        if text.isascii():
            continue
        ids, tags = tag_bytes(text)
        assert len(ids) == len(text.encode("utf-8"))
        cont = np.flatnonzero((ids >= 0x80) & (ids < 0xC0))
        assert np.array_equal(tags[cont], tags[cont - 1])
        checked += 1
        if checked == 5:
            break
    assert checked == 5


def test_split_files_is_three_disjoint_parts_like_the_corpus_split() -> None:
    from routelab.data import split_documents

    items = [(f"f{i}", "x") for i in range(40)]
    train, val, test = split_files(items, 0.1, seed=5)
    assert len(val) == len(test) == 4 and len(train) == 32
    assert {n for n, _ in train} | {n for n, _ in val} | {n for n, _ in test} == {n for n, _ in items}
    assert val == split_documents(items, 0.1, 5)[1]  # the LM corpus holds out the same files
    with pytest.raises(DataError, match="at least 3 files"):
        split_files(items[:2], 0.1, 0)


# ------------------------------------------------------------------ stdlib-tokens


def tokens_cfg(**kw) -> DataConfig:
    return DataConfig(**{"source": "stdlib-tokens", "task": "token_classification", "seq_len": 64, "max_bytes": 200_000, **kw})


def test_stdlib_tokens_windows() -> None:
    data = load_labelled_data(tokens_cfg())
    assert isinstance(data, TokenClassificationData)
    assert data.label_names == list(TAG_NAMES) and data.num_classes == 8
    assert data.train and data.val and data.test
    for split in (data.train, data.val, data.test):
        for ids, labels in split:
            assert 1 <= len(ids) == len(labels) <= 64
            assert all(0 <= y < 8 for y in labels) and all(0 <= i < 256 for i in ids)
    total = sum(len(ids) for s in (data.train, data.val, data.test) for ids, _ in s)
    assert total == 200_000
    again = load_stdlib_tokens(tokens_cfg())
    assert again.train == data.train and again.val == data.val


def test_stdlib_tokens_refuses_other_tokenizers_and_tasks() -> None:
    with pytest.raises(DataError, match="data.tokenizer=byte"):
        load_labelled_data(tokens_cfg(tokenizer="bpe"))
    with pytest.raises(DataError, match="is a 'token_classification' task.*data.task=token_classification"):
        load_labelled_data(tokens_cfg(task="classification"))


# ------------------------------------------------------------------ stdlib-packages


def packages_cfg(**kw) -> DataConfig:
    return DataConfig(**{"source": "stdlib-packages", "task": "classification", "seq_len": 128, "val_fraction": 0.1, **kw})


def test_packages_split_by_file_no_file_in_two_splits() -> None:
    packages = package_files()
    assert sorted(packages) == sorted(PACKAGES)  # all present in this Python
    for files in packages.values():
        parts = split_by_bytes(files, 0.1, seed=0)
        names = [{n for n, _ in p} for p in parts]
        assert all(names)  # every split has a file of every package
        assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
        assert names[0] | names[1] | names[2] == {n for n, _ in files}


def test_packages_balanced_deterministic_and_labels_seen_in_training() -> None:
    data = load_stdlib_packages(packages_cfg())
    assert data.label_names == sorted(PACKAGES) and data.num_classes == len(PACKAGES)
    for split in (data.train, data.val, data.test):
        counts = np.bincount([y for _, y in split], minlength=data.num_classes)
        assert len(set(counts.tolist())) == 1 and counts[0] > 0  # balanced
        assert all(len(ids) == 127 for ids, _ in split)  # seq_len - 1: room for <cls>
        assert [y for _, y in split[: data.num_classes]] == list(range(data.num_classes))  # interleaved
    assert {y for _, y in data.val} <= {y for _, y in data.train}
    assert {y for _, y in data.test} <= {y for _, y in data.train}
    again = load_stdlib_packages(packages_cfg())
    assert again.train == data.train and again.val == data.val and again.test == data.test
    train_snippets = {bytes(ids) for ids, _ in data.train}
    shared = sum(bytes(ids) in train_snippets for ids, _ in data.val + data.test)
    assert shared <= 0.01 * len(data.val + data.test)  # only license headers repeated across files (3 here)


def test_packages_refusals() -> None:
    with pytest.raises(DataError, match="data.tokenizer=byte"):
        load_labelled_data(packages_cfg(tokenizer="bpe"))
    with pytest.raises(DataError, match="is a 'classification' task"):
        load_labelled_data(packages_cfg(task="token_classification"))
    with pytest.raises(DataError, match="lower data.seq_len"):
        load_labelled_data(packages_cfg(seq_len=200_000))


def test_a_task_with_an_unknown_source_names_the_key_the_value_and_the_sources(tmp_path, capsys) -> None:
    """A mistyped built-in source in ``data.tasks``: one line naming ``data.tasks[NAME].source``, the
    value, the built-in sources (and the nearest one); a file source without a head asks for the head."""
    from routelab.cli import main
    from routelab.config import ConfigError, TaskConfig

    with pytest.raises(ConfigError) as e:
        TaskConfig(name="code", source="stdlb")
    assert str(e.value).startswith("data.tasks[code].source='stdlb' is invalid (did you mean 'stdlib'?); allowed: a built-in")
    assert all(repr(s) in str(e.value) for s in ("stdlib", "listops", "stdlib-packages", "stdlib-tokens"))
    text = tmp_path / "text.txt"
    text.write_text("some text\n")
    with pytest.raises(ConfigError, match=r"data.tasks\[code\].head is unset; source '.*text.txt' is not built in, so set data.tasks\[code\].head: one of"):
        TaskConfig(name="code", source=str(text))
    code = main(["train", "multitask-tiny", "--set", "data.tasks=[{name: a, source: stdlb}]", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("routelab: error:")] == [
        "routelab: error: data.tasks[a].source='stdlb' is invalid (did you mean 'stdlib'?); allowed: a built-in source"
        " ('stdlib', 'listops', 'stdlib-packages', 'stdlib-tokens'), or an existing file/folder path or 'hf:NAME' with"
        " data.tasks[a].head set"
    ]
