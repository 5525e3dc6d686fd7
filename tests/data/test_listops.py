"""ListOps: labels against an independent evaluator, length bounds, uniqueness, determinism, TSV."""

from __future__ import annotations

import pytest

from routelab.config import DataConfig
from routelab.data import (
    DataError,
    ListOpsTokenizer,
    evaluate_listops,
    generate_listops,
    load_classification_data,
    load_tokenizer,
    read_lra_tsv,
    write_lra_tsv,
)
from routelab.data.listops import listops_splits, max_listops_len

from .listops_oracle import evaluate, parse

KW = dict(min_len=20, max_len=120, max_depth=10, max_args=10)


@pytest.fixture(scope="module")
def examples() -> list[tuple[str, int]]:
    return generate_listops(500, seed=0, **KW)


def test_hand_written_example() -> None:
    text = "[MED 1 2 [SM 9 9 ] ]"  # median(1, 2, (9 + 9) % 10 = 8) = 2
    tok = ListOpsTokenizer()
    assert [tok.id_to_token(i) for i in tok.encode(text)] == ["[MED", "1", "2", "[SM", "9", "9", "]", "]"]
    assert evaluate(text) == 2
    assert evaluate_listops(text) == 2
    assert evaluate_listops("[MED 1 2 3 9 ]") == 2  # int(median) = int(2.5)
    assert evaluate_listops("[MAX 2 9 [MIN 4 7 ] 0 ]") == 9


def test_every_label_matches_independent_evaluator(examples: list[tuple[str, int]]) -> None:
    for text, label in examples:
        assert 0 <= label <= 9
        assert evaluate(text) == label, text


def test_tree_shape_follows_config() -> None:
    for text, _ in generate_listops(300, min_len=4, max_len=60, max_depth=4, max_args=5, seed=1):
        tokens = text.split()
        assert tokens[0].startswith("[")  # the root is always an operator
        _, _, deepest, counts = parse(tokens)
        assert deepest <= 4
        assert all(2 <= c <= 5 for c in counts)


def test_length_bounds_and_no_duplicates(examples: list[tuple[str, int]]) -> None:
    lengths = [len(t.split()) for t, _ in examples]
    assert min(lengths) >= 20 and max(lengths) <= 120
    assert len({t for t, _ in examples}) == len(examples)
    tight = generate_listops(50, min_len=30, max_len=32, max_depth=10, max_args=10, seed=3)
    assert {len(t.split()) for t, _ in tight} <= {30, 31, 32}


def test_labels_are_varied(examples: list[tuple[str, int]]) -> None:
    assert len({label for _, label in examples}) == 10


def test_deterministic_per_seed(examples: list[tuple[str, int]]) -> None:
    assert generate_listops(500, seed=0, **KW) == examples
    assert generate_listops(500, seed=1, **KW) != examples


def test_exclude_is_respected() -> None:
    first = generate_listops(200, min_len=4, max_len=8, max_depth=3, max_args=3, seed=0)
    again = generate_listops(200, min_len=4, max_len=8, max_depth=3, max_args=3, seed=0, exclude={t for t, _ in first})
    assert not {t for t, _ in first} & {t for t, _ in again}


def test_splits_are_disjoint() -> None:
    train, val, test = listops_splits(300, 100, 100, seed=0, **KW)
    sets = [{t for t, _ in s} for s in (train, val, test)]
    assert [len(s) for s in sets] == [300, 100, 100]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    # val/test do not move when the train size changes
    _, val2, test2 = listops_splits(10, 100, 100, seed=0, **KW)
    assert (val2, test2) == (val, test)


def test_impossible_bounds_raise() -> None:
    assert max_listops_len(2, 2) == 4  # one operator with two values
    assert max_listops_len(3, 2) == 2 + 2 * 4
    with pytest.raises(DataError, match="impossible"):
        generate_listops(1, min_len=5, max_len=9, max_depth=2, max_args=2, seed=0)
    with pytest.raises(DataError, match="max_depth"):
        generate_listops(1, min_len=1, max_len=9, max_depth=1, max_args=2, seed=0)
    with pytest.raises(DataError, match="distinct"):  # 4 operators x 10 x 10 values = 400 distinct trees
        generate_listops(401, min_len=4, max_len=4, max_depth=2, max_args=2, seed=0)


def test_tsv_round_trip(tmp_path, examples: list[tuple[str, int]]) -> None:
    path = tmp_path / "basic_train.tsv"
    write_lra_tsv(path, examples[:20])
    assert path.read_text().splitlines()[0] == "Source\tTarget"
    assert read_lra_tsv(path) == examples[:20]


def test_reads_lra_released_format(tmp_path) -> None:
    # LRA's to_string writes the tree [MAX 2 9 [MIN 4 7 ] 0 ] as nested pairs in parentheses
    line = "( ( ( ( ( [MAX 2 ) 9 ) ( ( ( [MIN 4 ) 7 ) ] ) ) 0 ) ] )\t9\n"
    path = tmp_path / "lra.tsv"
    path.write_text("Source\tTarget\n" + line)
    assert read_lra_tsv(path) == [("[MAX 2 9 [MIN 4 7 ] 0 ]", 9)]


def test_bad_tsv_header_raises(tmp_path) -> None:
    path = tmp_path / "x.tsv"
    path.write_text("text\tlabel\n[MAX 1 2 ]\t2\n")
    with pytest.raises(DataError, match="Source"):
        read_lra_tsv(path)


def test_tokenizer_interface(tmp_path) -> None:
    tok = ListOpsTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.cls_id, tok.vocab_size) == (0, 1, 2, 3, 19)
    ids = tok.encode("[SM 3 [MIN 0 9 ] ]")
    assert ids == [17, 7, 14, 4, 13, 18, 18]
    assert tok.decode([tok.cls_id, *ids, tok.pad_id]) == "[SM 3 [MIN 0 9 ] ]"
    with pytest.raises(DataError, match="'\\[FIRST'"):
        tok.encode("[FIRST 1 2 ]")
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, ListOpsTokenizer) and loaded.encode("[MAX 1 ]") == tok.encode("[MAX 1 ]")


def test_load_classification_listops() -> None:
    cfg = DataConfig(source="listops", task="classification", listops_train=60, listops_val=20, listops_test=20)
    data = load_classification_data(cfg)
    assert (len(data.train), len(data.val), len(data.test), data.num_classes) == (60, 20, 20, 10)
    texts = [data.tokenizer.decode(ids) for split in (data.train, data.val, data.test) for ids, _ in split]
    assert len(set(texts)) == 100
    for ids, label in data.train + data.val + data.test:
        assert evaluate(data.tokenizer.decode(ids)) == label
        assert 20 <= len(ids) <= 120
