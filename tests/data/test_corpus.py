"""LM corpora: reading sources, document splits, tokenising, random and evaluation windows."""

from __future__ import annotations

import json

import pytest
import torch

from routelab.config import DataConfig
from routelab.data import (
    ByteTokenizer,
    DataError,
    lm_eval_batches,
    load_lm_data,
    read_texts,
    sample_lm_batch,
    split_documents,
    stdlib_files,
)
from routelab.data.corpus import stdlib_root
from routelab.data.decoding import read_python_source

# ------------------------------------------------------------------ stdlib


def test_stdlib_files_sorted_without_tests() -> None:
    files = stdlib_files()
    rel = [f.relative_to(stdlib_root()).as_posix() for f in files]
    assert len(files) > 300
    assert rel == sorted(rel) and len(set(rel)) == len(rel)
    assert all(r.endswith(".py") for r in rel)
    banned = {"test", "tests", "idle_test", "site-packages"}
    assert not [r for r in rel if banned & set(r.split("/")[:-1])]
    assert "os.py" in rel and "json/decoder.py" in rel
    assert stdlib_files() == files


def test_stdlib_max_bytes_and_order() -> None:
    docs = read_texts("stdlib", DataConfig(max_bytes=200_000))
    total = sum(len(t.encode()) for _, t in docs)
    assert 200_000 - 3 <= total <= 200_000  # the last file is cut to fit (minus a cut character)
    root = stdlib_root()
    first = [f.relative_to(root).as_posix() for f in stdlib_files()[: len(docs)]]
    assert [n for n, _ in docs] == first
    assert docs[0][1] == (root / first[0]).read_text(encoding="utf-8")


def test_stdlib_decodes_as_strict_utf8_whatever_data_encoding() -> None:
    # every library file is valid UTF-8 (a cp1252 cookie sits on an ASCII file), so the PEP 263
    # decoding gives exactly the text the old 'utf-8, errors=replace' reading gave
    for path in stdlib_files():
        assert read_python_source(path) == path.read_bytes().decode("utf-8"), path
    small = DataConfig(max_bytes=50_000)
    assert read_texts("stdlib", DataConfig(max_bytes=50_000, encoding="utf-16")) == read_texts("stdlib", small)


def test_python_source_follows_its_coding_cookie(tmp_path) -> None:
    (tmp_path / "m.py").write_bytes(b"# -*- coding: latin-1 -*-\nname = 'caf\xe9'\r\n")
    assert read_python_source(tmp_path / "m.py") == "# -*- coding: latin-1 -*-\nname = 'café'\r\n"
    (tmp_path / "bad.py").write_bytes(b"name = 'caf\xe9'\n")  # no cookie: UTF-8, and this is not
    with pytest.raises(DataError, match=r"bad\.py.*offset 11"):
        read_python_source(tmp_path / "bad.py")
    (tmp_path / "odd.py").write_bytes(b"# coding: no-such-codec\n")
    with pytest.raises(DataError, match=r"odd\.py' is not readable Python source"):
        read_python_source(tmp_path / "odd.py")


def test_stdlib_split_is_by_file_and_deterministic() -> None:
    cfg = DataConfig(max_bytes=300_000, val_fraction=0.2, seed=3)
    data = load_lm_data(cfg)
    assert data.val_names and data.train_names
    assert not set(data.train_names) & set(data.val_names)
    names = [n for n, _ in read_texts("stdlib", cfg)]
    assert sorted(data.train_names + data.val_names) == sorted(names)
    assert load_lm_data(cfg).val_names == data.val_names
    assert load_lm_data(DataConfig(max_bytes=300_000, val_fraction=0.2, seed=4)).val_names != data.val_names


# ------------------------------------------------------------------ files


def test_single_text_file_split_at_fraction(tmp_path) -> None:
    text = "abcdefghij" * 10
    (tmp_path / "a.txt").write_text(text)
    data = load_lm_data(DataConfig(source=str(tmp_path / "a.txt"), val_fraction=0.1))
    assert data.train.dtype == torch.long
    assert data.train.tolist() == list(text[:90].encode())
    assert data.val.tolist() == list(b"abcdefghij")
    assert (data.val_bytes, data.val_tokens) == (10, 10)


