"""Routing inspection: where each token attends, and which expert each token goes to.

Works from a run folder alone (config + weights), on CPU, in seconds. The maps are computed by the
slow, explicit path (full score matrix under the kind's own allowed pairs), which is fine for one
example and is the same reference the sparse kinds are tested against.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor

from routelab.device import device_of

INSPECT_TOKENS = 128  # an LM example's length: long enough to show a window, short enough to read


def first_task(run: Any) -> tuple[Any, int]:
    """(data, seq_len) of a loaded run; of its first task in a multi-task run (the model's default task)."""
    from routelab.data import MultiTaskData

    if isinstance(run.data, MultiTaskData):
        return run.data.tasks[0], run.data.seq_lens[0]
    return run.data, run.cfg.data.seq_len


def num_validation_examples(run: Any) -> int:
    """How many validation examples ``validation_example`` can show: classification examples, or
    LM windows starting every ``seq_len`` tokens."""
    from routelab.data import ClassificationData

    data, seq_len = first_task(run)
    if isinstance(data, ClassificationData):
        return len(data.val)
    n = data.val.numel()
    length = min(seq_len, INSPECT_TOKENS, n)
    return (n - length) // seq_len + 1 if n else 0


def validation_example(run: Any, index: int) -> tuple[Tensor, list[str]]:
    """Token ids (1, T) and their strings for validation example ``index`` of a loaded run: a
    classification example, or the LM window starting at token ``index * seq_len`` (at most
    ``INSPECT_TOKENS`` long). An index outside ``0 .. num_validation_examples - 1`` is refused."""
    from routelab.data import ClassificationData

    tok = run.tokenizer
    data, seq_len = first_task(run)
    count = num_validation_examples(run)
    if not 0 <= index < count:
        allowed = f"0..{count - 1}" if count else "none: the validation split is empty"
        raise ValueError(f"--example {index} is out of range; this run's validation split has {count} examples ({allowed})")
    if isinstance(data, ClassificationData):
        ids = data.collate([data.val[index]], seq_len, truncate=True)["input_ids"]  # <cls> first for a classifier
    else:
        start = index * seq_len
        ids = data.val[start : start + min(seq_len, INSPECT_TOKENS)][None]
    return ids, [tok.id_to_token(int(i)) for i in ids[0]]


def text_example(run: Any, text: str) -> tuple[Tensor, list[str]]:
    """Token ids (1, T) and strings for a user's text (a CLS token first for classifiers). Empty text
    is refused; text longer than ``max_seq_len`` tokens is cut, with a warning."""
    tok = run.tokenizer
    ids = tok.encode(text)
    if not ids:
        raise ValueError("--text is empty (no tokens to route); give at least one character")
    if run.cfg.model.head == "classification":
        ids = [tok.cls_id, *ids]
    limit = run.cfg.model.max_seq_len
    if len(ids) > limit:
        logging.getLogger("routelab.report").warning("the text has %d tokens; inspecting the first %d (model.max_seq_len)", len(ids), limit)
        ids = ids[:limit]
    return torch.tensor([ids]), [tok.id_to_token(i) for i in ids]


def _capture_inputs(model: Any, ids: Tensor, attr: str, task_ids: Tensor | None = None) -> list[Tensor]:
    """Run the model once (with ``task_ids`` (B,) if given) and return the input of ``layer.<attr>`` for every layer."""
    seen: list[Tensor] = []
    device = device_of(model)
    ids = ids.to(device)
    task_ids = task_ids.to(device) if task_ids is not None else None
    hooks = [getattr(layer, attr).register_forward_pre_hook(lambda m, a, kw: seen.append(a[0] if a else kw["x"]), with_kwargs=True) for layer in model.layers]
    try:
        with torch.no_grad():
            model(ids, **({"task_ids": task_ids} if task_ids is not None else {}))
    finally:
        for h in hooks:
            h.remove()
    return seen


def attention_routes(model: Any, ids: Tensor, task: int | None = None) -> list[np.ndarray]:
    """Per layer, an (H, T, T) array of attention weights of ``ids`` (1, T).

    A kind that defines ``attention_weights(x) -> (B, H, T, T)`` reports its own (learned routers:
    the weights under the routes they chose); otherwise softmax(q k^T) is computed explicitly under the
    kind's static ``mask(T)`` (or causal/full for dense).
    """
    model.eval()
    maps = []
    task_ids = torch.tensor([task]) if task is not None else None
    for layer, x in zip(model.layers, _capture_inputs(model, ids, "attn", task_ids)):
        attn = layer.attn
        with torch.no_grad():
            if hasattr(attn, "attention_weights"):
                w = attn.attention_weights(x)
            else:
                w = _explicit_weights(attn, x)
        maps.append(w[0].float().cpu().numpy())
    return maps


def allowed_pairs(model: Any, seq_len: int) -> list[np.ndarray | None]:
    """Per layer, the static pattern's allowed pairs as a (1 or H, T, T) bool array (fixed patterns:
    local, strided, fixed, longformer, bigbird), or None for dense and learned kinds."""
    out = []
    for layer in model.layers:
        attn = layer.attn
        if not hasattr(attn, "mask"):
            out.append(None)
            continue
        with torch.no_grad():
            m = attn.mask(seq_len)
        out.append((m if m.dim() == 3 else m[None]).cpu().numpy())
    return out


def _explicit_weights(attn: Any, x: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(hd)) under the module's allowed pairs. x: (1, T, D) -> (1, H, T, T)."""
    T = x.shape[1]
    q, k = attn._heads(attn.q_proj(x)), attn.repeat_kv(attn._kv_heads(attn.k_proj(x)))  # (1, H, T, hd)
    if attn.rope is not None:
        q, k = attn.rope.rotate(q), attn.rope.rotate(k)
    scores = q @ k.transpose(-1, -2) / attn.head_dim**0.5  # (1, H, T, T)
    allowed = attn.mask(T) if hasattr(attn, "mask") else torch.ones(T, T, dtype=torch.bool, device=x.device)
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


def expert_routes(model: Any, ids: Tensor, task: int | None = None) -> dict[str, np.ndarray]:
    """Per MoE layer, a (T, E) matrix of gate weights: row t holds the gates of the experts token t
    was sent to (0 elsewhere). Uses the layer's ``route(x, token_ids)`` decision, as in training;
    ``task``: the task index the input is routed as (multi-task models)."""
    task_ids = torch.tensor([task]) if task is not None else None
    return {k: v[0].float().cpu().numpy() for k, v in _gate_matrices(model, ids, task_ids).items()}


def _gate_matrices(model: Any, ids: Tensor, task_ids: Tensor | None) -> dict[str, Tensor]:
    """Per MoE layer, the (B, T, E) gate matrix of ``ids`` (B, T) routed as tasks ``task_ids`` (B,)."""
    model.eval()
    out = {}
    ids = ids.to(device_of(model))
    task_ids = task_ids.to(ids.device) if task_ids is not None else None
    per_token = task_ids.reshape(-1, 1).expand(ids.shape) if task_ids is not None else None  # (B, T)
    for i, (layer, x) in enumerate(zip(model.layers, _capture_inputs(model, ids, "ffn", task_ids))):
        ffn = layer.ffn
        if not hasattr(ffn, "gate_matrix"):
            continue
        with torch.no_grad():
            kw = {"task_ids": per_token} if per_token is not None else {}
            out[f"layers.{i}.ffn"] = ffn.gate_matrix(x, token_ids=ids, **kw)  # (B, T, E)
    return out


def task_expert_loads(model: Any, ids: Tensor, task_ids: Tensor, attention_mask: Tensor | None = None) -> dict[str, np.ndarray]:
    """Per MoE layer, the (N, E) load matrix of a multi-task model: tokens of each task (N =
    ``model.cfg.num_tasks``) that each expert processed, for the batch ``ids`` (B, T) whose rows are
    tasks ``task_ids`` (B,); padding (``attention_mask`` 0) is not counted. Pair it with
    ``routelab.moe.task_stats.task_overlap`` and ``plots.task_expert_map``."""
    from routelab.moe.task_stats import task_expert_load

    device = device_of(model)
    real = attention_mask.reshape(-1).bool().to(device) if attention_mask is not None else None
    tasks = task_ids.to(device).reshape(-1, 1).expand(ids.shape).reshape(-1)  # (B*T,)
    out = {}
    for name, gates in _gate_matrices(model, ids, task_ids).items():
        routed = (gates.reshape(-1, gates.shape[-1]) > 0).float()  # (B*T, E)
        t = tasks
        if real is not None:
            routed, t = routed[real], t[real]
        out[name] = task_expert_load(routed, t, model.cfg.num_tasks).cpu().numpy()
    return out
