"""Resources that run out end in one line, never a traceback: a full disk (checked before a write
that cannot fit, and caught when a write fills it; no temporary file left, older checkpoints intact),
sizes that cannot fit in memory (refused before anything is allocated; an allocation that fails
anyway), and bf16 on a CPU without bf16 instructions (one warning)."""

from __future__ import annotations

import collections
import dataclasses
import errno
import logging
import os
import resource
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import routelab.io as rio
from routelab.cli import main
from routelab.config import Config
from routelab.data import ByteTokenizer
from routelab.io import DiskFullError, format_bytes, replace_dir
from routelab.model import RoutedTransformer
from routelab.train import memory, train
from routelab.train import trainer as trainer_mod
from routelab.train.checkpoint import list_checkpoints, load_checkpoint
from routelab.train.memory import activation_values_per_token, estimate_training_memory, out_of_memory_message

FULL = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
GiB = 1 << 30


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("routelab: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def leftovers(folder: Path) -> list[str]:
    """Hidden staging folders and temporary files anywhere under ``folder``."""
    return [str(p) for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------------------------
# a full disk


@pytest.fixture()
def checkpointed(lm_cfg, tmp_path) -> tuple[Path, Path]:
    """A config file and a finished 2-step run of it with its checkpoint at step 2."""
    path = tmp_path / "tiny.yaml"
    lm_cfg("train.steps=2", "train.checkpoint_every=2").save(path)
    run = tmp_path / "run"
    assert main(["train", str(path), "--out", str(run), "--no-sample"]) == 0
    return path, run


def assert_step_2_intact(run: Path, cfg_path: Path) -> None:
    assert [s for s, _ in list_checkpoints(run)] == [2]
    model = RoutedTransformer(Config.load(run / "config.yaml").model)
    assert load_checkpoint(run / "checkpoints" / "step_0000002", model, rng=False)["step"] == 2
    assert leftovers(run) == []


def test_a_disk_that_fills_during_a_checkpoint_is_one_line_and_leaves_the_old_one(checkpointed, monkeypatch, capsys):
    cfg_path, run = checkpointed

    def fill_then_fail(t):  # the disk fills while the tensors are written, after the header
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rio, "tensor_bytes", fill_then_fail)
    capsys.readouterr()
    assert main(["train", str(cfg_path), "--out", str(run), "--resume", "--set", "train.steps=4", "--no-sample"]) == 2
    line = one_error_line(capsys)
    assert f"not enough disk space in {str(run / 'checkpoints')!r} to write step_0000004/model.safetensors (about" in line
    assert "KiB needed, " in line and " free); free some space or write elsewhere" in line
    assert_step_2_intact(run, cfg_path)


def test_too_little_free_space_is_refused_before_a_checkpoint_is_written(checkpointed, monkeypatch, capsys):
    cfg_path, run = checkpointed
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(rio.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    written = []
    monkeypatch.setattr(rio, "write_safetensors", lambda *a, **k: written.append(a))
    capsys.readouterr()
    assert main(["train", str(cfg_path), "--out", str(run), "--resume", "--set", "train.steps=4", "--no-sample"]) == 2
    line = one_error_line(capsys)
    assert f"not enough disk space in {str(run / 'checkpoints')!r} to write checkpoint step_0000004 (about" in line
    assert "needed, 4.0 KiB free)" in line
    assert written == []  # refused before any tensor file was started
    assert_step_2_intact(run, cfg_path)


def test_a_plain_write_on_a_full_disk_names_the_file_and_leaves_no_temporary(lm_cfg, tmp_path, monkeypatch, capsys):
    path = tmp_path / "tiny.yaml"
    lm_cfg("train.steps=2").save(path)

    def no_space(fd):  # a file system that reports the full disk when the data is flushed (delayed allocation)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rio.os, "fsync", no_space)
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--no-sample"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"routelab: error: not enough disk space in {str(tmp_path / 'run')!r} to write ")
    assert "(more space needed, " in line
    assert leftovers(tmp_path / "run") == []


def test_an_export_that_fills_the_disk_keeps_the_previous_model(tmp_path, monkeypatch):
    model = RoutedTransformer(Config.from_dict({"model": {"vocab_size": 260, "d_model": 16, "n_layers": 1, "n_heads": 2}}).model)
    folder = tmp_path / "run" / "model"
    trainer_mod.export_model(model, ByteTokenizer(), folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setattr(rio, "tensor_bytes", lambda t: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(DiskFullError, match=r"in '.*run' to write model/model.safetensors \(about .* needed"):
        trainer_mod.export_model(model, ByteTokenizer(), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert leftovers(tmp_path / "run") == []


def test_replace_dir_puts_the_old_folder_back_when_the_new_one_cannot_move_in(tmp_path, monkeypatch):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "f").write_text("new")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "f").write_text("old")
    real = os.replace

    def fail_new_in(src, dst):
        if Path(src).name == "new":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(rio.os, "replace", fail_new_in)
    with pytest.raises(OSError):
        replace_dir(tmp_path / "new", tmp_path / "dst")
    assert (tmp_path / "dst" / "f").read_text() == "old" and not (tmp_path / ".dst.old").exists()


def test_format_bytes() -> None:
    assert [format_bytes(n) for n in (0, 1023, 1536, 5 * GiB, 3 << 40)] == ["0 bytes", "1023 bytes", "1.5 KiB", "5.0 GiB", "3.0 TiB"]


# ----------------------------------------------------------------------------------------------
# memory


@pytest.fixture()
def bounded_address_space():
    """Lower this process's address-space limit to what it maps now plus 3 GiB while a test runs,
    so a regression that allocated the sizes below fails at once instead of exhausting the machine."""
    try:
        mapped = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        pytest.skip("needs /proc/self/status (Linux)")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = mapped + 3 * GiB
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.parametrize(
    ("sets", "fix"),
    [
        (["model.d_model=65536", "model.n_layers=64"], "make the model smaller"),
        (["model.max_seq_len=100000000", "model.positions=learned"], "make the model smaller"),
        (["train.batch_size=20000"], "lower train.batch_size (raise train.grad_accum to keep the batch) or data.seq_len"),
        (["model.ffn.num_experts=100000"], "make the model smaller"),
    ],
)
def test_sizes_that_cannot_fit_are_refused_before_anything_is_allocated(sets, fix, tmp_path, monkeypatch, capsys, bounded_address_space):
    monkeypatch.setattr(memory, "meminfo", lambda: {"MemAvailable": 8 * GiB, "SwapFree": 0})
    start = time.perf_counter()
    code = main(["train", "lm-moe-topk-tiny", "--out", str(tmp_path / "run"), *[a for s in sets for a in ("--set", s)]])
    assert time.perf_counter() - start < 60  # bounds a hang (it takes a second or two)
    assert code == 2
    line = one_error_line(capsys)
    assert line.startswith("routelab: error: this run needs at least ") and "more than the 8.0 GiB this machine has available; " + fix in line
    assert not (tmp_path / "run").exists()


def test_the_demo_configs_pass_the_memory_check(monkeypatch) -> None:
    from routelab.presets import resolve_config_path
    from routelab.train.run import preflight

    monkeypatch.setattr(memory, "meminfo", lambda: {"MemAvailable": 2 * GiB})  # a small machine
    for name in ("lm-tiny", "lm-moe-topk-tiny", "lm-moe-switch-tiny", "multitask-tiny", "listops-tiny"):
        preflight(Config.load(resolve_config_path(name)))


@pytest.mark.parametrize(
    "sets",
    [
        (),
        ("model.tie_embeddings=false", "model.positions=learned", "model.ffn.activation=swiglu"),
        ("model.ffn={kind: moe, num_experts: 4, router: {kind: topk, top_k: 2}, num_shared_experts: 1}",),
    ],
)
def test_the_estimate_counts_the_parameters_of_the_model(lm_cfg, sets) -> None:
    cfg = lm_cfg(*sets)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=61)
    est = estimate_training_memory(model_cfg, cfg)
    assert est.parameters == est.trained == RoutedTransformer(model_cfg).num_parameters()
    assert est.tokens == cfg.train.batch_size * cfg.data.seq_len


def test_expert_parallelism_divides_the_experts_in_the_estimate(lm_cfg) -> None:
    cfg = lm_cfg("model.ffn={kind: moe, num_experts: 4}", "train.expert_parallel=2")
    model_cfg = dataclasses.replace(cfg.model, vocab_size=61)
    model = RoutedTransformer(model_cfg)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert estimate_training_memory(model_cfg, cfg, world_size=2).parameters == model.num_parameters() - experts // 2


@pytest.mark.parametrize(
    "sets",
    [
        (),
        ("model.ffn.activation=swiglu", "model.n_kv_heads=1"),
        ("model.ffn.activation=relu", "model.attention={kind: local, window: 8}"),
        ("model.ffn={kind: moe, num_experts: 4, router: {kind: topk, top_k: 2}, activation: swiglu, num_shared_experts: 1}",),
        ("model.ffn={kind: moe, num_experts: 4, router: switch}",),
    ],
)
def test_the_activation_estimate_is_at_most_what_autograd_keeps(lm_cfg, sets) -> None:
    """The estimate is a lower bound: a config it refuses cannot fit. Checked against the bytes the
    forward pass really saves for backward (parameters excluded), for a few layer kinds."""
    cfg = lm_cfg(*sets)
    model_cfg = dataclasses.replace(cfg.model, vocab_size=61)
    model = RoutedTransformer(model_cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    B, T = 8, cfg.data.seq_len
    x = torch.randint(0, 61, (B, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, labels=x)
    blocks = activation_values_per_token(model, model_cfg, T) * 4 * B * T
    log_probs = B * T * 61 * 4
    assert blocks + log_probs <= sum(saved.values()) <= 3 * (blocks + log_probs)  # a bound, and not a loose one


def test_memory_available_reads_meminfo(tmp_path, monkeypatch) -> None:
    (tmp_path / "meminfo").write_text("MemTotal:  4000 kB\nMemAvailable:  3000 kB\nSwapFree:  1000 kB\n")
    assert memory.meminfo(tmp_path / "meminfo") == {"MemTotal": 4000 * 1024, "MemAvailable": 3000 * 1024, "SwapFree": 1000 * 1024}
    monkeypatch.setattr(memory, "meminfo", lambda: {"MemAvailable": 3 * GiB, "SwapFree": 1 * GiB})
    assert memory.available_memory(torch.device("cpu"), 2) == (2 * GiB, "the 2.0 GiB each of its 2 processes may use (4.0 GiB in all)")
    monkeypatch.setattr(memory, "meminfo", lambda: {})
    assert memory.available_memory(torch.device("cpu"), 1) is None  # no /proc/meminfo: no check


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried"
                      " to allocate 17179869184 bytes. Error code 12 (Cannot allocate memory)"),
         "out of memory (an allocation of 16.0 GiB failed); lower train.batch_size"),
        (MemoryError(), "out of memory; lower train.batch_size"),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB"),
         "out of GPU memory (an allocation of 2.00 GiB failed); lower train.batch_size"),
    ],
)
def test_an_allocation_that_fails_anyway_is_one_line(error, line, lm_cfg, tmp_path, monkeypatch, capsys):
    path = tmp_path / "tiny.yaml"
    lm_cfg("train.steps=2").save(path)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(trainer_mod, "build_optimizer", fail)
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--no-sample"]) == 2
    assert one_error_line(capsys).startswith(f"routelab: error: {line}")


