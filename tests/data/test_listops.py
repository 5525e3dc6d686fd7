"""ListOps: labels against an independent evaluator, length bounds, uniqueness, determinism, TSV."""

from __future__ import annotations

import hashlib
import random
from collections import Counter

import numpy as np
import pytest

from routelab.config import DataConfig
from routelab.data import (
    DataError,
    ListOpsTokenizer,
    evaluate_listops,
    generate_listops,
    listops,
    load_classification_data,
    load_tokenizer,
    read_lra_tsv,
    write_lra_tsv,
)
from routelab.data.listops import VALUE_P, check_listops_request, length_distribution, listops_splits, max_listops_len

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


# ------------------------------------------------------------------ length distribution and feasibility


def _digest(examples: list[tuple[str, int]]) -> str:
    return hashlib.sha256("\n".join(f"{t}\t{y}" for t, y in examples).encode()).hexdigest()[:16]


def test_outputs_pinned() -> None:
    # digests of the generator before the feasibility check existed: the check draws nothing
    assert _digest(generate_listops(200, seed=0, **KW)) == "56edece90d8e042c"
    lra = dict(min_len=500, max_len=2000, max_depth=10, max_args=10)  # LRA's settings
    assert _digest(generate_listops(50, seed=0, **lra)) == "d948ddb100701ab2"


def _enumerated_lengths(depth: int, max_depth: int, max_args: int) -> Counter:
    """Slow reference: the length law of a subtree at ``depth``, by convolving dictionaries."""
    value = Counter({1: 1.0})
    if depth >= max_depth:
        return value
    child = _enumerated_lengths(depth + 1, max_depth, max_args)
    op: Counter = Counter()
    for k in range(2, max_args + 1):
        total = Counter({2: 1.0})  # the operator and its ']'
        for _ in range(k):
            step: Counter = Counter()
            for a, pa in total.items():
                for b, pb in child.items():
                    step[a + b] += pa * pb
            total = step
        for length, p in total.items():
            op[length] += p / (max_args - 1)
    if depth == 1:
        return op
    return Counter({t: VALUE_P * value[t] + (1 - VALUE_P) * op[t] for t in set(value) | set(op)})


@pytest.mark.parametrize("max_depth,max_args", [(2, 5), (3, 3), (4, 2), (3, 4)])
def test_length_distribution_matches_enumeration(max_depth: int, max_args: int) -> None:
    exact = _enumerated_lengths(1, max_depth, max_args)
    size = max_listops_len(max_depth, max_args) + 1
    dist = length_distribution(max_depth, max_args, size)
    np.testing.assert_allclose(dist, [exact[t] for t in range(size)], rtol=0, atol=1e-12)
    cut = length_distribution(max_depth, max_args, 12)  # a shorter grid keeps the short lengths exact
    np.testing.assert_allclose(cut, [exact[t] for t in range(12)], rtol=0, atol=1e-12)


def test_length_distribution_matches_the_sampler() -> None:
    rng, lengths = random.Random(0), []
    for _ in range(4000):
        out: list[str] = []
        listops._grow(rng, 1, 10, 10, out, 10**9)
        lengths.append(len(out))
    dist = length_distribution(10, 10, 20_000)
    for lo, hi in ((4, 4), (20, 120), (121, 2000)):
        p = dist[lo : hi + 1].sum()
        seen = sum(lo <= n <= hi for n in lengths) / len(lengths)
        assert abs(seen - p) < 4 * (p * (1 - p) / len(lengths)) ** 0.5, (lo, hi, seen, p)


@pytest.fixture
def no_drawing(monkeypatch):
    """Fail the test if a tree is grown; fix the measured pace so messages are reproducible."""

    def grow(*args, **kwargs):
        raise AssertionError("a tree was drawn")

    monkeypatch.setattr(listops, "_grow", grow)
    monkeypatch.setattr(listops, "_tokens_per_second", lambda *a: 1e6)


def test_unlikely_lengths_refused_before_drawing(no_drawing) -> None:
    # 5000..6000 tokens: about 1 tree in 5000 (LRA's depth-10 trees have a median near 245 tokens)
    with pytest.raises(DataError) as e:
        generate_listops(2000, min_len=5000, max_len=6000, max_depth=10, max_args=10, seed=0)
    msg = str(e.value)
    assert msg.startswith("listops lengths 5000..6000 are out of reach for trees with max_depth=10 and max_args=10")
    assert "with probability 0.00019, so 2000 example(s) would take 5.5e+09 tokens grown (91 minutes here)" in msg
    assert "median of 245 tokens, 99% have <= 2916" in msg
    assert "lower listops_min_len to <= 3411" in msg
    check_listops_request(10, 5000, 6000, 10, 10)  # 10 of them are fine (seconds)


def test_splits_checked_together_before_any_is_generated(no_drawing) -> None:
    check_listops_request(200, 5000, 6000, 10, 10)  # one split alone would do (minutes)
    with pytest.raises(DataError, match="so 2400 example"):
        listops_splits(2000, 200, 200, min_len=5000, max_len=6000, max_depth=10, max_args=10, seed=0)


def test_lengths_near_the_maximum_refused(no_drawing) -> None:
    longest = max_listops_len(4, 10)  # 1222: every operator full, every leaf at depth 4
    with pytest.raises(DataError, match=r"\(almost\) never, so 1 example\(s\) would never be found"):
        generate_listops(1, min_len=longest - 20, max_len=longest, max_depth=4, max_args=10)
    # trees of max_depth=3, max_args=2 have 4, 7 or 10 tokens: 5..6 is impossible, not just unlikely
    with pytest.raises(DataError, match="never be found.*lower listops_min_len to <= 4"):
        generate_listops(1, min_len=5, max_len=6, max_depth=3, max_args=2)


def test_work_limit_is_a_parameter(no_drawing) -> None:
    with pytest.raises(DataError, match="out of reach"):
        generate_listops(10, min_len=500, max_len=2000, max_work=1000)
    assert generate_listops(0, min_len=5000, max_len=6000) == []
