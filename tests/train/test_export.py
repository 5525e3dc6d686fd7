"""``routelab export RUN --out DIR``: a checkpoint as a model folder ``from_pretrained`` reads, written
whole, never over a user's files, in about one tensor of memory. (Bad input: tests/test_cli_failures.py.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from routelab.cli import main
from routelab.config import Config
from routelab.data import ByteTokenizer
from routelab.io import load_state_dict
from routelab.model import RoutedTransformer
from routelab.train.checkpoint import save_checkpoint
from tests.test_cli_failures import refused, snapshot, train_finished

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny LM run: checkpoints at steps 3 and 6, model/ written from step 6."""
    return train_finished(tmp_path_factory.mktemp("export")) / "run"


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:07d}" / "model.safetensors"


def test_export_latest_is_the_runs_own_final_model(run, tmp_path, capsys):
    assert main(["export", str(run), "--out", str(tmp_path / "m")]) == 0
    assert "exported step 6 of" in capsys.readouterr().out
    assert snapshot(tmp_path / "m") == snapshot(run / "model")  # the same bytes as training's own export
    model = RoutedTransformer.from_pretrained(tmp_path / "m")
    weights = load_state_dict(ckpt(run, 6))
    assert model.state_dict().keys() == weights.keys()
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)


def test_export_an_older_checkpoint(run, tmp_path):
    assert main(["export", str(run), "--out", str(tmp_path / "m"), "--checkpoint", "3"]) == 0
    state = RoutedTransformer.from_pretrained(tmp_path / "m").state_dict()
    old, new = load_state_dict(ckpt(run, 3)), load_state_dict(ckpt(run, 6))
    assert all(torch.equal(state[k], old[k]) for k in old)
    assert any(not torch.equal(state[k], new[k]) for k in new)  # trained on between 3 and 6


def test_a_model_folder_is_replaced_only_with_force(run, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["export", str(run), "--out", str(out), "--checkpoint", "3"]) == 0
    before = snapshot(out)
    refused(["export", str(run), "--out", str(out)], capsys, r"already holds a model; pass --force")
    assert snapshot(out) == before
    assert main(["export", str(run), "--out", str(out), "--force"]) == 0
    assert snapshot(out) == snapshot(run / "model")  # step 6 now, and nothing else left (no staging, no lock)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("files", [{"notes.txt": "mine"}, {"config.json": "{}", "weights.bin": "x"}, {"tokenizer.json": "{}"}])
def test_a_folder_with_user_files_is_refused_even_with_force(run, tmp_path, capsys, files):
    out = tmp_path / "mine"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    message = r"not a routelab model folder" if list(files) == ["tokenizer.json"] else r"holds files routelab did not write"
    for force in ([], ["--force"]):
        refused(["export", str(run), "--out", str(out), *force], capsys, message)
        assert {p.name: p.read_text() for p in out.iterdir()} == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_the_runs_own_model_folder_may_be_rewritten(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["export", str(copy), "--out", str(copy / "model"), "--checkpoint", "3", "--force"]) == 0
    assert snapshot(copy / "model")["model.safetensors"] == ckpt(run, 3).read_bytes()


MIB = 1 << 20
TENSOR_MIB = 16

MEMORY_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from routelab.config import ModelConfig
    from routelab.model import state_shapes
    from routelab.train.export import export_checkpoint

    def mib(key):
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
        return int(line.split()[1]) / 1024

    # the libraries' one-off set-up (a model built on the meta device: tens of MB, whatever its size) first
    state_shapes(ModelConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=1, max_seq_len=8))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = mib("VmRSS")
    export_checkpoint(sys.argv[1], sys.argv[2])
    print(mib("VmHWM") - before)
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads the peak RSS from Linux's /proc")
def test_export_memory_is_about_one_tensor_not_the_model(tmp_path):
    """8 tensors of 16 MiB (embeddings, head, two SwiGLU FFNs): the export's peak RSS growth stays
    under 3 tensors (measured: about one), far below the 128 MiB the model's weights take."""
    cfg = Config.from_dict({
        "model": {"vocab_size": 65536, "d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 16,
                  "tie_embeddings": False, "ffn": {"activation": "swiglu", "hidden": 65536}},
        "data": {"seq_len": 16},
    })
    model = RoutedTransformer(cfg.model)
    big = [k for k, v in model.state_dict().items() if v.numel() * v.element_size() == TENSOR_MIB * MIB]
    assert len(big) == 8
    total = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    run = tmp_path / "run"
    run.mkdir()
    cfg.save(run / "config.yaml")
    ByteTokenizer().save(run)
    save_checkpoint(run, 1, model, torch.optim.SGD(model.parameters(), lr=0.1), {}, keep=1)
    del model
    child = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(run), str(tmp_path / "m")],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    assert child.returncode == 0, child.stderr
    growth = float(child.stdout.split()[-1])
    print(f"export of {total / MIB:.0f} MiB of weights ({TENSOR_MIB} MiB tensors): peak RSS growth {growth:.1f} MiB")
    assert growth < 3 * TENSOR_MIB, f"peak RSS grew {growth:.1f} MiB exporting {total / MIB:.0f} MiB of weights"
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == ckpt(run, 1).read_bytes()
