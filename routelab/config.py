"""Typed configuration: dataclasses, YAML load/save, ``--set a.b=c`` overrides, validation.

Validation lives in each dataclass's ``__post_init__``. A config is a tree of dataclasses:

    Config
      model: ModelConfig
        attention: <the dataclass registered for attention.kind>   (e.g. DenseAttentionConfig)
        ffn:       <the dataclass registered for ffn.kind>         (e.g. DenseFFNConfig)
      data:  DataConfig
        tasks: list[TaskConfig] | None                            (multi-task runs)
      train: TrainConfig
        distill: DistillConfig

Building from a dict (``from_dict``) rejects unknown keys with a "did you mean" hint and wrong
types with a message naming the field, the value and what is allowed; each dataclass's
``__post_init__`` checks ranges. Every error is a ``ConfigError`` (a ``ValueError``).

This module is the schema. The conversion lives in ``routelab.conversion`` (dict <-> dataclass),
the reading in ``routelab.yaml_io`` (YAML files, ``base:`` presets, ``--set`` overrides); their
names are re-exported here, where callers have always imported them.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from routelab.conversion import from_dict, section_from_dict, to_dict
from routelab.errors import ConfigError, check, check_fraction, check_positive
from routelab.options import AttentionConfig, FFNConfig
from routelab.yaml_io import (  # noqa: F401  (re-exported: callers import them from here)
    MAX_YAML_VALUES,
    apply_overrides,
    deep_merge,
    load_yaml,
    parse_scalar,
    read_yaml_mapping,
    resolve_base,
)

__all__ = ["AttentionConfig", "Config", "ConfigError", "DataConfig", "DistillConfig", "FFNConfig", "ModelConfig", "TaskConfig", "TrainConfig"]


def _default_attention() -> AttentionConfig:
    return section_from_dict(AttentionConfig, {"kind": "dense"}, "model.attention")


def _default_ffn() -> FFNConfig:
    return section_from_dict(FFNConfig, {"kind": "dense"}, "model.ffn")


HEADS = ("lm", "classification", "token_classification")
Head = Literal["lm", "classification", "token_classification"]


def _builtin_sources() -> dict[str, str]:
    """``data.source`` -> the task it serves: the table lives with the data (``routelab.data.sources``).
    Imported when a task is checked, not with this module: importing it runs ``routelab.data``,
    whose loaders import this module."""
    from routelab.data.sources import BUILTIN_SOURCES

    return BUILTIN_SOURCES


def _task_source_error(source: str, where: str) -> str:
    """Why a task with this ``source`` and no ``head`` cannot be built: a file/folder or ``hf:`` source
    must name its head; any other name is a built-in source mistyped."""
    if source.startswith("hf:") or Path(source).expanduser().exists():
        return f"{where}.head is unset; source {source!r} is not built in, so set {where}.head: one of {', '.join(HEADS)}"
    builtin = _builtin_sources()
    hint = difflib.get_close_matches(source, list(builtin), n=1)
    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
    return (
        f"{where}.source={source!r} is invalid{did_you_mean}; allowed: a built-in source"
        f" ({', '.join(map(repr, builtin))}), or an existing file/folder path or 'hf:NAME'"
        f" with {where}.head set"
    )


@dataclass
class ModelConfig:
    """The Transformer: sizes, norm and positions, the task head, and the routed sections."""

    _section = "model"
    vocab_size: int | None = None  # None = taken from the tokenizer when training
    d_model: int = 128  # residual width
    n_layers: int = 2  # number of blocks
    n_heads: int = 4  # attention heads; d_model must divide by it
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention, Ainslie et al. 2023); None = n_heads
    attn_bias: Literal["all", "qkv", "none"] = "all"  # biases of the attention projections (Qwen2: qkv; Llama: none)
    max_seq_len: int = 256  # longest sequence (learned positions and inputs are bounded by it)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"  # pre-norm flavour (RMSNorm: Zhang & Sennrich 2019)
    norm_eps: float = 1e-5  # epsilon inside the norm
    norm_position: Literal["pre", "post"] = "pre"  # pre: x + f(norm(x)), final norm; post (BERT): norm(x + f(x)), none
    embed_norm: bool = False  # a norm right after the embeddings (BERT's embedding LayerNorm)
    positions: Literal["rope", "learned", "none"] = "rope"  # RoPE (Su et al. 2021) or a learned table
    rope_base: float = 10000.0  # RoPE frequency base theta
    type_vocab_size: int = 0  # token-type (segment) embeddings added to the input (BERT: 2); 0 = none
    dropout: float = 0.0  # residual and embedding dropout
    head: Literal["lm", "classification", "token_classification"] = "lm"  # task head
    num_labels: int | None = None  # classes for classification heads; None = from the data
    tie_embeddings: bool = True  # LM head shares the token-embedding matrix (Press & Wolf 2017)
    causal: bool | None = None  # None = derived: True for the lm head, False for encoders
    init_std: float = 0.02  # std of the normal init of linear and embedding weights
    task_names: list[str] | None = None  # multi-task: one head per task (``heads.<name>``); None = one task, ``head``
    task_heads: list[Head] | None = None  # multi-task: each task's head kind; None = ``head`` for every task
    task_num_labels: list[int | None] | None = None  # multi-task: each task's classes; None = ``num_labels``
    embeddings_path: str | None = None  # word2vec/GloVe text file to initialise token embeddings
    freeze_embeddings: bool = False  # keep loaded embeddings fixed during training
    attention: AttentionConfig = field(default_factory=_default_attention)
    ffn: FFNConfig = field(default_factory=_default_ffn)

    def __post_init__(self) -> None:
        if self.vocab_size is not None:
            check_positive(self, "vocab_size")
        check_positive(self, "d_model", "n_layers", "n_heads", "max_seq_len", "norm_eps", "rope_base")
        if self.n_kv_heads is not None:
            check(
                self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0,
                "model.n_kv_heads",
                self.n_kv_heads,
                f"null (= n_heads) or a divisor of model.n_heads={self.n_heads}",
            )
        check(self.type_vocab_size >= 0, "model.type_vocab_size", self.type_vocab_size, "an integer >= 0 (0 = no token types)")
        check(
            self.d_model % self.n_heads == 0,
            "model.d_model",
            self.d_model,
            f"a multiple of model.n_heads={self.n_heads}",
        )
        if self.positions == "rope":
            check(
                (self.d_model // self.n_heads) % 2 == 0,
                "model.n_heads",
                self.n_heads,
                "a head count giving an even head dimension (RoPE rotates pairs)",
            )
        check_fraction(self, "dropout")
        if self.num_labels is not None:
            check(self.num_labels >= 2, "model.num_labels", self.num_labels, "an integer >= 2")
        self._resolve_tasks()
        heads = self.task_heads or [self.head]
        if self.causal is None:  # one body for every task: causal as soon as one task is an LM
            self.causal = "lm" in heads
        check(
            not ("lm" in heads and not self.causal),
            "model.causal",
            self.causal,
            "True for the lm head (a bidirectional LM would see the token it predicts)",
        )
        if isinstance(self.attention, dict):
            self.attention = section_from_dict(AttentionConfig, self.attention, "model.attention")
        if isinstance(self.ffn, dict):
            self.ffn = section_from_dict(FFNConfig, self.ffn, "model.ffn")

    def _resolve_tasks(self) -> None:
        """Multi-task heads: fill ``task_heads`` / ``task_num_labels`` (one entry per task name)."""
        if self.task_names is None:
            check(self.task_heads is None and self.task_num_labels is None, "model.task_heads", self.task_heads,
                  "null without model.task_names")
            return
        names = self.task_names
        check(len(names) >= 1 and all(isinstance(n, str) and n for n in names), "model.task_names", names, "a list of non-empty names")
        dup = sorted({n for n in names if names.count(n) > 1})
        check(not dup, "model.task_names", names, f"distinct names ({', '.join(map(repr, dup))} repeats)")
        if self.task_heads is None:
            self.task_heads = [self.head] * len(names)
        if self.task_num_labels is None:
            self.task_num_labels = [None if h == "lm" else self.num_labels for h in self.task_heads]
        for key in ("task_heads", "task_num_labels"):
            value = getattr(self, key)
            check(len(value) == len(names), f"model.{key}", value, f"one entry per task ({len(names)}: {', '.join(names)})")
        for n in self.task_num_labels:
            check(n is None or n >= 2, "model.task_num_labels", self.task_num_labels, "integers >= 2 (or null: from the data)")

    @property
    def num_tasks(self) -> int:
        """Tasks sharing the body: ``len(task_names)``, or 1 for a single-task model."""
        return len(self.task_names) if self.task_names else 1

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads``, or ``n_heads`` when unset (multi-head attention)."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def ffn_hidden(self) -> int:
        if self.ffn.hidden is not None:
            return self.ffn.hidden
        if self.ffn.activation == "swiglu":  # keep parameters equal to a 4x GELU FFN
            return int(8 * self.d_model / 3 + 7) // 8 * 8
        return 4 * self.d_model


@dataclass
class TaskConfig:
    """One task of a multi-task run (``data.tasks``): its data, head and weights.

    The task's data section is the run's ``data`` section with ``source`` and the keys in ``data``
    replaced, so every loader and option of a single-task run serves a task too."""

    _section = "data.tasks[]"
    name: str = ""  # names the head (``heads.<name>``) and the metrics (``val/<name>/loss``)
    source: str = "stdlib"  # any data.source: 'stdlib', 'listops', 'stdlib-tokens', 'stdlib-packages', a path, 'hf:NAME'
    head: Head | None = None  # None = the built-in source's own task (a path or hf: source must say)
    loss_weight: float = 1.0  # multiplies this task's loss
    sampling_weight: float | None = None  # share of batches (normalised); None for every task = temperature over sizes
    data: dict = field(default_factory=dict)  # other data.* keys for this task only (seq_len, text_column, ...)

    def __post_init__(self) -> None:
        check(bool(self.name) and "/" not in self.name, "data.tasks[].name", self.name, "a non-empty name without '/'")
        where = f"data.tasks[{self.name}]"
        check(bool(self.source), f"{where}.source", self.source, "'stdlib', 'listops', a path, or 'hf:NAME'")
        own = _builtin_sources().get(self.source)
        if self.head is None:
            if own is None:
                raise ConfigError(_task_source_error(self.source, where))
            self.head = own
        check(own is None or own == self.head, f"{where}.head", self.head,
              f"{own!r}: the head matching source {self.source!r}")
        check(self.loss_weight > 0, f"{where}.loss_weight", self.loss_weight, "a number > 0")
        if self.sampling_weight is not None:
            check(self.sampling_weight > 0, f"{where}.sampling_weight", self.sampling_weight, "a number > 0 (or null: by size)")
        for key in ("tasks", "task", "source", "tokenizer", "bpe_vocab_size", "task_temperature", "task_mixing"):
            check(key not in self.data, f"{where}.data.{key}", self.data.get(key),
                  "not set per task (source and head are task keys; one tokenizer and one mixing serve every task)")


@dataclass
class DataConfig:
    """Where the data comes from and how it becomes token ids."""

    _section = "data"
    source: str = "stdlib"  # 'stdlib' (Python's own source), 'listops', 'stdlib-tokens', 'stdlib-packages', a file/folder path, or 'hf:NAME'
    task: Literal["lm", "classification", "token_classification"] = "lm"  # token_classification: a label per token
    tokenizer: Literal["byte", "bpe", "hf"] = "byte"  # bytes need no training; BPE is trained on the train split; hf = the run folder's imported tokenizer.json
    bpe_vocab_size: int = 4096  # BPE vocabulary size (tokenizer: bpe)
    seq_len: int = 256  # LM window length; classification inputs longer than this error or truncate
    truncate: bool = False  # classification: cut inputs longer than seq_len instead of raising
    val_fraction: float = 0.05  # fraction of files/rows held out for validation
    max_bytes: int | None = None  # cap on the corpus size read (None = all)
    encoding: str = "utf-8"  # text encoding of files read as text (any codec Python knows, e.g. latin-1)
    encoding_errors: Literal["strict", "replace", "ignore"] = "strict"  # undecodable bytes: refuse, U+FFFD, or drop
    text_column: str = "text"  # JSONL/CSV/HF column holding the text
    label_column: str = "label"  # JSONL/CSV/HF column holding the label (classification)
    hf_split: str = "train"  # HF dataset split to read
    hf_allow_download: bool = False  # never download unless asked
    listops_train: int = 2000  # ListOps examples (LRA: 96000 / 2000 / 2000)
    listops_val: int = 200
    listops_test: int = 200
    listops_min_len: int = 20  # keep sequences with min_len <= tokens <= max_len (LRA: 500..2000)
    listops_max_len: int = 120
    listops_max_depth: int = 10  # LRA: 10
    listops_max_args: int = 10  # LRA: 10 (operators take 2..max_args arguments)
    seed: int = 0  # seeds data generation and splits
    tasks: list[TaskConfig] | None = None  # several tasks in one run (one body, a head each); None = one task (above)
    task_temperature: float = 1.0  # tasks drawn with p_i ~ n_i^(1/T) over training sizes (T=1: by size; large: uniform)
    task_mixing: Literal["step", "batch"] = "step"  # step: each micro-batch is one task; batch: rows drawn per task

    def __post_init__(self) -> None:
        check_positive(self, "task_temperature")
        if self.tasks is not None:
            self._check_tasks()
        check(bool(self.source), "data.source", self.source, "'stdlib', 'listops', a path, or 'hf:NAME'")
        check_positive(self, "seq_len", "bpe_vocab_size")
        check(self.listops_max_depth >= 2, "data.listops_max_depth", self.listops_max_depth, "an integer >= 2 (the root is an operator)")
        check(0.0 < self.val_fraction < 1.0, "data.val_fraction", self.val_fraction, "0 < value < 1")
        if self.max_bytes is not None:
            check_positive(self, "max_bytes")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            check(False, "data.encoding", self.encoding, "a codec Python knows, e.g. 'utf-8', 'latin-1', 'cp1252'")
        for n in ("listops_train", "listops_val", "listops_test"):
            check(getattr(self, n) >= 0, f"data.{n}", getattr(self, n), "an integer >= 0")
        check(self.listops_max_args >= 2, "data.listops_max_args", self.listops_max_args, "an integer >= 2")
        check(
            1 <= self.listops_min_len <= self.listops_max_len,
            "data.listops_min_len",
            self.listops_min_len,
            f"1 <= listops_min_len <= listops_max_len={self.listops_max_len}",
        )


    def _check_tasks(self) -> None:
        tasks = self.tasks or []
        check(len(tasks) >= 1, "data.tasks", tasks, "a list of at least one task (or null: one task)")
        names = [t.name for t in tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        check(not dup, "data.tasks", names, f"tasks with distinct names ({', '.join(map(repr, dup))} repeats)")
        given = [t.sampling_weight is not None for t in tasks]
        check(all(given) or not any(given), "data.tasks[].sampling_weight", [t.sampling_weight for t in tasks],
              "a weight for every task, or none (then tasks are drawn by size and data.task_temperature)")
        listops = [t.name for t in tasks if t.source == "listops"]
        check(not listops or len(listops) == len(tasks), "data.tasks", names,
              f"tasks sharing one tokenizer: ListOps has its own ({', '.join(listops)}), so it mixes only with other ListOps tasks")

    def task_config(self, index: int) -> DataConfig:
        """The data section of task ``index``: this section with the task's source, head and keys."""
        task = (self.tasks or [])[index]
        base = {k: v for k, v in to_dict(self).items() if k not in ("tasks", "task_temperature", "task_mixing")}
        return from_dict(DataConfig, {**base, **task.data, "source": task.source, "task": task.head}, f"data.tasks[{task.name}]")


