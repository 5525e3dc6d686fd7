"""The CLI end to end on tiny data: train -> eval -> generate -> resume, and its error handling."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from routelab.cli import main
from routelab.presets import resolve_config_path

TINY = {
    "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 32},
    "data": {"source": "SOURCE", "seq_len": 32, "val_fraction": 0.2},
    "train": {"steps": 6, "batch_size": 4, "warmup_steps": 2, "eval_batches": 2, "progress": False, "log_every": 2},
}


@pytest.fixture
def tiny_yaml(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 60)
    cfg = json.loads(json.dumps(TINY).replace("SOURCE", str(text)))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_eval_generate_and_resume(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(tiny_yaml), "--out", str(out), "--set", "train.checkpoint_every=3", "--no-sample"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["completed"] is True
    assert "validation bits per byte" in capsys.readouterr().out
    assert main(["eval", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bpb"] == pytest.approx(summary["val_bpb"], rel=0.2)  # full split vs eval_batches
    assert main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    # a second fresh run into the same folder is refused; a longer resumed run continues it
    assert main(["train", str(tiny_yaml), "--out", str(out), "--no-sample"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", str(tiny_yaml), "--out", str(out), "--resume", "--set", "train.checkpoint_every=3", "--set", "train.steps=8", "--no-sample"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 8


def test_upcycle_writes_a_run_folder_that_generate_eval_and_train_read(tiny_yaml, tmp_path, capsys):
    dense, up, moe = tmp_path / "dense", tmp_path / "up", tmp_path / "moe"
    assert main(["train", str(tiny_yaml), "--out", str(dense), "--no-sample"]) == 0
    change = ["--set", "model.ffn.kind=moe", "--set", "model.ffn.num_experts=4", "--set", "model.ffn.router=topk",
              "--set", "model.attention.kind=local", "--set", "model.attention.window=32", "--set", "model.max_seq_len=64"]
    capsys.readouterr()
    assert main(["upcycle", str(dense), "--out", str(up), *change]) == 0
    said = capsys.readouterr().out
    assert "model.ffn.kind ('dense' -> 'moe')" in said and "1 dense FFN(s) -> MoE experts" in said
    assert sorted(p.name for p in up.iterdir()) == ["config.yaml", "model", "tokenizer.json"]
    assert main(["eval", str(dense)]) == 0
    dense_eval = json.loads(capsys.readouterr().out)
    assert main(["eval", str(up)]) == 0  # renormalised top-2 over copies, a window covering the sequence: the same model
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(dense_eval["loss"], abs=1e-4)
    assert main(["generate", str(up), "--prompt", "def ", "--max-new-tokens", "40", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("def ")  # 4 + 40 tokens: past the source's max_seq_len of 32
    args = ["train", str(tiny_yaml), "--out", str(moe), "--init-from", str(up), "--set", "train.steps=2", "--no-sample", *change]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert re.search(r"routelab: initialised from .*/up: all \d+ tensors loaded", err), err  # the same model: a plain load
    assert json.loads((moe / "summary.json").read_text())["steps"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "model.d_modle=64"], "did you mean 'd_model'"),
        (["--set", "train.lr=fast"], "train.lr='fast' is invalid; allowed: a number"),
        (["--set", "data.source=/no/such/file.txt"], "/no/such/file.txt"),
        (["--set", "model.max_seq_len=16"], "data.seq_len=32 is invalid; allowed: <= model.max_seq_len=16"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_yaml, tmp_path, capsys, args, message):
    assert main(["train", str(tiny_yaml), "--out", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("routelab: error:") and message in err and "Traceback" not in err


def test_empty_corpus_is_a_clear_error(tiny_yaml, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["train", str(tiny_yaml), "--out", str(tmp_path / "r"), "--set", f"data.source={empty}"]) == 2
    assert "no text" in capsys.readouterr().err


def test_presets_resolve_and_unknown_preset_lists_them():
    assert resolve_config_path("lm-tiny").name == "lm-tiny.yaml"
    with pytest.raises(ValueError, match="presets: .*listops-tiny"):
        resolve_config_path("lm-huge")


def test_presets_are_valid_configs():
    from routelab.config import Config

    for name in ("lm-tiny", "listops-tiny"):
        cfg = Config.load(resolve_config_path(name))
        assert cfg.model.head == cfg.data.task


def test_data_listops_writes_lra_tsv(tmp_path):
    from routelab.data import read_lra_tsv

    args = ["data", "listops", "--out", str(tmp_path), "--set", "listops_train=20", "--set", "listops_val=5", "--set", "listops_test=5"]
    assert main(args) == 0
    assert len(read_lra_tsv(tmp_path / "basic_train.tsv")) == 20
    assert (tmp_path / "basic_test.tsv").read_text().startswith("Source\tTarget\n")


# -- version, python -m routelab ------------------------------------------------------------------


def test_version_is_the_package_metadata(capsys):
    import importlib.metadata

    import routelab

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"routelab {routelab.__version__}"
    assert importlib.metadata.version("routelab") == routelab.__version__  # pyproject reads it from there


def _cli(*args, env=None, cwd=None):
    """``python -m routelab ARGS`` in a child process, with no OpenMP wait or allocator variable unless
    ``env`` sets one."""
    from routelab.cli import OPENMP_WAIT_VARS

    base = {k: v for k, v in os.environ.items() if k not in (*OPENMP_WAIT_VARS, "GLIBC_TUNABLES")}
    return subprocess.run([sys.executable, "-m", "routelab", *args], env={**base, **(env or {})}, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_python_m_routelab_runs_the_command_line(tmp_path):
    import routelab

    done = _cli("--version", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"routelab {routelab.__version__}"
    done = _cli("--help", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("usage: routelab ") and "compare" in done.stdout
    done = _cli("train", cwd=tmp_path)  # usage errors: argparse's exit status 2
    assert done.returncode == 2 and "usage: routelab train" in done.stderr


# -- CPU threads ----------------------------------------------------------------------------------


def test_openmp_wait_defaults_respect_the_users_own_choice():
    from routelab.cli import openmp_wait_defaults

    assert openmp_wait_defaults({}, "libgomp") == {"GOMP_SPINCOUNT": "1000"}
    assert openmp_wait_defaults({}, "other") == {"OMP_WAIT_POLICY": "PASSIVE"}
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME"):
        assert openmp_wait_defaults({var: "x"}, "libgomp") == {}
    assert openmp_wait_defaults({"OMP_NUM_THREADS": "2"}, "libgomp") == {"GOMP_SPINCOUNT": "1000"}


def test_allocator_defaults_only_on_glibc_and_never_over_the_users_own_tunables():
    from routelab.threads import KEEP_FREED_MEMORY, allocator_defaults

    assert allocator_defaults({}, "glibc") == {"GLIBC_TUNABLES": KEEP_FREED_MEMORY}
    assert allocator_defaults({}, "other") == {}
    assert allocator_defaults({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "glibc") == {}
    assert allocator_defaults({"MALLOC_MMAP_THRESHOLD_": "65536"}, "glibc") == {}  # glibc's older variables
    assert allocator_defaults({"MALLOC_CHECK": "x"}, "glibc") == {"GLIBC_TUNABLES": KEEP_FREED_MEMORY}


@pytest.mark.skipif(sys.platform != "linux", reason="glibc and page-fault counts: Linux")
def test_the_allocator_setting_lets_large_tensors_reuse_their_pages():
    """What the setting is for: once the heap has grown, a 64 MiB tensor made and freed again and
    again reuses its pages (glibc otherwise maps and unmaps every block over 32 MiB: each time, a
    fault per page)."""
    from routelab.threads import KEEP_FREED_MEMORY, c_library

    if c_library() != "glibc":
        pytest.skip("glibc only")
    code = (
        "import resource, torch\n"
        "for _ in range(10): torch.ones(16 << 20)\n"  # the heap grows to its working size (a few rounds)
        "f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(5): torch.ones(16 << 20)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)\n"
    )
    faults = {}
    for name, extra in (("default", {}), ("kept", {"GLIBC_TUNABLES": KEEP_FREED_MEMORY})):
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | extra
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        faults[name] = int(done.stdout.split()[-1])
    pages = 5 * (64 << 20) // 4096
    assert faults["default"] > pages // 2, faults  # every block faulted in anew
    assert faults["kept"] < pages // 10, faults  # the pages were reused


def test_train_command_sets_the_wait_before_openmp_loads_and_says_so(tiny_yaml, tmp_path):
    """The command re-executes itself once with the variable set (OpenMP read the environment when
    torch loaded): the training process reports it; a user's own setting is left alone."""
    from routelab.cli import openmp_runtime

    args = ["train", str(tiny_yaml), "--set", "train.steps=2", "--no-sample"]
    done = _cli(*args, "--out", str(tmp_path / "a"))
    assert done.returncode == 0, done.stderr
    chosen = "GOMP_SPINCOUNT=1000" if openmp_runtime() == "libgomp" else "OMP_WAIT_POLICY=PASSIVE"
    lines = done.stderr.splitlines()
    assert sum(line.startswith(f"routelab: {chosen}: idle OpenMP threads") for line in lines) == 1, done.stderr
    assert any(re.fullmatch(rf"routelab: CPU threads: \d+ \(.+\), {chosen}", line) for line in lines), done.stderr
    from routelab.threads import c_library

    kept = sum(line.startswith("routelab: GLIBC_TUNABLES=glibc.malloc.mmap_max=0") for line in lines)
    assert kept == (1 if c_library() == "glibc" else 0), done.stderr
    done = _cli(*args, "--out", str(tmp_path / "b"), "--set", "train.threads=1", env={"OMP_WAIT_POLICY": "ACTIVE"})
    assert done.returncode == 0, done.stderr
    assert "idle OpenMP threads" not in done.stderr
    assert "routelab: CPU threads: 1 (train.threads), OMP_WAIT_POLICY=ACTIVE" in done.stderr.splitlines()


