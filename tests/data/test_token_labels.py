"""Token classification data: word -> token alignment, collation with -100, the loss over scored
tokens only (hand-computed), JSONL loading and its refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch

from routelab.config import Config, ConfigError, DataConfig
from routelab.data import (
    IGNORE_INDEX,
    BPETokenizer,
    ByteTokenizer,
    DataError,
    TokenClassificationData,
    align_words,
    collate_token_labels,
    load_labelled_data,
)
from routelab.model import IGNORE_INDEX as MODEL_IGNORE_INDEX
from routelab.model import RoutedTransformer
from tests.conftest import tiny_config

TOK = ByteTokenizer()  # pad 256
X = IGNORE_INDEX


def test_ignore_index_is_the_models() -> None:
    assert IGNORE_INDEX == MODEL_IGNORE_INDEX == -100


def test_byte_alignment_first_byte_of_each_word_with_multibyte_characters() -> None:
    ids, labels = align_words(["é", "ab", "€c"], [1, 2, 0], TOK)
    assert ids == [0xC3, 0xA9, 32, 97, 98, 32, 0xE2, 0x82, 0xAC, 99]  # "é ab €c" in UTF-8
    assert labels == [1, X, X, 2, X, X, 0, X, X, X]  # the separating space and later bytes: -100


def test_bpe_alignment_one_scored_token_per_word() -> None:
    words = ["def", "tokenize_words", "(", "é", ")"]
    tok = BPETokenizer.train([" ".join(words)] * 20 + ["def f ( x ) : return é"] * 5, 300)
    ids, labels = align_words(words, [0, 1, 2, 3, 2], tok)
    assert len(ids) == len(labels) and tok.decode(ids) == " ".join(words)
    assert [y for y in labels if y != X] == [0, 1, 2, 3, 2]  # exactly one scored token per word, in order
    first = [i for i, y in enumerate(labels) if y != X]
    assert tok.decode(ids[first[1] :]).lstrip().startswith("tokenize_words"[:1])


def test_collate_pads_with_pad_and_ignore() -> None:
    batch = collate_token_labels([([5, 6, 7], [1, X, 0]), ([8], [2])], TOK, max_len=8, num_classes=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 256, 256]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, X, 0], [2, X, X]]
    with pytest.raises(DataError, match="3 tokens, more than max_len=2"):
        collate_token_labels([([5, 6, 7], [1, X, 0])], TOK, max_len=2)
    cut = collate_token_labels([([5, 6, 7], [1, X, 0])], TOK, max_len=2, truncate=True)
    assert cut["input_ids"].tolist() == [[5, 6]] and cut["labels"].tolist() == [[1, X]]
    with pytest.raises(DataError, match="2 tokens but 1 labels"):
        collate_token_labels([([5, 6], [1])], TOK, max_len=8)
    with pytest.raises(DataError, match="label of the batch is 3"):
        collate_token_labels([([5], [3])], TOK, max_len=8, num_classes=3)


def test_loss_skips_padding_and_ignored_tokens_hand_computed() -> None:
    """Cross-entropy = mean over the 3 scored positions only; what padding/ignored positions hold
    does not change it."""
    model = RoutedTransformer(tiny_config(head="token_classification", num_labels=2))
    batch = collate_token_labels([([5, 6, 7], [1, X, 0]), ([8], [1])], TOK, max_len=8)
    labels = batch["labels"]  # (2, 3): scored (0,0)=1, (0,2)=0, (1,0)=1
    logits = torch.zeros(2, 3, 2)
    logits[0, 0] = torch.tensor([0.0, 2.0])
    logits[0, 2] = torch.tensor([1.0, -1.0])
    logits[1, 0] = torch.tensor([0.5, 0.5])
    nll = [math.log(1 + math.exp(-2.0)), math.log(1 + math.exp(-2.0)), math.log(2.0)]
    assert model.task_loss(logits, labels).item() == pytest.approx(sum(nll) / 3, abs=1e-6)
    logits[0, 1] = torch.tensor([9.0, -9.0])  # an ignored position
    logits[1, 1:] = torch.tensor([-7.0, 7.0])  # padding
    assert model.task_loss(logits, labels).item() == pytest.approx(sum(nll) / 3, abs=1e-6)


# ------------------------------------------------------------------ files


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


ROWS = [
    {"tokens": ["def", "f", "(", ")", ":"], "labels": ["kw", "name", "op", "op", "op"]},
    {"tokens": ["x", "=", "1"], "labels": ["name", "op", "num"]},
    {"tokens": ["return", "x"], "labels": ["kw", "name"]},
]


def token_cfg(source, **kw) -> DataConfig:
    return DataConfig(**{"source": str(source), "task": "token_classification", "seq_len": 32, **kw})


def test_load_jsonl_folder(tmp_path) -> None:
    write_jsonl(tmp_path / "train.jsonl", ROWS * 3)
    write_jsonl(tmp_path / "val.jsonl", ROWS[1:2])
    data = load_labelled_data(token_cfg(tmp_path))
    assert isinstance(data, TokenClassificationData)
    assert data.label_names == ["kw", "name", "num", "op"] and data.num_classes == 4
    assert len(data.train) == 9 and len(data.val) == 1 and data.test == []
    ids, labels = data.val[0]
    assert bytes(ids).decode() == "x = 1"
    assert labels == [1, X, 3, X, 2]
    batch = data.collate(data.train[:2], 32)
    assert batch["labels"].shape == batch["input_ids"].shape == (2, len("def f ( ) :"))


def test_load_single_file_holds_out_rows(tmp_path) -> None:
    write_jsonl(tmp_path / "tags.jsonl", ROWS * 10)
    data = load_labelled_data(token_cfg(tmp_path / "tags.jsonl", val_fraction=0.2))
    assert len(data.train) == 24 and len(data.val) == 6


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([{"tokens": ["a", "b"], "labels": ["x"]}], r"train\.jsonl:1 .* has 2 words but 1 labels"),
        ([{"tokens": [], "labels": []}], r"train\.jsonl:1 .* has no words"),
        ([{"tokens": ["a", ""], "labels": ["x", "y"]}], "word 1 is an empty string"),
        ([{"text": "a b", "labels": ["x", "y"]}], "has no column 'tokens'"),
        ([{"tokens": "a b", "labels": ["x", "y"]}], "must be a list of strings"),
        ([{"tokens": ["a"], "labels": [None]}], "has the label None"),
    ],
)
def test_bad_rows_are_one_clear_error(tmp_path, rows, match) -> None:
    write_jsonl(tmp_path / "train.jsonl", [*ROWS, *rows])
    write_jsonl(tmp_path / "val.jsonl", ROWS[:1])
    rows_text = (tmp_path / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join([rows_text[-1], *rows_text[:-1]]) + "\n")  # bad row first
    with pytest.raises(DataError, match=match):
        load_labelled_data(token_cfg(tmp_path))


def test_unknown_label_in_validation_is_refused(tmp_path) -> None:
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "val.jsonl", [{"tokens": ["import", "os"], "labels": ["kw", "module"]}])
    with pytest.raises(DataError, match="validation labels never seen in training: 'module'"):
        load_labelled_data(token_cfg(tmp_path))


def test_too_long_refused_or_truncated(tmp_path) -> None:
    write_jsonl(tmp_path / "train.jsonl", ROWS * 2)
    write_jsonl(tmp_path / "val.jsonl", ROWS[:1])
    with pytest.raises(DataError, match=r"train\.jsonl:1 has 11 tokens, more than data.seq_len=8"):
        load_labelled_data(token_cfg(tmp_path, seq_len=8))
    data = load_labelled_data(token_cfg(tmp_path, seq_len=8, truncate=True))
    assert data.collate(data.train[:1], 8, truncate=True)["labels"].tolist() == [[0, X, X, X, 1, X, 3, X]]


def test_csv_is_refused_for_token_labels(tmp_path) -> None:
    (tmp_path / "train.csv").write_text("tokens,labels\na,b\n")
    with pytest.raises(DataError, match="token classification reads .jsonl files"):
        load_labelled_data(token_cfg(tmp_path))


def test_head_must_match_the_task() -> None:
    with pytest.raises(ConfigError, match="data.task"):
        Config.from_dict({"model": {"head": "classification"}, "data": {"source": "stdlib-tokens", "task": "token_classification"}})