@dataclass
class DistillConfig:
    """Knowledge distillation from a trained teacher (``routelab.train.distill``); off by default."""

    _section = "train.distill"
    teacher: str | None = None  # a routelab run folder or save_pretrained folder; None = no distillation
    temperature: float = 2.0  # T: both softmaxes are taken at z / T; the KL term is scaled by T^2
    alpha: float = 0.5  # loss = (1 - alpha) * task + alpha * T^2 * KL(teacher || student)
    hidden_weight: float = 0.0  # > 0 adds this times the MSE between final hidden states

    def __post_init__(self) -> None:
        if self.teacher is not None:
            check(bool(self.teacher), "train.distill.teacher", self.teacher, "a folder path, or null (no distillation)")
        check_positive(self, "temperature")
        check_fraction(self, "alpha", closed_right=True)
        check(self.hidden_weight >= 0, "train.distill.hidden_weight", self.hidden_weight, "a number >= 0")


@dataclass
class TrainConfig:
    """Optimisation, evaluation, logging and checkpointing."""

    _section = "train"
    steps: int = 1000  # optimizer steps (also the length of the LR schedule)
    max_seconds: float | None = None  # wall-clock budget: stop, as finished, once training took this long
    batch_size: int = 16  # sequences per micro-batch, over all processes of a distributed run
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate (AdamW)
    router_lr_scale: float = 1.0  # MoE routers' weights train at lr times this (their own AdamW group)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50  # linear warmup from 0
    weight_decay: float = 0.1  # decoupled weight decay on matrices (not norms, biases, embeddings)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # global grad-norm clip; 0 disables
    eval_every: int = 200  # steps between validation passes (0 = only at the end)
    eval_batches: int = 20  # validation batches per pass (0 = the whole split)
    log_every: int = 10  # steps between metrics.jsonl lines
    checkpoint_every: int = 200  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    seed: int = 0  # seeds init, dropout and batch order
    device: str = "auto"  # 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # forward autocast dtype; fp32 weights, optimizer and routing (routelab.precision)
    threads: int | None = None  # torch.set_num_threads; None = torch's default
    progress: bool = True  # show a progress bar
    tensorboard: bool = False  # also log metrics to RUN_DIR/tensorboard (needs the tensorboard package)
    skip_nonfinite: bool = False  # skip (do not apply) an update whose loss or gradient is NaN/inf, instead of stopping
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"  # torchrun runs: auto = NCCL on CUDA, gloo on CPU
    dist_timeout: float = 300.0  # seconds a collective may wait (a dead rank ends the run after this)
    expert_parallel: int = 1  # P: spread each MoE layer's experts over groups of P processes (divides both)
    data_parallel: Literal["ddp", "fsdp"] = "ddp"  # several processes: replicate dense weights (ddp) or shard them (fsdp, routelab.train.fsdp)
    init_from: str | None = None  # a run or save_pretrained folder whose weights start the run (upcycled if the model differs)
    init_noise: float = 0.0  # with init_from: std of Gaussian noise on experts copied from a dense FFN (Komatsuzaki et al. 2023)
    distill: DistillConfig = field(default_factory=DistillConfig)  # a teacher's soft targets (off by default)

    def __post_init__(self) -> None:
        check_positive(self, "steps", "batch_size", "grad_accum", "lr", "router_lr_scale")
        if self.max_seconds is not None:
            check_positive(self, "max_seconds")
        check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", self.min_lr_ratio, "0 <= value <= 1")
        for n in ("warmup_steps", "eval_every", "eval_batches", "checkpoint_every", "weight_decay", "grad_clip"):
            check(getattr(self, n) >= 0, f"train.{n}", getattr(self, n), "a number >= 0")
        check(self.log_every >= 1, "train.log_every", self.log_every, "an integer >= 1")
        check(self.keep_checkpoints >= 1, "train.keep_checkpoints", self.keep_checkpoints, "an integer >= 1")
        check(0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0, "train.beta1/beta2", (self.beta1, self.beta2), "0 <= beta < 1")
        if self.threads is not None:
            check_positive(self, "threads")
        check_positive(self, "dist_timeout", "expert_parallel")
        check(self.init_noise >= 0, "train.init_noise", self.init_noise, "a number >= 0")
        check(
            not (self.precision == "fp16" and self.expert_parallel > 1),
            "train.precision",
            self.precision,
            "'fp32' or 'bf16' with train.expert_parallel > 1 (fp16's loss scaler would see each rank's own expert"
            " gradients and could skip a step on one rank only)",
        )
        check(
            not (self.data_parallel == "fsdp" and self.expert_parallel > 1),
            "train.data_parallel",
            self.data_parallel,
            "'ddp' with train.expert_parallel > 1 (fsdp does not compose with expert parallelism yet)",
        )
        check(
            not (self.data_parallel == "fsdp" and self.distill.teacher),
            "train.data_parallel",
            self.data_parallel,
            "'ddp' with train.distill.teacher (fsdp does not shard the distiller's projection yet)",
        )


