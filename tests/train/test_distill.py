"""Knowledge distillation: the KD and hidden losses against hand-computed values, the loss mix at
alpha 0 and 1, the teacher outside the trained module, bad teachers refused in one line, and
tiny distilled runs (metrics, summary, bit-exact resume with the projection, a changed teacher)."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from routelab.config import DistillConfig, ModelConfig
from routelab.data import BPETokenizer, ByteTokenizer, ListOpsTokenizer
from routelab.errors import ConfigError
from routelab.io import load_state_dict
from routelab.model import RoutedTransformer
from routelab.train import read_metrics, train
from routelab.train.checkpoint import latest_checkpoint, read_extra_tensors
from routelab.train.distill import Distiller, check_tokenizers, hidden_mse, inspect_teacher, kd_loss
from routelab.train.run import RunError

# ----------------------------------------------------------------------------------------------
# the pure losses


def hand_kl(zs: list[float], zt: list[float], T: float) -> float:
    """T^2 * sum_i p_t,i * log(p_t,i / p_s,i), with p = softmax(z / T), written out."""
    es, et = [math.exp(z / T) for z in zs], [math.exp(z / T) for z in zt]
    ps, pt = [e / sum(es) for e in es], [e / sum(et) for e in et]
    return T * T * sum(t * math.log(t / s) for s, t in zip(ps, pt))


S_LM = [[[0.1, -0.4, 1.2], [2.0, 0.0, -1.0], [0.3, 0.3, 0.9], [-0.5, 1.5, 0.2]]]  # (1, 4, 3)
T_LM = [[[1.0, 0.2, -0.3], [0.5, 0.5, 0.1], [-1.0, 2.0, 0.0], [0.0, 0.0, 3.0]]]


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_kd_loss_lm_matches_the_formula_with_shift_and_ignored_labels(T):
    labels = torch.tensor([[7, 1, -100, 2]])  # position t is scored by labels[t + 1]: 0 and 2 (1's label is -100; 3 is last)
    got = kd_loss(torch.tensor(S_LM), torch.tensor(T_LM), labels, T, shift=True)
    want = (hand_kl(S_LM[0][0], T_LM[0][0], T) + hand_kl(S_LM[0][2], T_LM[0][2], T)) / 2
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_kd_loss_classification_and_token_classification():
    zs, zt = torch.tensor(S_LM[0]), torch.tensor(T_LM[0])  # (4, 3): four examples, three labels
    got = kd_loss(zs, zt, torch.tensor([0, -100, 2, 1]), 2.0, shift=False)
    want = sum(hand_kl(S_LM[0][i], T_LM[0][i], 2.0) for i in (0, 2, 3)) / 3
    assert got.item() == pytest.approx(want, rel=1e-6)
    tok = kd_loss(zs[None], zt[None], torch.tensor([[0, -100, 2, 1]]), 2.0, shift=False)  # per token, no shift
    assert tok.item() == pytest.approx(want, rel=1e-6)


def test_kd_gradient_is_scaled_back_by_T_squared():
    """d(T^2 KL)/dz_s = T (p_s - p_t) / N: the T^2 factor keeps the soft term's gradient at O(1/T)
    rather than O(1/T^2) (Hinton et al. 2015, section 2)."""
    zs = torch.tensor(S_LM[0], requires_grad=True)
    zt = torch.tensor(T_LM[0])
    for T in (1.0, 4.0):
        (g,) = torch.autograd.grad(kd_loss(zs, zt, torch.zeros(4, dtype=torch.long), T, shift=False), zs)
        want = T * (torch.softmax(zs.detach() / T, -1) - torch.softmax(zt / T, -1)) / 4
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7)


def test_kd_loss_with_nothing_scored_is_zero():
    zs = torch.randn(2, 3, requires_grad=True)
    loss = kd_loss(zs, torch.randn(2, 3), torch.tensor([-100, -100]), 2.0, shift=False)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(zs.grad, torch.zeros(2, 3))


def test_hidden_mse_over_real_positions():
    s = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [5.0, 5.0]]])
    t = torch.tensor([[[0.0, 2.0], [1.0, 1.0], [0.0, 0.0]]])
    assert hidden_mse(s, t).item() == pytest.approx((0.5 + 1.0 + 25.0) / 3)
    assert hidden_mse(s, t, torch.tensor([[1, 1, 0]])).item() == pytest.approx((0.5 + 1.0) / 2)


# ----------------------------------------------------------------------------------------------
# the student with its teacher


def tiny_model(seed: int, **kw) -> RoutedTransformer:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=50, d_model=16, n_layers=2, n_heads=2, max_seq_len=16)
    return RoutedTransformer(ModelConfig(**{**cfg, **kw}))


BATCH = {"input_ids": torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(0))}
BATCH["labels"] = BATCH["input_ids"]

MOE = {"ffn": {"kind": "moe", "num_experts": 4, "hidden": 16, "router": "switch"}}  # an aux loss to keep


def test_alpha_zero_is_the_task_loss_with_a_plain_runs_gradients():
    plain, student = tiny_model(0, **MOE), tiny_model(0, **MOE)
    out = plain(**BATCH)
    out.loss.backward()
    d = Distiller(student, tiny_model(1), DistillConfig(teacher="x", alpha=0.0, temperature=3.0))
    dout = d(**BATCH)
    assert dout.aux_loss.item() > 0 and torch.equal(dout.loss, out.task_loss + out.aux_loss)
    assert dout.kd_loss.item() > 0  # still logged
    dout.loss.backward()
    for (n, p), q in zip(plain.named_parameters(), student.parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_alpha_one_with_the_students_own_weights_gives_zero_kd_and_zero_gradient():
    student = tiny_model(0)
    d = Distiller(student, copy.deepcopy(student).eval().requires_grad_(False), DistillConfig(teacher="x", alpha=1.0))
    out = d(**BATCH)
    assert out.kd_loss.item() == 0.0
    torch.testing.assert_close(out.loss, out.aux_loss)  # (1 - 1) * task + 1 * 0
    grads = torch.autograd.grad(out.kd_loss, list(student.parameters()), allow_unused=True)
    assert max(g.abs().max().item() for g in grads if g is not None) < 1e-7


def test_teacher_is_frozen_and_outside_the_trained_module():
    teacher = tiny_model(1).eval().requires_grad_(False)
    d = Distiller(tiny_model(0), teacher, DistillConfig(teacher="x", hidden_weight=1.0))
    assert d.projection is None  # same width: the identity
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in d.parameters()}
    assert all(m is not teacher for m in d.modules()) and all(k.startswith("student.") for k in d.state_dict())
    d.train()
    assert not teacher.training and d.student.training
    out = d(**BATCH)
    assert out.hidden_loss.item() == pytest.approx(hidden_mse(out.hidden, teacher(BATCH["input_ids"]).hidden).item())
    assert all(p.grad is None for p in teacher.parameters())


def test_hidden_loss_through_a_projection_when_widths_differ():
    teacher = tiny_model(1, d_model=24).eval().requires_grad_(False)
    d = Distiller(tiny_model(0), teacher, DistillConfig(teacher="x", alpha=0.3, hidden_weight=0.5))
    assert tuple(d.projection.weight.shape) == (24, 16)
    assert list(d.extra_tensors()) == ["distill.projection.weight"]
    out = d(**BATCH)
    want = hidden_mse(d.projection(out.hidden), teacher(BATCH["input_ids"]).hidden)
    assert out.hidden_loss.item() == pytest.approx(want.item())
    torch.testing.assert_close(out.loss, 0.7 * out.task_loss + 0.3 * out.kd_loss + 0.5 * out.hidden_loss + out.aux_loss)
    out.loss.backward()
    assert d.projection.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# bad teachers


def test_check_tokenizers_names_both_files(tmp_path):
    def folder(name, tok):
        d = tmp_path / name
        d.mkdir()
        tok.save(d)
        return d / "tokenizer.json"

    teacher_dir = tmp_path / "t"
    tiny_model(0, vocab_size=260).save_pretrained(teacher_dir)
    text = ["the quick brown fox jumps over the lazy dog " * 20]
    BPETokenizer.train(text, 270).save(teacher_dir)
    teacher = inspect_teacher(teacher_dir)
    for other, msg in [
        (ByteTokenizer(), "the teacher's tokenizer is 'bpe' but the student's is 'byte'"),
        (ListOpsTokenizer(), "the teacher's tokenizer is 'bpe' but the student's is 'listops'"),
        (BPETokenizer.train(text, 275), "the teacher's bpe tokenizer has 270 tokens but the student's 275"),
        (BPETokenizer.train(["pack my box with five dozen liquor jugs " * 20], 270), "differ in content"),
    ]:
        student = folder(f"s{len(msg)}", other)
        with pytest.raises(ConfigError, match=msg) as e:
            check_tokenizers(teacher, student)
        assert str(teacher.tokenizer_file) in str(e.value) and str(student) in str(e.value) and "\n" not in str(e.value)
    check_tokenizers(teacher, folder("same", BPETokenizer.train(text, 270)))  # the same merges: fine


def test_a_folder_that_is_no_teacher(tmp_path):
    with pytest.raises(ConfigError, match="is not a folder"):
        inspect_teacher(tmp_path / "missing")
    with pytest.raises(ConfigError, match="is not a routelab run .config.yaml. nor a saved model"):
        inspect_teacher(tmp_path)
    tiny_model(0).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="has no tokenizer.json"):
        inspect_teacher(tmp_path)


# ----------------------------------------------------------------------------------------------
# distilled runs

RUN = ("train.steps=8", "train.checkpoint_every=4", "train.grad_accum=2", "model.dropout=0.1")


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, lm_cfg):
    """A tiny trained LM teacher, twice the student's width."""
    out = tmp_path_factory.mktemp("teacher")
    train(lm_cfg("train.steps=6", "model.d_model=64"), out)
    return out


