"""Classification: file loading and label mapping, collation, deterministic batch order."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from routelab.config import DataConfig
from routelab.data import (
    ByteTokenizer,
    DataError,
    ListOpsTokenizer,
    classification_batch,
    classification_batches,
    classification_eval_batches,
    collate_classification,
    load_classification_data,
    write_lra_tsv,
)

# ------------------------------------------------------------------ collate

TOK = ByteTokenizer()  # cls 259, pad 256
EXAMPLES = [([5, 6, 7], 1), ([8], 0)]


def test_collate_prepends_cls_and_pads() -> None:
    batch = collate_classification(EXAMPLES, TOK, max_len=8)
    assert batch["input_ids"].tolist() == [[259, 5, 6, 7], [259, 8, 256, 256]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]
    assert all(v.dtype == torch.long for v in batch.values())


def test_collate_too_long_raises_or_truncates() -> None:
    with pytest.raises(DataError, match=r"4 tokens.*max_len=3.*data\.truncate=true.*data\.seq_len"):
        collate_classification(EXAMPLES, TOK, max_len=3)
    batch = collate_classification(EXAMPLES, TOK, max_len=3, truncate=True)
    assert batch["input_ids"].tolist() == [[259, 5, 6], [259, 8, 256]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_collate_label_out_of_range() -> None:
    collate_classification(EXAMPLES, TOK, max_len=8, num_classes=2)
    with pytest.raises(DataError, match="label 2"):
        collate_classification([([1], 2)], TOK, max_len=8, num_classes=2)
    with pytest.raises(DataError, match="label -1"):
        collate_classification([([1], -1)], TOK, max_len=8, num_classes=2)


# ------------------------------------------------------------------ batch order

DATA = [([i], i % 3) for i in range(12)]


def test_batch_is_function_of_seed_and_step() -> None:
    a = classification_batch(DATA, 4, seed=7, step=5)
    assert a == classification_batch(DATA, 4, seed=7, step=5)
    assert a != classification_batch(DATA, 4, seed=8, step=5)
    resumed = classification_batches(DATA, 4, seed=7, step=5)
    assert next(resumed) == a and next(resumed) == classification_batch(DATA, 4, seed=7, step=6)
    epoch1 = torch.randperm(12, generator=torch.Generator().manual_seed(7 * 1_000_003 + 1)).tolist()
    assert a == [DATA[i] for i in epoch1[8:12]]  # step 5 = epoch 1, positions 8..11


def test_one_epoch_covers_each_example_once() -> None:
    it = classification_batches(DATA, 4, seed=0)
    seen = [x for _ in range(3) for ids, _ in next(it) for x in ids]
    assert sorted(seen) == list(range(12))
    # batches that straddle epochs: 10 examples, batches of 4, five steps = two full epochs
    data = DATA[:10]
    seen = [ids[0] for step in range(5) for ids, _ in classification_batch(data, 4, seed=1, step=step)]
    assert Counter(seen) == {i: 2 for i in range(10)}
    assert sorted(seen[:10]) == list(range(10))


def test_eval_batches_in_order() -> None:
    batches = list(classification_eval_batches(DATA[:10], 4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert [x for b in batches for x in b] == DATA[:10]


# ------------------------------------------------------------------ loading


def _jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_string_labels_sorted_and_val_split(tmp_path) -> None:
    labels = ["pos", "neg", "neutral", "pos"] * 5
    _jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": y} for i, y in enumerate(labels)])
    data = load_classification_data(
        DataConfig(source=str(tmp_path / "d.jsonl"), task="classification", val_fraction=0.25)
    )
    assert data.label_names == ["neg", "neutral", "pos"] and data.num_classes == 3
    assert (len(data.train), len(data.val), len(data.test)) == (15, 5, 0)
    for ids, y in data.train + data.val:
        i = int(TOK.decode(ids)[1:])
        assert data.label_names[y] == labels[i]


def test_folder_splits_int_labels_csv(tmp_path) -> None:
    for split, n in (("train", 6), ("dev", 2), ("test", 3)):
        (tmp_path / f"{split}.csv").write_text("text,label\n" + "".join(f"{split} é{i},{i % 4}\n" for i in range(n)))
    data = load_classification_data(DataConfig(source=str(tmp_path), task="classification"))
    assert (len(data.train), len(data.val), len(data.test)) == (6, 2, 3)
    assert data.num_classes == 4 and data.label_names is None
    assert data.val[1] == (list("dev é1".encode()), 1)


def test_sibling_files_and_lra_tsv(tmp_path) -> None:
    rows = {"train": [("[MAX 1 2 ]", 2), ("[MIN 1 2 ]", 1)], "val": [("[SM 5 6 ]", 1)], "test": [("[MED 1 3 ]", 2)]}
    for split, ex in rows.items():
        write_lra_tsv(tmp_path / f"basic_{split}.tsv", ex)
    run = tmp_path / "run"
    data = load_classification_data(DataConfig(source=str(tmp_path / "basic_train.tsv"), task="classification"), run)
    assert isinstance(data.tokenizer, ListOpsTokenizer) and data.num_classes == 10
    assert [(data.tokenizer.decode(i), y) for i, y in data.test] == rows["test"]
    assert (run / "tokenizer.json").is_file()


def test_bad_classification_sources(tmp_path) -> None:
    _jsonl(tmp_path / "d.jsonl", [{"text": "a", "y": 1}, {"text": "b", "y": 0}])
    with pytest.raises(DataError, match="label column 'label'"):
        load_classification_data(DataConfig(source=str(tmp_path / "d.jsonl"), task="classification"))
    _jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 0}])
    with pytest.raises(DataError, match="at least 2 classes"):
        load_classification_data(DataConfig(source=str(tmp_path / "one.jsonl"), task="classification"))
    with pytest.raises(DataError, match="missing.csv"):
        load_classification_data(DataConfig(source=str(tmp_path / "missing.csv"), task="classification"))
    (tmp_path / "x.txt").write_text("a")
    with pytest.raises(DataError, match=".jsonl"):
        load_classification_data(DataConfig(source=str(tmp_path / "x.txt"), task="classification"))


def _cls(source, **kw) -> DataConfig:
    return DataConfig(source=str(source), task="classification", **kw)


def test_empty_texts_named_and_counted(tmp_path) -> None:
    texts = ["good", "", "fine", "  \t", "ok", ""]
    _jsonl(tmp_path / "train.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(texts)])
    with pytest.raises(DataError) as e:
        load_classification_data(_cls(tmp_path))
    msg = str(e.value)
    assert msg.startswith("train.jsonl:2 has an empty text (column 'text'); 3 row(s)")
    assert "train.jsonl:2, train.jsonl:4, train.jsonl:6" in msg
    write_lra_tsv(tmp_path / "x_train.tsv", [("[MAX 1 2 ]", 2), ("", 0)])
    with pytest.raises(DataError, match=r"x_train\.tsv:3 has an empty text \(column 'Source'\)"):
        load_classification_data(_cls(tmp_path / "x_train.tsv"))


def test_labels_unseen_in_training_warned(tmp_path, caplog) -> None:
    _jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": ["neg", "pos"][i % 2]} for i in range(6)])
    _jsonl(tmp_path / "val.jsonl", [{"text": "v", "label": y} for y in ("pos", "meh", "meh", "neg")])
    _jsonl(tmp_path / "test.jsonl", [{"text": "t", "label": "neg"}])
    with caplog.at_level("WARNING", logger="routelab.data"):
        data = load_classification_data(_cls(tmp_path))
    assert data.label_names == ["meh", "neg", "pos"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["validation labels never seen in training: 'meh' (2 rows); the model cannot learn them"]


def test_integer_label_gaps_warned(tmp_path, caplog) -> None:
    _jsonl(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": [0, 7, 3][i % 3]} for i in range(30)])
    with caplog.at_level("WARNING", logger="routelab.data"):
        data = load_classification_data(_cls(tmp_path / "d.jsonl"))
    assert data.num_classes == 8
    (msg,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "8 classes (0..7)" in msg and "class ids 1, 2, 4..6 (5 of them) are never used" in msg
    assert "renumber the labels 0..2" in msg and "non-numeric strings" in msg
    caplog.clear()
    _jsonl(tmp_path / "full.jsonl", [{"text": f"t{i}", "label": i % 3} for i in range(30)])
    with caplog.at_level("WARNING", logger="routelab.data"):
        load_classification_data(_cls(tmp_path / "full.jsonl"))
    assert not caplog.records


def test_too_long_examples_found_at_load_time(tmp_path) -> None:
    texts = ["short", "x" * 9, "tiny", "y" * 12, "z" * 7]  # with <cls>: 6, 10, 5, 13, 8 tokens
    _jsonl(tmp_path / "train.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(texts)])
    _jsonl(tmp_path / "val.jsonl", [{"text": "a", "label": 0}])
    with pytest.raises(DataError) as e:
        load_classification_data(_cls(tmp_path, seq_len=8))
    msg = str(e.value)
    assert msg.startswith("train.jsonl:2 has 10 tokens with <cls>, more than data.seq_len=8; 2 of 6 examples")
    assert "the longest 13" in msg and "data.truncate=true" in msg and "data.seq_len to 13" in msg
    data = load_classification_data(_cls(tmp_path, seq_len=8, truncate=True))
    assert len(data.train) == 5  # cut later, when collated
    assert len(load_classification_data(_cls(tmp_path, seq_len=13)).train) == 5


def test_generated_listops_too_long_named(tmp_path) -> None:
    cfg = DataConfig(
        source="listops", task="classification", seq_len=40, listops_train=30, listops_val=5, listops_test=5
    )
    with pytest.raises(DataError) as e:
        load_classification_data(cfg)
    msg = str(e.value)
    assert msg.startswith("listops train example ") and "more than data.seq_len=40" in msg
    assert "lower data.listops_max_len to 39" in msg and "listops_min_len with it" not in msg
    with pytest.raises(DataError, match=r"every ListOps example has at least data.listops_min_len \+ 1 = 21 tokens"):
        load_classification_data(DataConfig(source="listops", task="classification", seq_len=16))


def test_folder_of_routelab_listops_output(tmp_path) -> None:
    rows = {"train": [("[MAX 1 2 ]", 2), ("[MIN 1 2 ]", 1)], "val": [("[SM 5 6 ]", 1)], "test": [("[MED 1 3 ]", 2)]}
    for split, ex in rows.items():
        write_lra_tsv(tmp_path / f"basic_{split}.tsv", ex)
    data = load_classification_data(_cls(tmp_path))
    as_file = load_classification_data(_cls(tmp_path / "basic_train.tsv"))
    assert (data.train, data.val, data.test) == (as_file.train, as_file.val, as_file.test)
    assert [(data.tokenizer.decode(i), y) for i, y in data.val] == rows["val"]
    write_lra_tsv(tmp_path / "other_train.tsv", rows["train"])
    with pytest.raises(DataError, match="several NAME_train files: basic_train.tsv, other_train.tsv"):
        load_classification_data(_cls(tmp_path))


def test_classification_files_decoded_with_data_encoding(tmp_path) -> None:
    (tmp_path / "d.csv").write_bytes(b"text,label\ncaf\xe9,0\nth\xe9,1\nok,0\nfine,1\n")
    with pytest.raises(DataError, match=r"d\.csv.*offset 14 \(line 2\).*data\.encoding"):
        load_classification_data(_cls(tmp_path / "d.csv"))
    data = load_classification_data(_cls(tmp_path / "d.csv", encoding="latin-1", val_fraction=0.25))
    texts = {TOK.decode(ids) for ids, _ in data.train + data.val}
    assert texts == {"café", "thé", "ok", "fine"}