def test_documents_joined_by_eos(tmp_path) -> None:
    rows = [{"text": t, "other": 1} for t in ["aa", "bé", "c", "dd", "ee"]]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = DataConfig(source=str(tmp_path / "d.jsonl"), val_fraction=0.4, seed=0)
    data = load_lm_data(cfg)
    train, val = split_documents(read_texts(cfg.source, cfg), 0.4, 0)
    assert len(val) == 2 and len(train) == 3
    eos = ByteTokenizer.eos_id
    expect = []
    for i, (_, t) in enumerate(val):
        expect += ([eos] if i else []) + list(t.encode())
    assert data.val.tolist() == expect
    assert data.val_tokens == len(expect) == data.val_bytes  # one byte counted per separator
    assert data.train.tolist().count(eos) == 2


def test_folder_reads_text_files_sorted(tmp_path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    for name, text in {"z.txt": "Z", "b/c.md": "C", "a.py": "A", "skip.bin": "no", ".git/x.txt": "no"}.items():
        (tmp_path / name).write_text(text)
    docs = read_texts(str(tmp_path), DataConfig())
    assert docs == [("a.py", "A"), ("b/c.md", "C"), ("z.txt", "Z")]


def test_csv_and_missing_column(tmp_path) -> None:
    (tmp_path / "t.csv").write_text('body,text\nx,"one, two"\ny,three\n')
    assert [t for _, t in read_texts(str(tmp_path / "t.csv"), DataConfig())] == ["one, two", "three"]
    with pytest.raises(DataError, match="'content'"):
        read_texts(str(tmp_path / "t.csv"), DataConfig(text_column="content"))
    (tmp_path / "t.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="no column 'text'"):
        read_texts(str(tmp_path / "t.jsonl"), DataConfig())


def test_max_bytes_cuts_whole_characters(tmp_path) -> None:
    (tmp_path / "u.txt").write_text("ééé")
    assert read_texts(str(tmp_path / "u.txt"), DataConfig(max_bytes=3)) == [("u.txt", "é")]


def test_undecodable_text_is_refused_unless_asked(tmp_path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"line one\n" + b"caf\xe9 au lait\n")  # latin-1 bytes in a UTF-8 file
    with pytest.raises(DataError) as e:
        read_texts(str(path), DataConfig())
    msg = str(e.value)
    assert "notes.txt" in msg and "not valid utf-8" in msg and "offset 12 (line 2)" in msg and "byte e9" in msg
    assert "data.encoding=latin-1" in msg and "data.encoding_errors=replace|ignore" in msg
    assert read_texts(str(path), DataConfig(encoding="latin-1")) == [("notes.txt", "line one\ncafé au lait\n")]
    assert read_texts(str(path), DataConfig(encoding_errors="replace"))[0][1] == "line one\ncaf\ufffd au lait\n"
    assert read_texts(str(path), DataConfig(encoding_errors="ignore"))[0][1] == "line one\ncaf au lait\n"


def test_folder_names_the_undecodable_file(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("fine")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_bytes(b"\xff\xfe broken")
    with pytest.raises(DataError, match=r"sub/b\.md.*offset 0"):
        read_texts(str(tmp_path), DataConfig())


def test_table_rows_name_line_and_offset(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl.*offset 43 \(line 3\)"):
        read_texts(str(path), DataConfig())
    assert [t for _, t in read_texts(str(path), DataConfig(encoding="cp1252"))] == ["ok", "ok", "café"]
    csv_path = tmp_path / "t.csv"
    csv_path.write_bytes(b"text\nok\nna\xefve\n")
    with pytest.raises(DataError, match=r"t\.csv.*offset 10 \(line 3\)"):
        read_texts(str(csv_path), DataConfig())
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbftext\nhello\n")  # what spreadsheet programs write
    with pytest.raises(DataError, match="utf-8-sig"):
        read_texts(str(bom), DataConfig())
    assert read_texts(str(bom), DataConfig(encoding="utf-8-sig")) == [("bom.csv:2", "hello")]


def test_binary_files_refused_whatever_the_policy(tmp_path) -> None:
    (tmp_path / "ok.txt").write_text("text")
    (tmp_path / "weights.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    for errors in ("strict", "replace", "ignore"):
        with pytest.raises(DataError, match=r"weights\.txt' looks binary \(a NUL byte at offset 8\)"):
            read_texts(str(tmp_path), DataConfig(encoding_errors=errors))
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "a"}\n\x00\x01')
    with pytest.raises(DataError, match="looks binary"):
        read_texts(str(tmp_path / "d.jsonl"), DataConfig(encoding="latin-1"))


def test_utf16_text_with_nul_bytes_is_read_when_chosen(tmp_path) -> None:
    (tmp_path / "wide.txt").write_bytes("héllo wörld".encode("utf-16"))
    with pytest.raises(DataError, match="looks binary"):
        read_texts(str(tmp_path / "wide.txt"), DataConfig())
    assert read_texts(str(tmp_path / "wide.txt"), DataConfig(encoding="utf-16")) == [("wide.txt", "héllo wörld")]


def test_empty_and_missing_sources_raise(tmp_path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no text found"):
        load_lm_data(DataConfig(source=str(tmp_path / "empty.txt")))
    with pytest.raises(DataError, match="no text found"):
        load_lm_data(DataConfig(source=str(tmp_path)))  # a folder without text files
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="nope.txt"):
        load_lm_data(DataConfig(source=missing))


def test_bpe_tokenizer_saved_and_reused(tmp_path) -> None:
    pytest.importorskip("tokenizers")
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(6):
        (src / f"{i}.txt").write_text(f"document number {i} " * 30)
    cfg = DataConfig(source=str(src), tokenizer="bpe", bpe_vocab_size=280, val_fraction=0.3)
    run = tmp_path / "run"
    data = load_lm_data(cfg, run)
    assert (run / "tokenizer.json").is_file()
    assert data.tokenizer.decode(data.val).replace("\n", "") != ""
    mtime = (run / "tokenizer.json").stat().st_mtime_ns
    again = load_lm_data(cfg, run)
    assert (run / "tokenizer.json").stat().st_mtime_ns == mtime  # loaded, not retrained
    assert torch.equal(again.train, data.train)
    with pytest.raises(DataError, match="'bpe' tokenizer"):
        load_lm_data(DataConfig(source=str(src)), run)  # data.tokenizer=byte on a BPE run


def test_hf_local_dataset(tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["first doc", "second doc"]}).save_to_disk(str(tmp_path / "ds"))
    docs = read_texts(f"hf:{tmp_path / 'ds'}", DataConfig())
    assert [t for _, t in docs] == ["first doc", "second doc"]
    with pytest.raises(DataError, match="hf_allow_download"):  # offline: fails fast, no network
        read_texts("hf:routelab-no-such-user/no-such-dataset", DataConfig())


# ------------------------------------------------------------------ batches


def test_sample_lm_batch_windows_are_contiguous_and_deterministic() -> None:
    tokens = torch.randint(0, 260, (500,), generator=torch.Generator().manual_seed(1))
    batch = sample_lm_batch(tokens, 8, 16, torch.Generator().manual_seed(0))
    assert batch.shape == (8, 16) and batch.dtype == torch.long
    assert torch.equal(batch, sample_lm_batch(tokens, 8, 16, torch.Generator().manual_seed(0)))
    assert not torch.equal(batch, sample_lm_batch(tokens, 8, 16, torch.Generator().manual_seed(1)))
    windows = tokens.unfold(0, 16, 1)  # (N - 15, 16) every contiguous slice
    for row in batch:
        assert (windows == row).all(dim=1).any()
    starts = sample_lm_batch(torch.arange(20), 64, 5, torch.Generator().manual_seed(0))[:, 0]
    assert starts.min() >= 0 and starts.max() <= 15 and len(set(starts.tolist())) > 8


def test_sample_lm_batch_too_short() -> None:
    with pytest.raises(DataError, match="seq_len"):
        sample_lm_batch(torch.arange(16), 2, 16, torch.Generator())


def test_lm_eval_batches_in_order() -> None:
    batches = list(lm_eval_batches(torch.arange(27), batch_size=2, seq_len=5))
    assert [b.shape[0] for b in batches] == [2, 2, 1]  # 5 windows, the 2-token tail dropped
    assert torch.equal(torch.cat(batches).flatten(), torch.arange(25))
    assert len(list(lm_eval_batches(torch.arange(27), 2, 5, max_batches=2))) == 2
    # a subset of the windows is spread over the whole split: 4 of 10 windows -> 0, 2, 5, 7
    sample = torch.cat(list(lm_eval_batches(torch.arange(50), 2, 5, max_batches=2)))
    assert sample[:, 0].tolist() == [0, 10, 25, 35]
