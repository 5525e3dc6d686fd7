"""Byte and BPE tokenizers: round trips, special ids, save/load."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routelab.data import BPETokenizer, ByteTokenizer, DataError, load_tokenizer


@given(st.text())
@settings(max_examples=200, deadline=None)
def test_byte_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_byte_hand_values() -> None:
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.cls_id, tok.vocab_size) == (256, 257, 258, 259, 260)
    assert tok.encode("aé") == [97, 0xC3, 0xA9]
    assert tok.decode([104, 256, 257, 105, 258, 259]) == "hi"  # specials are skipped
    assert tok.decode([0xC3]) == "\ufffd"  # a cut character is replaced, not an exception
    assert [tok.id_to_token(i) for i in (97, 10, 258)] == ["a", "<0x0A>", "</s>"]
    with pytest.raises(DataError, match="260"):
        tok.decode([260])


def test_byte_save_load(tmp_path) -> None:
    ByteTokenizer().save(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["routelab_tokenizer"] == "byte"
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(load_tokenizer(tmp_path / "tokenizer.json"), ByteTokenizer)


def test_load_tokenizer_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="no tokenizer"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "tokenizer.json").write_text('{"routelab_tokenizer": "words"}')
    with pytest.raises(DataError, match="'words'"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(DataError, match="JSON"):
        load_tokenizer(tmp_path)


CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "the quick brown fox jumps over the lazy dog " * 20,
    "héllo wörld ☃ " * 10,
]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    pytest.importorskip("tokenizers")
    return BPETokenizer.train(CORPUS, vocab_size=300)


def test_bpe_specials_and_size(bpe: BPETokenizer) -> None:
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id, bpe.cls_id) == (0, 1, 2, 3)
    assert 260 < bpe.vocab_size <= 300
    assert [bpe.id_to_token(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<cls>"]
    assert len(bpe.encode(CORPUS[1])) < len(CORPUS[1].encode()) / 2  # merges learned


@pytest.mark.parametrize("text", [*CORPUS, "unseen: ∑ 𝛼 \x00\t\n", "", "a </s> <cls> b"])
def test_bpe_round_trip(bpe: BPETokenizer, text: str) -> None:
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert not {bpe.pad_id, bpe.bos_id, bpe.eos_id, bpe.cls_id} & set(ids)  # literal "</s>" stays text
    assert bpe.decode([bpe.bos_id, *ids, bpe.eos_id]) == text


def test_bpe_save_load(bpe: BPETokenizer, tmp_path) -> None:
    bpe.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BPETokenizer) and loaded.vocab_size == bpe.vocab_size
    for text in CORPUS:
        assert loaded.encode(text) == bpe.encode(text)
    assert loaded.encode_batch(CORPUS) == [bpe.encode(t) for t in CORPUS]


def test_bpe_vocab_too_small() -> None:
    pytest.importorskip("tokenizers")
    with pytest.raises(DataError, match="260"):
        BPETokenizer.train(CORPUS, vocab_size=100)