def distill_cfg(lm_cfg, teacher, *more):
    return lm_cfg(*RUN, f"train.distill.teacher={teacher}", "train.distill.alpha=0.5", "train.distill.hidden_weight=0.1", *more)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, lm_cfg, teacher_run):
    out = tmp_path_factory.mktemp("distilled")
    summary = train(distill_cfg(lm_cfg, teacher_run), out)
    return out, summary


def test_a_distilled_run_logs_kd_and_teacher_time(distilled, teacher_run):
    out, summary = distilled
    lines = [r for r in read_metrics(out) if "split" not in r]
    assert len(lines) == 8
    for r in lines:
        assert r["kd_loss"] > 0 and r["hidden_loss"] > 0 and r["teacher_s"] > 0 and 0 < r["teacher_share"] < 1
        assert r["loss"] == pytest.approx(0.5 * r["task_loss"] + 0.5 * r["kd_loss"] + 0.1 * r["hidden_loss"] + r["aux_loss"], rel=1e-5)
    assert set(read_metrics(out)[-1]) == {"step", "split", "loss", "bpb"}  # eval stays the task's
    d = summary["distill"]
    assert d["teacher"] == str(teacher_run.resolve()) and 0 < d["teacher_share"] < 1 and d["teacher_s_per_step"] > 0
    assert d["weights_sha256"] == json.loads((teacher_run / "model" / "config.json").read_text())["weights_sha256"]
    assert json.loads((out / "summary.json").read_text())["distill"] == d
    # the projection (32 -> 64) is in the checkpoint, not in the exported student
    extra = read_extra_tensors(latest_checkpoint(out), "distill.")
    assert tuple(extra["distill.projection.weight"].shape) == (64, 32)
    assert RoutedTransformer.from_pretrained(out / "model").cfg.d_model == 32


