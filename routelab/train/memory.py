"""Will a training run fit in memory? A lower bound of what training holds at once, checked before
anything is allocated, and one line for an allocation that fails anyway.

The model is built on the meta device (shapes, no storage). Per process, training holds at its peak
at least (Kingma & Ba 2015 / Loshchilov & Hutter 2019 for AdamW's two moments per parameter):

    weights 4P + AdamW moments 8P + max(activations A, gradients 4P)     (bytes, float32 master weights)

(gradients are freed between steps, ``zero_grad(set_to_none=True)``, so at the end of a forward pass
they do not exist yet; at the optimizer step the activations are gone). Expert parallelism divides
the experts' share of P by its size. A counts only tensors autograd must keep for the backward pass,
per token of the micro-batch's ``N = rows x seq_len`` tokens and per block:

    attention  4D + 2 D_kv   (the block input, its norm, q, k, v, the attention output; SDPA's fused
                              kernels keep no T x T score matrix, so none is counted)
    FFN        c H           (c = 1 relu, 2 gelu, 3 swiglu hidden tensors of width H; an MoE layer:
                              min(1, experts per token) x c' H, c' = 1, or 2 for swiglu: the
                              pre-activations the grouped kernel of ``routelab.moe.dispatch`` keeps,
                              plus its shared experts, plus E router probabilities if learned)

plus, for a language-model head, the float32 log-probabilities of the loss and their gradient
(2 x N x vocab). Everything else (norm statistics, masks, buffers, the allocator's slack, a
distillation teacher) is left out, so a config refused here cannot fit; one accepted may still fail,
and ``out_of_memory_message`` turns that failure into one line. Sequences of labelled tasks are
padded to the longest of their batch, which the config does not tell: they count one token.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from routelab.config import Config, ModelConfig
from routelab.errors import ConfigError
from routelab.io import format_bytes

FLOAT32 = 4
STATE_BYTES = 8  # AdamW's exp_avg and exp_avg_sq, float32 per trained parameter
ACTIVATION_TENSORS = {"relu": 1, "gelu": 2, "swiglu": 3}  # hidden-width tensors a dense FFN keeps for backward
EXPERT_TENSORS = {"relu": 1, "gelu": 1, "swiglu": 2}  # the grouped expert kernel keeps only its pre-activations


@dataclass(frozen=True)
class MemoryEstimate:
    """A lower bound of one process's peak training memory, in bytes, and what it is made of."""

    parameters: int  # parameters this process holds (experts: its expert-parallel share)
    trained: int  # of which trained (``requires_grad``): these have gradients and AdamW state
    activations: int  # bytes autograd keeps for the backward pass of one micro-batch
    tokens: int  # tokens of that micro-batch on this process (rows x seq_len)

    @property
    def weights_and_state(self) -> int:
        return FLOAT32 * self.parameters + STATE_BYTES * self.trained

    @property
    def total(self) -> int:
        return self.weights_and_state + max(self.activations, FLOAT32 * self.trained)