@dataclass
class Config:
    """A whole run: model, data and training sections."""

    _section = "config"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.data.tasks is not None:
            self._resolve_tasks()
            self._resolve_expert_groups()
            return
        check(self.model.task_names is None, "model.task_names", self.model.task_names, "null without data.tasks (one task)")
        head_task = {"lm": "lm", "classification": "classification", "token_classification": "token_classification"}
        check(
            head_task[self.model.head] == self.data.task,
            "data.task",
            self.data.task,
            f"the task matching model.head={self.model.head!r} ({head_task[self.model.head]!r})",
        )
        check(
            self.data.seq_len <= self.model.max_seq_len,
            "data.seq_len",
            self.data.seq_len,
            f"<= model.max_seq_len={self.model.max_seq_len}",
        )
        self._resolve_expert_groups()

    def _resolve_tasks(self) -> None:
        """Multi-task: the model's heads follow ``data.tasks`` (names and head kinds, in order); each
        task's window fits the model. One body serves every task, so ``model.causal`` is one value:
        True when a task is an LM (a classification head then reads the last real token)."""
        tasks = self.data.tasks or []
        names, heads = [t.name for t in tasks], [t.head for t in tasks]
        model = self.model
        if model.task_names != names or model.task_heads != heads:
            check(model.task_names is None, "model.task_names", model.task_names, f"null or the data.tasks names {names}")
            model = dataclasses.replace(model, task_names=names, task_heads=heads, task_num_labels=None)
        self.model = model
        for i, t in enumerate(tasks):
            seq_len = self.data.task_config(i).seq_len
            check(seq_len <= model.max_seq_len, f"data.tasks[{t.name}].seq_len", seq_len, f"<= model.max_seq_len={model.max_seq_len}")
        check(not self.train.distill.teacher, "train.distill.teacher", self.train.distill.teacher,
              "null in a multi-task run (distillation reads one head)")
        check(not self.train.init_from, "train.init_from", self.train.init_from, "null in a multi-task run (heads differ)")
        check(self.train.data_parallel == "ddp", "train.data_parallel", self.train.data_parallel,
              "'ddp' in a multi-task run (fsdp needs every process to run the same forwards; not yet)")

    def _resolve_expert_groups(self) -> None:
        """Device-limited routing counts ranks: ``model.ffn.expert_groups`` null means one group per
        rank of ``train.expert_parallel``, written into the config so the model routes the same way
        wherever it runs later (one process, another expert-parallel size)."""
        ffn, P = self.model.ffn, self.train.expert_parallel
        if getattr(ffn, "max_ranks_per_token", None) is None:
            return
        if ffn.expert_groups is None:
            check(P > 1, "model.ffn.expert_groups", None,
                  "the number of expert groups max_ranks_per_token counts in (null takes train.expert_parallel, which is 1 here)")
            ffn.expert_groups = P
        check(ffn.expert_groups % P == 0, "model.ffn.expert_groups", ffn.expert_groups,
              f"a multiple of train.expert_parallel={P}, so that each group's experts sit on one rank")

    # -- I/O -----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> Config:
        return from_dict(cls, _task_heads_first(data), "")

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None, values: dict[str, Any] | None = None) -> Config:
        """The config at ``path`` with ``--set`` ``overrides`` and exact ``values`` applied
        (``apply_overrides``), validated once, after every change."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        data = read_yaml_mapping(path, "config file")
        return cls.from_dict(apply_overrides(resolve_base(data, path), overrides or [], values))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------------------------
# schema-aware steps of the conversion (the generic part is routelab.conversion)


def _task_heads_first(data: Any) -> Any:
    """A multi-task config's model section gets ``task_heads`` before it is built, so that
    ``model.causal`` (when null) is derived from the tasks' heads, not from ``model.head``."""
    if not isinstance(data, dict) or not isinstance(data.get("data"), dict) or not data["data"].get("tasks"):
        return data
    if not isinstance(data["data"]["tasks"], list):
        return data
    model = data.get("model", {})
    if not isinstance(model, dict) or "task_heads" in model:
        return data
    heads = []
    for i, t in enumerate(data["data"]["tasks"]):
        if not isinstance(t, dict):
            return data
        heads.append(from_dict(TaskConfig, t, f"data.tasks[{i}]").head)
    names = [t.get("name") for t in data["data"]["tasks"]]
    return {**data, "model": {**model, "task_names": names, "task_heads": heads}}


def model_config_from_dict(data: dict) -> ModelConfig:
    return from_dict(ModelConfig, data, "model")