def test_a_distilled_run_resumes_bit_exactly(distilled, lm_cfg, teacher_run, tmp_path):
    straight, _ = distilled
    cfg = distill_cfg(lm_cfg, teacher_run)
    train(cfg, tmp_path, stop_after=4)
    moved = tmp_path.parent / (tmp_path.name + "_teacher_moved")  # the teacher folder may move: its checksum counts
    shutil.copytree(teacher_run, moved)
    train(distill_cfg(lm_cfg, moved), tmp_path, resume=True)
    a, b = (load_state_dict(d / "model" / "model.safetensors") for d in (straight, tmp_path))
    assert all(torch.equal(a[k], b[k]) for k in a)
    pa, pb = (read_extra_tensors(latest_checkpoint(d), "distill.") for d in (straight, tmp_path))
    assert torch.equal(pa["distill.projection.weight"], pb["distill.projection.weight"])
    la, lb = ([r["kd_loss"] for r in read_metrics(d) if "split" not in r] for d in (straight, tmp_path))
    assert la == lb


def test_a_changed_teacher_or_switching_distillation_on_resume_is_refused(lm_cfg, teacher_run, tmp_path):
    changed = tmp_path / "changed"
    model = RoutedTransformer.from_pretrained(teacher_run / "model")
    with torch.no_grad():
        model.head.weight.add_(0.01)
    model.save_pretrained(changed)  # a save_pretrained folder works as a teacher too
    shutil.copy(teacher_run / "tokenizer.json", changed)
    train(distill_cfg(lm_cfg, teacher_run, "train.steps=4", "train.distill.hidden_weight=0"), tmp_path / "run", stop_after=2)
    with pytest.raises(RunError, match="restore that teacher, or start a new run"):
        train(distill_cfg(lm_cfg, changed, "train.steps=4", "train.distill.hidden_weight=0"), tmp_path / "run", resume=True)
    with pytest.raises(RunError, match="cannot resume without train.distill.teacher"):
        train(lm_cfg(*RUN, "train.steps=4"), tmp_path / "run", resume=True)
    train(lm_cfg(*RUN, "train.steps=4"), tmp_path / "plain", stop_after=2)
    with pytest.raises(RunError, match="trained without distillation"):
        train(distill_cfg(lm_cfg, teacher_run, "train.steps=4", "train.distill.hidden_weight=0"), tmp_path / "plain", resume=True)