def estimate_training_memory(model_cfg: ModelConfig, cfg: Config, world_size: int = 1) -> MemoryEstimate:
    """The lower bound of the module docstring for one of ``world_size`` processes training
    ``model_cfg`` (sizes resolved, or placeholders) with ``cfg.train`` and ``cfg.data``; the model is
    built on the meta device, so nothing is allocated."""
    from routelab.model import RoutedTransformer
    from routelab.moe.experts import Experts

    with torch.device("meta"):
        model = RoutedTransformer(model_cfg)
    P = cfg.train.expert_parallel
    params = {id(p): p for p in model.parameters()}
    expert_ids = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}
    share = {k: (p.numel() // P if k in expert_ids else p.numel()) for k, p in params.items()}
    trained = sum(n for k, n in share.items() if params[k].requires_grad)
    rows = max(cfg.train.batch_size // world_size, 1)
    tokens = rows * sequence_tokens(cfg)
    width = FLOAT32 if cfg.train.precision == "fp32" else 2  # autocast keeps bf16/fp16 activations
    heads = model_cfg.task_heads or [model_cfg.head]
    loss = 2 * model_cfg.vocab_size * FLOAT32 if "lm" in heads else 0  # float32 log-probabilities and their gradient
    per_token = activation_values_per_token(model, model_cfg, sequence_tokens(cfg)) * width + loss
    return MemoryEstimate(sum(share.values()), trained, tokens * per_token, tokens)


def sequence_tokens(cfg: Config) -> int:
    """Tokens per row of a training batch: ``data.seq_len`` for language-model windows (the longest
    task's in a multi-task run); 1 when no task is an LM (labelled rows are padded per batch)."""
    if cfg.data.tasks is None:
        return cfg.data.seq_len if cfg.data.task == "lm" else 1
    lengths = [cfg.data.task_config(i).seq_len for i, t in enumerate(cfg.data.tasks) if t.head == "lm"]
    return max(lengths, default=1)


def activation_values_per_token(model: torch.nn.Module, model_cfg: ModelConfig, seq_len: int) -> int:
    """Values per token that the blocks' forward pass must keep for backward (module docstring)."""
    from routelab.ffn.dense import FeedForward
    from routelab.model import Block
    from routelab.moe.layer import MoE

    D, D_kv = model_cfg.d_model, model_cfg.kv_heads * model_cfg.head_dim
    total = 0.0
    for block in (m for m in model.modules() if isinstance(m, Block)):
        total += 4 * D + 2 * D_kv
        for m in block.modules():
            if isinstance(m, FeedForward):  # a dense FFN, or an MoE layer's shared experts
                total += ACTIVATION_TENSORS.get(m.activation, 1) * m.w_in.out_features
            elif isinstance(m, MoE):
                k = min(1.0, m.router.experts_per_token(seq_len))
                total += k * EXPERT_TENSORS.get(m.experts.activation, 1) * m.experts.hidden
                total += m.experts.num_experts if m.router.learned else 0
    return int(total)


def available_memory(device: torch.device, processes: int) -> tuple[int, str] | None:
    """Bytes one training process may use on ``device``, and how to name them in a message; None
    when it cannot be told. CPU: ``MemAvailable`` plus free swap (``/proc/meminfo``), shared by the
    ``processes`` of this machine. CUDA: the GPU's total memory (each process has its own GPU; its
    free memory would count what the other processes of the run already took)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
        index %= max(torch.cuda.device_count(), 1)
        total = torch.cuda.get_device_properties(index).total_memory
        return total, f"the {format_bytes(total)} of GPU cuda:{index}"
    if device.type != "cpu":
        return None
    info = meminfo()
    if "MemAvailable" not in info:
        return None
    free = info["MemAvailable"] + info.get("SwapFree", 0)
    if processes > 1:
        each = free // processes
        return each, f"the {format_bytes(each)} each of its {processes} processes may use ({format_bytes(free)} in all)"
    return free, f"the {format_bytes(free)} this machine has available"


def meminfo(path: str | Path = "/proc/meminfo") -> dict[str, int]:
    """``/proc/meminfo`` as name -> bytes; empty where there is no such file (macOS, Windows)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        m = re.match(r"(\w+):\s+(\d+)\s*kB", line)
        if m:
            out[m.group(1)] = int(m.group(2)) * 1024
    return out


def local_processes(world_size: int | None) -> int:
    """Training processes on this machine: ``world_size`` when this process is about to start them
    (``--nproc``), else the launcher's ``LOCAL_WORLD_SIZE``, else 1."""
    if world_size:
        return world_size
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def check_training_memory(
    cfg: Config, model_cfg: ModelConfig, device: torch.device, world_size: int | None = None
) -> None:
    """Raise ``ConfigError`` (one line: the estimate, its parts and the memory available) when the
    lower bound of ``estimate_training_memory`` exceeds the memory one process may use."""
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    processes = local_processes(world_size) if device.type == "cpu" else 1
    available = available_memory(device, processes)
    if available is None:
        return
    limit, where = available
    est = estimate_training_memory(model_cfg, cfg, world)
    if est.total <= limit:
        return
    T = sequence_tokens(cfg)
    rows = est.tokens // T
    parts = (
        f"weights and AdamW state of {est.parameters:,} parameters: {format_bytes(est.weights_and_state)};"
        f" activations of {rows:,} rows x {T:,} tokens: {format_bytes(est.activations)}"
    )
    fix = (
        "lower train.batch_size (raise train.grad_accum to keep the batch) or data.seq_len"
        if est.activations > est.weights_and_state
        else "make the model smaller (model.d_model, model.n_layers, model.ffn.num_experts, model.max_seq_len with"
        " learned positions, model.vocab_size)"
    )
    each = " per process" if world > 1 else ""
    raise ConfigError(
        f"this run needs at least {format_bytes(est.total)} of memory{each} ({parts}), more than {where}; {fix}"
    )


def out_of_memory_message(error: BaseException) -> str | None:
    """One line for an allocation that failed although the estimate let the run start
    (``MemoryError``, the CPU allocator's or CUDA's out-of-memory ``RuntimeError``), else None."""
    text = str(error)
    oom = isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())
    )
    if not oom:
        return None
    cpu = re.search(r"tried to allocate (\d+) bytes", text)  # the CPU allocator counts bytes
    cuda = re.search(r"tried to allocate ([\d.]+ [KMGT]?i?B)", text, re.IGNORECASE)  # CUDA's allocator: "2.00 GiB"
    size = format_bytes(int(cpu.group(1))) if cpu else cuda.group(1) if cuda else None
    size = f" (an allocation of {size} failed)" if size else ""
    where = "GPU memory" if "cuda" in text.lower() else "memory"
    return (
        f"out of {where}{size}; lower train.batch_size (raise train.grad_accum to keep the batch), data.seq_len or"
        " the model's size"
    )


__all__ = [
    "MemoryEstimate",
    "available_memory",
    "check_training_memory",
    "estimate_training_memory",
    "out_of_memory_message",
]
