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