def test_a_classifier_distils_from_a_classifier(cls_cfg, tmp_path):
    train(cls_cfg("train.steps=10", "model.d_model=48"), tmp_path / "teacher")
    summary = train(cls_cfg("train.steps=4", f"train.distill.teacher={tmp_path / 'teacher'}", "train.distill.alpha=0.7",
                            "train.distill.hidden_weight=1.0"), tmp_path / "student")
    lines = [r for r in read_metrics(tmp_path / "student") if "split" not in r]
    assert all(r["kd_loss"] > 0 and r["hidden_loss"] > 0 and r["teacher_s"] > 0 for r in lines)
    assert "val_accuracy" in summary and summary["distill"]["teacher_share"] > 0


def test_bad_teachers_fail_before_training(lm_cfg, cls_cfg, teacher_run, tmp_path):
    with pytest.raises(ConfigError, match="has a 'lm' head but the student model.head is 'classification'"):
        train(cls_cfg(f"train.distill.teacher={teacher_run}"), tmp_path / "a")
    assert not (tmp_path / "a").exists()  # refused before the run folder was made
    with pytest.raises(ConfigError, match=r"vocab_size 260 but the student \d+; distillation needs the same vocabulary"):
        train(lm_cfg(f"train.distill.teacher={teacher_run}", "data.tokenizer=bpe", "data.bpe_vocab_size=300"), tmp_path / "b")
    with pytest.raises(ConfigError, match="is not a routelab run"):
        train(lm_cfg(f"train.distill.teacher={tmp_path}"), tmp_path / "c")
    short = tmp_path / "short"
    tiny_model(0, vocab_size=260).save_pretrained(short)  # max_seq_len 16 < data.seq_len 32
    shutil.copy(teacher_run / "tokenizer.json", short)
    with pytest.raises(ConfigError, match="reads at most 16 tokens .its model.max_seq_len. but data.seq_len is 32"):
        train(lm_cfg(f"train.distill.teacher={short}"), tmp_path / "d")


def test_the_cli_reports_a_bad_teacher_in_one_line(cls_cfg, teacher_run, tmp_path):
    cls_cfg().save(tmp_path / "cls.yaml")
    ran = subprocess.run(
        [sys.executable, "-m", "routelab", "train", str(tmp_path / "cls.yaml"), "--out", str(tmp_path / "run"),
         "--set", f"train.distill.teacher={teacher_run}"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert ran.returncode == 2, ran.stderr
    assert [line for line in ran.stderr.splitlines() if "error" in line] == [
        f"routelab: error: the teacher {str(teacher_run)!r} has a 'lm' head but the student model.head is 'classification';"
        " distillation needs the same head"
    ]


def test_two_processes_distil_what_one_process_distils(tmp_path):
    """Under DDP each rank holds its own teacher (outside the wrapper); the student and the projection
    (whose gradients DDP averages with the student's) end as in one process, to float summation order."""
    from tests.train.test_distributed import _assert_same_params, _routelab, write_tiny

    tiny = write_tiny(tmp_path)
    assert _routelab("train", str(tiny), "--out", str(tmp_path / "teacher"), "--no-sample", "--set", "model.d_model=64").returncode == 0
    distil = ("--no-sample", "--set", f"train.distill.teacher={tmp_path / 'teacher'}", "--set", "train.distill.hidden_weight=0.1")
    one = _routelab("train", str(tiny), "--out", str(tmp_path / "one"), *distil)
    two = _routelab("train", str(tiny), "--nproc", "2", "--out", str(tmp_path / "two"), *distil)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    _assert_same_params(tmp_path / "one" / "model" / "model.safetensors", tmp_path / "two" / "model" / "model.safetensors")
    pa, pb = (read_extra_tensors(latest_checkpoint(tmp_path / d), "distill.") for d in ("one", "two"))
    torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["distill"]["teacher_share"] > 0


def test_expert_parallel_distillation_equals_one_process(tmp_path):
    """With expert parallelism the DDP wrapper is the distiller's: its ignore list names the experts
    under ``student.``, so expert gradients stay with their replicas."""
    from tests.train.test_distributed import MOE, _assert_same_params, _routelab, write_tiny

    tiny = write_tiny(tmp_path)
    assert _routelab("train", str(tiny), "--out", str(tmp_path / "teacher"), "--no-sample").returncode == 0
    distil = ("--no-sample", *MOE, "--set", f"train.distill.teacher={tmp_path / 'teacher'}", "--set", "train.distill.alpha=0.8")
    one = _routelab("train", str(tiny), "--out", str(tmp_path / "one"), *distil)
    two = _routelab("train", str(tiny), "--nproc", "2", "--set", "train.expert_parallel=2", "--out", str(tmp_path / "two"), *distil)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    _assert_same_params(tmp_path / "one" / "model" / "model.safetensors", tmp_path / "two" / "model" / "model.safetensors")