def test_main_changes_no_process_wide_setting(tiny_yaml, tmp_path, monkeypatch):
    """main(argv) is the library's way to run a command: it sets no OpenMP variable (run() does)."""
    import os

    from routelab.cli import OPENMP_WAIT_VARS

    for var in OPENMP_WAIT_VARS:
        monkeypatch.delenv(var, raising=False)
    for command in (["train", str(tiny_yaml), "--out", str(tmp_path / "r"), "--set", "train.steps=2", "--no-sample"],
                    ["compare", "compare-lm", "--out", str(tmp_path / "file-in-the-way")]):
        (tmp_path / "file-in-the-way").write_text("")
        main(command)
        assert not [var for var in OPENMP_WAIT_VARS if var in os.environ]


# -- YAML syntax errors: one line with the file, line and column ----------------------------------

BROKEN = "model:\n  d_model: 32\n  n_heads: 2: 3\n"  # line 3, column 13: a second ': ' in a plain scalar


@pytest.mark.parametrize("broken", ["run", "base", "compare", "compare-base"])
def test_yaml_syntax_error_is_one_line_with_file_line_and_column(tiny_yaml, tmp_path, capsys, broken):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BROKEN)
    base = tmp_path / "child.yaml"
    base.write_text("base: bad.yaml\ntrain: {steps: 2}\n")
    cmp = tmp_path / "cmp.yaml"
    body = {"budget": {"steps": 2}, "variants": [{"name": "a"}, {"name": "b"}]}
    if broken == "compare":
        cmp.write_text("base: tiny.yaml\nbudget: {steps: 2}\nvariants:\n  - name: a\n  - name: b: c\n")
        expect = f"{str(cmp)!r} line 5, column 12: mapping values are not allowed here"
    else:
        cmp.write_text(yaml.safe_dump({"base": "bad.yaml", **body}))
        expect = f"{str(bad)!r} line 3, column 13: mapping values are not allowed here"
    argv = {
        "run": ["train", str(bad), "--out", str(tmp_path / "r")],
        "base": ["train", str(base), "--out", str(tmp_path / "r")],
        "compare": ["compare", str(cmp), "--out", str(tmp_path / "c")],
        "compare-base": ["compare", str(cmp), "--out", str(tmp_path / "c")],
    }[broken]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("routelab:")]
    assert lines == [f"routelab: error: {expect}"], err
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


def test_yaml_error_names_the_construct_it_was_reading(tmp_path):
    from routelab.config import Config, ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        Config.load(bad)
    assert str(e.value) == (f"{str(bad)!r} line 3, column 1: expected ',' or ']', but got '<stream end>'"
                            " (while parsing a flow sequence from line 2, column 10)")
    bad.write_text("model:\n  d_model: 32\x07\n")
    with pytest.raises(ConfigError, match=r"line 2, column 14: character #x0007 is not allowed in YAML"):
        Config.load(bad)