def test_other_runtime_errors_are_not_called_out_of_memory() -> None:
    assert out_of_memory_message(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


# ----------------------------------------------------------------------------------------------
# bf16 on a CPU without bf16 instructions


@pytest.mark.parametrize("supported", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_warns_once(supported, lm_cfg, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: supported)
    with caplog.at_level(logging.WARNING, logger="routelab.train"):
        train(lm_cfg("train.precision=bf16", "train.steps=2", "train.eval_every=1"), tmp_path / "run")
    said = [r.getMessage() for r in caplog.records if "bf16 instructions" in r.getMessage()]
    assert said == ([] if supported else [
        "train.precision=bf16: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so bf16 runs several times"
        " slower than fp32 here; use train.precision=fp32"
    ])


def test_a_full_disk_outside_the_atomic_writers_is_one_line_too() -> None:
    """An append (``metrics.jsonl``) or any other write that reports ENOSPC itself, or safetensors'
    own error, become the one line of ``routelab.cli.out_of_resources``."""
    from routelab.cli import out_of_resources

    expected = "no space left on the disk writing 'run/metrics.jsonl'; free some space (checkpoints already written stay"
    assert out_of_resources(OSError(errno.ENOSPC, "No space left on device", "run/metrics.jsonl")).startswith(expected)
    assert out_of_resources(SafetensorError(FULL)).startswith("no space left on the disk; free some space")
    assert out_of_resources(DiskFullError("run", "x", 10, 1)) is None  # its own message is the line
    assert out_of_resources(OSError(errno.EACCES, "Permission denied", "run")) is None
