"""Knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network").

The student learns from the task labels and from a frozen teacher's softened distribution:

    loss = (1 - alpha) * CE(y, z_s) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
           + hidden_weight * MSE(W h_s, h_t) + aux

over the positions the task scores (labels != -100, the LM's shift included). The optional hidden
term is a FitNets-style hint (Romero et al. 2015) on the final hidden states, through a learned
linear map W (student width -> teacher width) when the widths differ, the identity otherwise.

The teacher is a transform's input, not part of the student: it lives outside the module tree of
``Distiller`` (so it is in no state dict, optimizer or ``DistributedDataParallel`` wrapper), frozen,
in eval mode, and runs under ``torch.no_grad()``. The projection W is trained and saved in the
checkpoints (``routelab.train.checkpoint``'s ``extra_tensors``) but not in the exported ``model/``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab.config import Config, DistillConfig, ModelConfig, model_config_from_dict
from routelab.data import DataError, load_tokenizer
from routelab.errors import ConfigError
from routelab.io import DamagedFileError, read_json
from routelab.model import CONFIG_JSON, IGNORE_INDEX, ModelOutput, RoutedTransformer
from routelab.train.checkpoint import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    latest_checkpoint,
    read_checkpoint_state,
    read_extra_tensors,
)
from routelab.train.run import CONFIG_FILE, MODEL_DIR, TOKENIZER_FILE, RunError, load_run, load_run_config

PREFIX = "distill."  # names of the distiller's own tensors in a checkpoint's optimizer file


# ----------------------------------------------------------------------------------------------
# the losses (pure functions)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float, shift: bool) -> Tensor:
    """Hinton et al. (2015)'s soft-target loss, ``T^2 * KL(p_t || p_s)`` with ``p = softmax(z / T)``,
    averaged over the scored positions like the task's cross-entropy.

    The gradient of the KL term with respect to ``z_s`` is ``(p_s - p_t) / T``, so Hinton et al.
    multiply it by ``T^2`` to keep its size comparable to the hard-label term as ``T`` changes.

    Shapes: B batch, T' positions, C classes (vocabulary for LM, labels otherwise), N scored positions.

    Args:
        student_logits, teacher_logits: (B, T', C) or (B, C), same shape.
        labels: (B, T') or (B,); positions labelled ``-100`` are not scored.
        temperature: T > 0.
        shift: LM: position t predicts labels[t + 1], so the last position and the first label drop out.

    Returns:
        a scalar (fp32); 0 when nothing is scored.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in shape")
    if shift:
        student_logits, teacher_logits, labels = student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:]
    scored = labels != IGNORE_INDEX  # (B, T') or (B,)
    log_ps = F.log_softmax(student_logits[scored].float() / temperature, dim=-1)  # (N, C)
    log_pt = F.log_softmax(teacher_logits[scored].float() / temperature, dim=-1)  # (N, C)
    if log_ps.shape[0] == 0:
        return student_logits.float().sum() * 0.0  # keeps the graph (DDP expects every output used)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # (N,)
    return temperature**2 * kl.mean()


def hidden_mse(student_hidden: Tensor, teacher_hidden: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Mean squared error between hidden states, over the real (non-padding) positions and the width.

    Args:
        student_hidden: (B, T, D), already projected to the teacher's width D.
        teacher_hidden: (B, T, D).
        attention_mask: (B, T), 1 = real token; None = all real.
    """
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"hidden states {tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)} differ in shape")
    err = (student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1)  # (B, T)
    if attention_mask is None:
        return err.mean()
    real = attention_mask.bool()
    return err[real].mean() if real.any() else err.sum() * 0.0


# ----------------------------------------------------------------------------------------------
# the teacher


class Teacher(NamedTuple):
    """A teacher read from a folder: its model config, where its tokenizer and weights are, and the
    checksum of those weights (recorded in the student's checkpoints; a resume checks it)."""

    folder: Path
    model_cfg: ModelConfig
    tokenizer_file: Path
    weights_sha256: str | None
    is_run: bool  # a run folder (config.yaml) rather than a save_pretrained folder (config.json)


def _teacher_error(folder: Path | str, why: str) -> ConfigError:
    return ConfigError(f"train.distill.teacher={str(folder)!r} {why}")


def inspect_teacher(folder: str | Path) -> Teacher:
    """Read what a teacher folder says about itself (JSON and YAML only: no weights are loaded).

    A routelab run folder (``config.yaml``, ``tokenizer.json``, ``model/`` or a checkpoint) or a
    ``save_pretrained`` folder (``config.json``, ``model.safetensors``) with a ``tokenizer.json``
    (``routelab train`` exports one with the model). Anything else raises one ``ConfigError`` line."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise _teacher_error(folder, "is not a folder; allowed: a routelab run folder or a save_pretrained model folder")
    try:
        if (folder / CONFIG_FILE).is_file():
            model_cfg = load_run_config(folder / CONFIG_FILE).model
            if (folder / MODEL_DIR / CONFIG_JSON).is_file():
                digest = read_json(folder / MODEL_DIR / CONFIG_JSON).get("weights_sha256")
            else:
                ckpt = latest_checkpoint(folder)
                if ckpt is None:
                    raise _teacher_error(folder, f"is a run with neither a final model ({MODEL_DIR}/) nor a checkpoint: train it first")
                digest = (read_checkpoint_state(ckpt).get("sha256") or {}).get(MODEL_FILE)
            is_run = True
        elif (folder / CONFIG_JSON).is_file():
            data = read_json(folder / CONFIG_JSON)
            if not isinstance(data, dict):
                raise _teacher_error(folder, f"has a {CONFIG_JSON} that is not a model config mapping")
            digest = data.pop("weights_sha256", None)
            model_cfg = model_config_from_dict(data)
            is_run = False
        else:
            raise _teacher_error(folder, f"is not a routelab run ({CONFIG_FILE}) nor a saved model ({CONFIG_JSON})")
    except (DamagedFileError, RunError) as e:
        raise _teacher_error(folder, f"cannot be read: {e}") from None
    except ConfigError as e:
        if "train.distill.teacher" in str(e):
            raise
        raise _teacher_error(folder, f"has an invalid config: {e}") from None
    tokenizer_file = folder / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise _teacher_error(folder, f"has no {TOKENIZER_FILE}, so it cannot be checked to share the student's tokenizer; copy the teacher's tokenizer there")
    return Teacher(folder, model_cfg, tokenizer_file, digest, is_run)


def check_teacher(teacher: Teacher, student: ModelConfig) -> None:
    """The teacher's head must produce what the student's does: the same head, the same number of
    labels, and (LM) the same vocabulary size. Sizes the data decides (None) are checked later."""
    t, s, where = teacher.model_cfg, student, f"teacher {str(teacher.folder)!r}"
    if t.head != s.head:
        raise ConfigError(f"the {where} has a {t.head!r} head but the student model.head is {s.head!r}; distillation needs the same head")
    if s.head == "lm" and s.vocab_size is not None and t.vocab_size != s.vocab_size:
        raise ConfigError(f"the {where} has vocab_size {t.vocab_size} but the student {s.vocab_size}; distillation needs the same vocabulary")
    if s.head != "lm" and s.num_labels is not None and t.num_labels != s.num_labels:
        raise ConfigError(f"the {where} has num_labels {t.num_labels} but the student {s.num_labels}; distillation needs the same labels")


def check_tokenizers(teacher: Teacher, student_file: Path) -> None:
    """The teacher's ``tokenizer.json`` must equal the student's (kind, vocabulary size, then content)."""
    t, s = read_json(teacher.tokenizer_file), read_json(student_file)
    try:
        tok_t, tok_s = load_tokenizer(teacher.tokenizer_file), load_tokenizer(student_file)
    except DataError as e:
        raise ConfigError(f"distillation cannot compare the teacher's and the student's tokenizers: {e}") from None
    (tk, tn), (sk, sn) = (tok_t.kind, tok_t.vocab_size), (tok_s.kind, tok_s.vocab_size)
    names = f"teacher {str(teacher.tokenizer_file)!r}, student {str(student_file)!r}"
    if tk != sk:
        raise ConfigError(f"the teacher's tokenizer is {tk!r} but the student's is {sk!r} ({names}); distillation needs the same tokenizer")
    if tn != sn:
        raise ConfigError(f"the teacher's {tk} tokenizer has {tn} tokens but the student's {sn} ({names}); distillation needs the same tokenizer")
    if t != s:
        raise ConfigError(f"the teacher's and the student's {tk} tokenizers differ in content ({names}); distillation needs the same tokenizer")


def load_teacher_model(teacher: Teacher, device: torch.device) -> RoutedTransformer:
    """The teacher's weights on ``device``: frozen (``requires_grad`` False) and in eval mode."""
    try:
        if teacher.is_run:
            model = load_run(teacher.folder, map_location=str(device)).model
        else:
            model = RoutedTransformer.from_pretrained(teacher.folder, map_location=device)
    except (DamagedFileError, RunError, FileNotFoundError) as e:
        raise _teacher_error(teacher.folder, f"cannot be loaded: {e}") from None
    model.requires_grad_(False)
    return model.to(device).eval()


def preflight_teacher(cfg: Config) -> Teacher:
    """Everything checkable before the data is read: the folder, the heads and the sequence length."""
    teacher = inspect_teacher(cfg.train.distill.teacher)
    check_teacher(teacher, cfg.model)
    if teacher.model_cfg.max_seq_len < cfg.data.seq_len:
        raise ConfigError(
            f"the teacher {str(teacher.folder)!r} reads at most {teacher.model_cfg.max_seq_len} tokens (its model.max_seq_len)"
            f" but data.seq_len is {cfg.data.seq_len}; lower data.seq_len"
        )
    return teacher


# ----------------------------------------------------------------------------------------------
# the student with its distillation terms


@dataclass
class DistillOutput(ModelOutput):
    """``ModelOutput`` whose ``loss`` is the distillation loss; the terms it adds, for logging."""

    kd_loss: Tensor | None = None  # T^2 * KL, before alpha
    hidden_loss: Tensor | None = None  # MSE, before hidden_weight (0 when off)
    teacher_s: float = 0.0  # seconds spent in the teacher's forward pass

    def terms(self) -> dict[str, Tensor | float]:
        return {"kd_loss": self.kd_loss.detach(), "hidden_loss": self.hidden_loss.detach(), "teacher_s": self.teacher_s}


class Distiller(nn.Module):
    """The student and what distillation trains beside it (the hidden-state projection); the
    trainer trains (and wraps in ``DistributedDataParallel``) this module instead of the student.

    ``forward`` takes the student's arguments and returns a ``DistillOutput``. The teacher is kept
    in a plain tuple, so it is not a submodule: not in ``state_dict()``, ``parameters()``, the
    optimizer or a DDP wrapper, and ``Distiller.train()`` leaves it in eval mode."""

    def __init__(self, student: RoutedTransformer, teacher: RoutedTransformer, cfg: DistillConfig, source: Teacher | None = None) -> None:
        super().__init__()
        self.student = student
        self._teacher = (teacher,)
        self.cfg = cfg
        self.source = source  # where the teacher came from (recorded in the run)
        d_s, d_t = student.cfg.d_model, teacher.cfg.d_model
        # student width -> teacher width; only when the hidden term is on and the widths differ
        self.projection = nn.Linear(d_s, d_t, bias=False) if cfg.hidden_weight > 0 and d_s != d_t else None

    @property
    def teacher(self) -> RoutedTransformer:
        return self._teacher[0]

    def record(self) -> dict[str, Any]:
        """What a run records about its teacher (checkpoint bookkeeping, ``summary.json``)."""
        folder = self.source.folder.resolve() if self.source else None
        return {"teacher": str(folder) if folder else None, "weights_sha256": self.source.weights_sha256 if self.source else None}

    def extra_tensors(self) -> dict[str, Tensor]:
        """The distiller's trained tensors (the projection) by checkpoint name (``distill.*``)."""
        return {PREFIX + k: v for k, v in self.state_dict().items() if not k.startswith("student.")}

    def load_extra_tensors(self, tensors: dict[str, Tensor], path: Path | str = "checkpoint") -> None:
        """Inverse of ``extra_tensors``; ``path`` (the file they came from) names a mismatch."""
        own = self.extra_tensors()
        if set(tensors) != set(own) or any(tensors[k].shape != v.shape for k, v in own.items()):
            found = {k: tuple(t.shape) for k, t in tensors.items()}
            raise DamagedFileError(path, f"distillation tensors {found} found, {({k: tuple(t.shape) for k, t in own.items()})} expected")
        for k, v in own.items():
            with torch.no_grad():
                v.copy_(tensors[k])

    def optimizer_group(self, weight_decay: float) -> dict | None:
        """An AdamW parameter group for the projection (decayed, a matrix), or None without one."""
        return {"params": list(self.projection.parameters()), "weight_decay": weight_decay} if self.projection is not None else None

    def forward(self, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None) -> DistillOutput:
        cfg = self.cfg
        out = self.student(input_ids, labels=labels, attention_mask=attention_mask)
        sync = input_ids.device.type == "cuda"  # time the teacher's kernels, not their launch
        if sync:
            torch.cuda.synchronize(input_ids.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            t_out = self.teacher(input_ids, attention_mask=attention_mask)
        if sync:
            torch.cuda.synchronize(input_ids.device)
        teacher_s = time.perf_counter() - t0
        kd = kd_loss(out.logits, t_out.logits, labels, cfg.temperature, shift=self.student.cfg.head == "lm")
        if cfg.hidden_weight > 0:
            h = self.projection(out.hidden) if self.projection is not None else out.hidden  # (B, T, D_t)
            hidden = hidden_mse(h, t_out.hidden, attention_mask)
        else:
            hidden = kd.new_zeros(())
        loss = (1 - cfg.alpha) * out.task_loss + cfg.alpha * kd + cfg.hidden_weight * hidden + out.aux_loss
        return DistillOutput(
            logits=out.logits, loss=loss, aux_loss=out.aux_loss, routing=out.routing, task_loss=out.task_loss,
            hidden=out.hidden, kd_loss=kd, hidden_loss=hidden, teacher_s=teacher_s,
        )


def build_distiller(cfg: Config, student: RoutedTransformer, student_tokenizer: Path, device: torch.device) -> Distiller:
    """Check the teacher against the (resolved) student config and tokenizer, load it, wrap both."""
    teacher = preflight_teacher(cfg)
    check_tokenizers(teacher, student_tokenizer)
    return Distiller(student, load_teacher_model(teacher, device), cfg.train.distill, teacher).to(device)


def resume_distillation(distiller: Distiller | None, recorded: dict | None, checkpoint: Path) -> None:
    """On resume: refuse a different teacher (``check_resumed_teacher``), then load the projection."""
    check_resumed_teacher(recorded, distiller.source if distiller is not None else None, checkpoint)
    if distiller is not None:
        distiller.load_extra_tensors(read_extra_tensors(checkpoint, PREFIX), checkpoint / OPTIMIZER_FILE)


def check_resumed_teacher(recorded: dict | None, teacher: Teacher | None, checkpoint: Path) -> None:
    """Refuse to resume with a teacher whose weights differ from those the run was distilled from
    (the folder may move: only the checksum counts), or with distillation switched on or off."""
    if recorded is None and teacher is None:
        return
    if recorded is None:
        raise RunError(f"cannot resume with train.distill.teacher set: checkpoint {str(checkpoint)!r} was trained without distillation")
    if teacher is None:
        raise RunError(
            f"cannot resume without train.distill.teacher: checkpoint {str(checkpoint)!r} was distilled from"
            f" {recorded.get('teacher')!r}; set train.distill.teacher to it"
        )
    if recorded.get("weights_sha256") != teacher.weights_sha256:
        raise RunError(
            f"cannot resume: the teacher in {str(teacher.folder)!r} has weights sha256 {str(teacher.weights_sha256)[:12]}..., but"
            f" the run was distilled from {recorded.get('teacher')!r} with {str(recorded.get('weights_sha256'))[:12]}..."
            f" (checkpoint {checkpoint.name}); restore that teacher, or start a new run"
        )
