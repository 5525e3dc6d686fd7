"""Output folders: a command never writes over what it reads, and never over files routelab did not
write (``routelab.outputs``). Each refused case exits 2 with one line, and every file under the test's
folder (the sources, the user's files, earlier runs) is byte for byte as before."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from routelab.cli import main
from routelab.outputs import OutputFolderError, check_no_overlap, check_run_target, overlap
from tests.test_cli_failures import refused, snapshot, train_finished


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A finished tiny run, its config, and a tiny Hugging Face Llama folder with a sibling folder and file."""
    root = train_finished(tmp_path_factory.mktemp("outputs"))
    from tests.pretrained.helpers import save_decoder

    save_decoder("llama", root / "models" / "llama")
    (root / "models" / "other").mkdir()
    (root / "models" / "other" / "weights.bin").write_bytes(b"\1\2\3")
    (root / "models" / "notes.txt").write_text("my notes")
    return root


def _user_folder(path: Path, **files: str) -> Path:
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name.replace("__", ".")).write_text(text)
    return path


# name -> (arguments with W = the module's folder and T = this test's folder, expected message)
REFUSED = {
    "import-out-is-the-source": (["import", "hf", "T/models/llama", "--out", "T/models/llama", "--force"],
                                 r"--out '.*models/llama' is the checkpoint folder"),
    "import-out-contains-the-source": (["import", "hf", "T/models/llama", "--out", "T/models", "--force"],
                                       r"--out '.*models' contains the checkpoint folder '.*models/llama'"),
    "import-out-inside-the-source": (["import", "hf", "T/models/llama", "--out", "T/models/llama/run", "--force"],
                                     r"is inside the checkpoint folder"),
    "import-force-over-user-files": (["import", "hf", "T/models/llama", "--out", "T/mine", "--force"],
                                     r"--out '.*mine' holds files routelab did not write \('notes.txt'\)"),
    "train-over-a-hf-folder": (["train", "W/tiny.yaml", "--out", "T/models/llama", "--no-sample"],
                               r"holds files routelab did not write \('config.json', 'generation_config.json', 'model.safetensors'"),
    "train-over-the-config-file": (["train", "T/cfg/config.yaml", "--out", "T/cfg", "--no-sample"],
                                   r"--out '.*cfg' contains the config file '.*cfg/config.yaml'"),
    "train-into-user-files": (["train", "W/tiny.yaml", "--out", "T/mine", "--no-sample"],
                              r"holds files routelab did not write \('notes.txt'\)"),
    "train-over-a-lone-tokenizer": (["train", "W/tiny.yaml", "--out", "T/tok", "--no-sample"],
                                    r"holds 'tokenizer.json' but no config.yaml, so it is not a routelab run folder"),
    "upcycle-out-is-the-source": (["upcycle", "T/run", "--out", "T/run", "--set", "model.ffn.kind=moe"],
                                  r"--out '.*run' is the source folder"),
    "upcycle-into-user-files": (["upcycle", "T/run", "--out", "T/mine", "--set", "model.ffn.kind=moe"],
                                r"holds files routelab did not write \('notes.txt'\)"),
    "extract-into-user-files": (["extract", "T/run", "--task", "lm", "--out", "T/mine"], r"holds files routelab did not write"),
    "inspect-into-user-files": (["inspect", "T/run", "--text", "a", "--out", "T/mine"],
                                r"holds files routelab did not write.*an earlier inspect output"),
    "inspect-into-the-run": (["inspect", "T/run", "--text", "a", "--out", "T/run"], r"holds files routelab did not write"),
    "listops-over-data-files": (["data", "listops", "--out", "T/lra"],
                                r"already holds basic_train.tsv; routelab never overwrites data files"),
    "compare-into-user-files": (["compare", "compare-lm", "--out", "T/mine", "--steps", "1"],
                                r"--out '.*mine' holds files routelab did not write.*a comparison folder"),
    "compare-variant-folder-of-user-files": (["compare", "compare-lm", "--out", "T/cmp", "--steps", "1"],
                                             r"variant 'dense' folder '.*dense' holds files routelab did not write"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_folder_that_is_not_ours_is_refused_and_left_alone(world, tmp_path, capsys, name):
    args, message = REFUSED[name]
    shutil.copytree(world / "models", tmp_path / "models")
    shutil.copytree(world / "run", tmp_path / "run")
    _user_folder(tmp_path / "mine", notes__txt="mine", config__yaml=(world / "tiny.yaml").read_text())
    _user_folder(tmp_path / "cfg", config__yaml=(world / "tiny.yaml").read_text())
    _user_folder(tmp_path / "tok", tokenizer__json='{"model": {}}')
    _user_folder(tmp_path / "lra", basic_train__tsv="Source\tTarget\n[MAX 1 2]\t2\n")
    _user_folder(tmp_path / "cmp" / "dense", notes__txt="not a run")
    before = snapshot(tmp_path)
    refused([a.replace("W/", f"{world}/").replace("T/", f"{tmp_path}/") for a in args], capsys, message)
    assert snapshot(tmp_path) == before


def test_import_force_replaces_a_run_folder_and_nothing_else(world, tmp_path, capsys):
    src, out = world / "models" / "llama", tmp_path / "imported"
    assert main(["import", "hf", str(src), "--out", str(out)]) == 0
    refused(["import", "hf", str(src), "--out", str(out)], capsys, r"already holds a run; pass --force")
    (out / "model" / "model.safetensors").write_bytes(b"old")  # replaced whole by --force
    assert main(["import", "hf", str(src), "--out", str(out), "--force"]) == 0
    assert (out / "model" / "model.safetensors").read_bytes() != b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imported"]  # no staging or set-aside folder left


def test_a_fresh_run_over_a_dead_runs_leftovers_still_starts(world, tmp_path):
    """A run that died before its first checkpoint leaves config.yaml, tokenizer.json, metrics.jsonl: a
    fresh run there replaces them (they are routelab's), as before."""
    run = tmp_path / "run"
    shutil.copytree(world / "run", run)
    shutil.rmtree(run / "checkpoints")
    shutil.rmtree(run / "model")
    (run / "summary.json").unlink()
    assert main(["train", str(world / "tiny.yaml"), "--out", str(run), "--no-sample"]) == 0
    assert (run / "summary.json").is_file()


@pytest.mark.parametrize(("out", "source", "how"), [
    ("a", "a", "is"), ("a", "a/b", "contains"), ("a/b/c", "a/b", "is inside"), ("a/b", "a/c", None), ("ab", "a", None),
])
def test_overlap(tmp_path, out, source, how):
    assert overlap(tmp_path / out, tmp_path / source) == how


def test_overlap_sees_through_symlinks(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OutputFolderError, match="is the checkpoint"):
        check_no_overlap(tmp_path / "link", [("the checkpoint", tmp_path / "real")])


def test_hidden_staging_and_the_lock_belong_to_a_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", ".model.abc.tmp", ".routelab.lock", "checkpoints"):
        (run / name).write_text("")
    check_run_target(run)
    (run / ".bashrc").write_text("")
    with pytest.raises(OutputFolderError, match=r"'\.bashrc'"):
        check_run_target(run)
