"""Model folders, written whole: a run's final ``model/`` (``export_model``) and ``routelab export RUN
--out DIR`` (``export_checkpoint``): a checkpoint's weights as a folder ``RoutedTransformer.from_pretrained``
reads (``model.safetensors``, ``tokenizer.json``, then ``config.json`` with the weights' SHA-256).

Both are written into a staging folder beside the target and swapped in (``routelab.io.replace_dir``),
so an earlier folder stays whole until the new one is. ``export_checkpoint`` reads the checkpoint one
tensor at a time and writes each before reading the next (``routelab.io.write_safetensors``): its
memory is about one tensor, whatever the model's size.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from routelab.data import load_tokenizer
from routelab.io import lazy_tensors, make_temp_dir, replace_dir, write_safetensors
from routelab.lock import locked
from routelab.model import WEIGHTS_FILE, RoutedTransformer, write_config_json
from routelab.outputs import check_model_target, is_empty
from routelab.train.checkpoint import MODEL_FILE, list_checkpoints, verify_checkpoint
from routelab.train.run import CONFIG_FILE, MODEL_DIR, TOKENIZER_FILE, RunError, load_run_config, run_shapes


def export_model(model: RoutedTransformer, tokenizer: Any, folder: Path) -> None:
    """Write the final ``model/`` (weights, config, tokenizer) into a staging folder and swap it in,
    so the previous export stays whole until the new one is."""
    tmp = make_temp_dir(folder.parent, folder.name)
    try:
        model.save_pretrained(tmp)
        tokenizer.save(tmp)
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_checkpoint(run_dir: str | Path, out: str | Path, checkpoint: str = "latest", force: bool = False) -> tuple[Path, int]:
    """Write checkpoint ``checkpoint`` (a step, or ``latest``) of run ``run_dir`` as the model folder
    ``out``; return ``out`` and the step.

    ``out`` may not overlap what is read (the checkpoint, the run's config and tokenizer) and may hold
    nothing but a routelab model folder (``routelab.outputs``); one there is refused unless ``force``,
    and then replaced only once the new folder is complete. The checkpoint's weights are checked
    (checksum, shapes against the run's config) before anything is written."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise RunError(f"{str(run_dir)!r} is not a routelab run folder: {CONFIG_FILE} is missing")
    ckpt = choose_checkpoint(run_dir, checkpoint)
    sources = [("the checkpoint", ckpt), ("the run's config", cfg_path), ("the run's tokenizer", run_dir / TOKENIZER_FILE)]
    out = check_model_target(out, sources)
    if not is_empty(out) and not force:
        raise RunError(f"output folder {str(out)!r} already holds a model; pass --force to replace it, or choose another --out")
    cfg = load_run_config(cfg_path)
    tokenizer = load_tokenizer(run_dir)
    step = verify_checkpoint(ckpt, run_shapes(cfg, cfg_path), files=(MODEL_FILE,))["step"]
    with locked(out, "routelab export", enabled=out.is_dir()):
        staging = make_temp_dir(out.parent, out.name)
        try:
            digest = write_safetensors(staging / WEIGHTS_FILE, *lazy_tensors(ckpt / MODEL_FILE))
            tokenizer.save(staging)
            write_config_json(staging, cfg.model, digest)  # last: the folder is a complete model
            replace_dir(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return out, step


def choose_checkpoint(run_dir: Path, which: str) -> Path:
    """The checkpoint folder ``which`` names: ``latest`` (the newest complete one) or a step number."""
    found = list_checkpoints(run_dir)
    if not found:
        final = f"; its {MODEL_DIR}/ folder is already a saved model" if (run_dir / MODEL_DIR / "config.json").is_file() else ""
        raise RunError(f"{str(run_dir)!r} holds no complete checkpoint (checkpoints/step_*/state.json){final}")
    if which == "latest":
        return found[-1][1]
    steps = ", ".join(str(s) for s, _ in found)
    if not re.fullmatch(r"\d+", which):
        raise RunError(f"--checkpoint {which!r} is invalid; allowed: latest or a step number (this run has {steps})")
    for step, path in found:
        if step == int(which):
            return path
    raise RunError(f"{str(run_dir)!r} has no checkpoint at step {int(which)}; its checkpoints: {steps}")
