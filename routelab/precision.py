"""Mixed precision: which dtype the forward pass computes in, and the parts that stay in float32.

``train.precision`` (and ``--dtype`` of ``eval``/``generate``) names the autocast dtype:

- ``fp32``: no autocast; everything in float32 (the default, and the reference).
- ``bf16``: ``torch.autocast`` with bfloat16 (CPU and CUDA). Same exponent range as float32, so no
  loss scaling (Kalamkar et al. 2019, "A Study of BFLOAT16 for Deep Learning Training").
- ``fp16``: ``torch.autocast`` with float16 plus dynamic loss scaling (``torch.amp.GradScaler``;
  Micikevicius et al. 2018, "Mixed Precision Training", sec. 3.2): the loss is multiplied by S
  before backward so small gradients do not flush to zero, gradients are divided by S before
  clipping, and a step whose gradients overflowed is skipped while S halves.

Parameters, gradients and optimizer state stay float32 ("master weights", Micikevicius et al. sec.
3.1), so checkpoints are float32 whatever the precision. Routing decisions and their losses are
computed in float32 inside ``in_fp32`` regions: the MoE routers (logits, softmax, gates, balance
and z losses; Fedus et al. 2022, "Switch Transformers", sec. 2.4 "selective precision": a bfloat16
router softmax made training unstable), and the learned attention routers (block scores of
moba/block_topp, k-means affinities and centroid updates, the synthesizer's router and softmax).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_of(precision: str) -> torch.dtype:
    """``'bf16'`` -> ``torch.bfloat16`` (one of ``PRECISIONS``)."""
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    return DTYPES[precision]


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The forward pass's context: ``torch.autocast`` to ``precision`` on ``device``'s type, or a
    no-op for fp32."""
    dtype = dtype_of(precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=dtype)


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """A loss scaler, enabled for fp16 only (bf16 and fp32 need none: a disabled scaler's
    ``scale``/``unscale_``/``step``/``update`` are pass-throughs)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


def cpu_has_bf16() -> bool:
    """Whether oneDNN finds bf16 instructions on this CPU (AVX512-BF16 or AMX). Without them it
    emulates bf16 matmuls, far slower than fp32; if the check itself is missing, assume they exist."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def slow_precision_warning(device: torch.device | str, precision: str) -> str | None:
    """A warning when ``precision`` trains much slower than fp32 on ``device``, else None: fp16 on
    any CPU (few fp16 kernels), bf16 on a CPU without bf16 instructions (``cpu_has_bf16``)."""
    if torch.device(device).type != "cpu":
        return None
    if precision == "fp16":
        return ("train.precision=fp16 on the CPU runs many times slower than fp32 (CPUs have few fp16 kernels);"
                " bf16 is the CPU's low precision")
    if precision == "bf16" and not cpu_has_bf16():
        return ("train.precision=bf16: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so bf16 runs several"
                " times slower than fp32 here; use train.precision=fp32")
    return None


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device_type`` now, or None when it is off (for code that
    autocast cannot see: ``out=`` kernels, helper threads, custom autograd Functions)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


@contextlib.contextmanager
def fp32_region(device_type: str) -> Iterator[bool]:
    """Autocast off on ``device_type`` inside; yields whether it had been on (then the caller
    should cast its low-precision inputs up: with autocast off, ops run in their inputs' dtype)."""
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            yield True
    else:
        yield False


def _up(x: Any) -> Any:
    return x.float() if isinstance(x, Tensor) and x.is_floating_point() and x.dtype != torch.float64 else x


def run_fp32(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with autocast off and floating tensor arguments cast to float32 when
    autocast was on (float64 is left alone); outside autocast a plain call."""
    device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
    if device is None:
        return fn(*args, **kwargs)
    with fp32_region(device.type) as was_on:
        if not was_on:
            return fn(*args, **kwargs)
        return fn(*[_up(a) for a in args], **{k: _up(v) for k, v in kwargs.items()})


def in_fp32(fn: Callable) -> Callable:
    """Decorator: run ``fn`` through ``run_fp32`` (float32 under autocast; methods too: ``self`` is
    not a tensor and passes through)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return run_fp32(fn, *args, **kwargs)

    return wrapper
