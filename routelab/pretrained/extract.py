"""Extract one task's model from a task-level MoE (Kudugunta et al. 2021, sec. 3: "at inference,
only the experts of the task are loaded").

Every MoE layer of the source routes by task id alone (``router: task``), so task t's tokens only
ever reach its k table experts. The extracted model keeps, in each MoE layer, those k experts (in
table order) behind a task router of one task whose table is [0..k-1] and whose gates are task t's;
everything else (embeddings, attention, dense layers, shared experts, norms, the head) is copied.
On task t it computes exactly what the source computes, with E - k fewer experts per MoE layer.

``extract_task(model, task)`` is the transform; ``write_extracted_run`` writes it as a run folder
(``routelab extract RUN --task NAME --out DIR``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from routelab.config import Config, ModelConfig
from routelab.device import device_of
from routelab.errors import ConfigError
from routelab.model import RoutedTransformer
from routelab.moe.layer import MoE


def task_index(cfg: ModelConfig, task: str | int) -> int:
    """The index of ``task`` (a name in ``cfg.task_names`` or an index) or a one-line error."""
    names = cfg.task_names or []
    if isinstance(task, int) and not isinstance(task, bool):
        if not 0 <= task < len(names):
            raise ConfigError(f"task {task} is out of range; the model's tasks are 0..{len(names) - 1} ({', '.join(names)})")
        return task
    if task not in names:
        raise ConfigError(f"unknown task {task!r}; the model's tasks are: {', '.join(names) or 'none (model.task_names is empty)'}")
    return names.index(task)


def _check_task_routed(model: RoutedTransformer) -> list[int]:
    """Indices of the MoE layers; refuse a model with none or with one whose router is not ``task``."""
    moe = [i for i, layer in enumerate(model.layers) if isinstance(layer.ffn, MoE)]
    if not moe:
        raise ConfigError("the model has no MoE layers; extract needs a task-level MoE (model.ffn.kind=moe, router: task)")
    other = sorted({model.layers[i].ffn.router.kind for i in moe} - {"task"})
    if other:
        raise ConfigError(
            f"extract needs every MoE layer to route by task (model.ffn.router.kind=task); this model uses {', '.join(other)},"
            " whose experts serve tokens of every task"
        )
    if model.layers[moe[0]].ffn.expert_parallel is not None:
        raise ConfigError("extract works on a model whose experts are all local (not expert-parallel)")
    return moe


def extract_task(model: RoutedTransformer, task: str | int) -> RoutedTransformer:
    """The model of task ``task`` alone (a name in ``model.cfg.task_names`` or its index), in eval mode.

    Its outputs on that task's inputs equal ``model``'s called with ``task_ids`` = that task; it is
    called without task ids (one task). Of the per-task heads only the task's own is kept."""
    cfg = model.cfg
    moe_layers = _check_task_routed(model)
    t = task_index(cfg, task)
    k = len(model.layers[moe_layers[0]].ffn.router.experts_of(t))
    router = dataclasses.replace(cfg.ffn.router, table=None)  # one task: the default table [[0 .. k-1]]
    new_cfg = dataclasses.replace(
        cfg, task_names=[cfg.task_names[t]], ffn=dataclasses.replace(cfg.ffn, num_experts=k, router=router),
        task_heads=[cfg.task_heads[t]] if cfg.task_heads else None,  # only the task's own head is kept
        task_num_labels=[cfg.task_num_labels[t]] if cfg.task_num_labels else None,
    )
    with torch.random.fork_rng(devices=[]):  # its initial values are all overwritten: leave the caller's RNG alone
        small = RoutedTransformer(new_cfg).to(device_of(model))
    source = model.state_dict()
    state = {}
    for i in moe_layers:
        ffn = model.layers[i].ffn
        kept = ffn.router.experts_of(t)  # (k,) task t's experts, in table (slot) order
        prefix = f"layers.{i}.ffn."
        for name, tensor in ffn.experts.state_dict().items():
            state[f"{prefix}experts.{name}"] = tensor.index_select(0, kept.to(tensor.device))  # (k, ...)
        for name, tensor in ffn.router.restricted_to(t).items():  # a one-task router over the kept experts
            state[f"{prefix}router.{name}"] = tensor
    for name, tensor in small.state_dict().items():
        if name not in state:
            state[name] = source[name]
        if tuple(state[name].shape) != tuple(tensor.shape):  # a part of the MoE layer this transform does not know
            raise ConfigError(f"cannot extract {name}: shape {tuple(state[name].shape)} in the source, {tuple(tensor.shape)} per task")
    small.load_state_dict({n: v.detach().clone() for n, v in state.items()})
    return small.eval()


def write_extracted_run(run_dir: str | Path, task: str, out: str | Path) -> tuple[Path, RoutedTransformer, RoutedTransformer]:
    """``routelab extract RUN --task NAME --out DIR``: task ``task``'s model written as a run folder
    (``config.yaml``, ``tokenizer.json``, ``model/``) that ``eval`` and ``generate`` read. ``out`` must
    not exist or be empty; it appears whole or not at all. Returns (out, source model, extracted)."""
    from routelab.outputs import check_run_target, is_empty
    from routelab.train.run import RunError, load_run, write_run_folder

    out = check_run_target(out, [("the run folder", run_dir)])
    if not is_empty(out):
        raise RunError(f"output folder {str(out)!r} already holds a run; choose a new or empty --out")
    run = load_run(run_dir)
    small = extract_task(run.model, task)
    data = run.cfg.data
    if data.tasks:  # the run's config names the one task left
        data = dataclasses.replace(data, tasks=[tc for tc in data.tasks if tc.name == small.cfg.task_names[0]])
    cfg: Config = dataclasses.replace(run.cfg, model=small.cfg, data=data)
    write_run_folder(out, cfg, run.tokenizer, small)
    return out, run.model, small
