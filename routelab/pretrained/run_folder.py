"""``routelab import hf PATH --out DIR``: an imported model written as an ordinary run folder.

DIR holds what ``routelab train`` leaves behind (``config.yaml``, ``tokenizer.json``, ``model/``), so
``routelab generate DIR``, ``routelab eval DIR`` (with data that fits the model) and training
initialised from DIR read it like any run. The folder is staged beside DIR and moved into place
whole, so DIR is never half-written.
"""

from __future__ import annotations

from pathlib import Path

from routelab.config import Config, DataConfig, TrainConfig
from routelab.lock import locked
from routelab.outputs import check_run_target, is_empty
from routelab.pretrained.hf import from_hf, load_hf_tokenizer
from routelab.train.run import RunError, write_run_folder

IMPORT_SEQ_LEN = 256  # data.seq_len written for the imported run (at most the model's max_seq_len)
FINETUNE_LR = 1e-4  # train.lr written: a fine-tuning rate, not the from-scratch default


def import_hf_run(path: str | Path, out: str | Path, force: bool = False) -> Config:
    """Import the Hugging Face folder ``path`` into the run folder ``out``; return its config.

    ``out`` may not be ``path``, contain it or lie inside it, and may hold nothing but a routelab run
    (``routelab.outputs``). A run there is refused unless ``force``; with ``force`` it is replaced only
    once the new folder is complete, and not while another process holds its lock (trains in it)."""
    out = check_run_target(out, [("the checkpoint folder", path)])
    if not is_empty(out) and not force:
        raise RunError(f"output folder {str(out)!r} already holds a run; pass --force to replace it, or choose another --out")
    with locked(out, "routelab import hf", enabled=out.is_dir()):
        return _import(path, out)


def _import(path: str | Path, out: Path) -> Config:
    model = from_hf(path)
    tokenizer = load_hf_tokenizer(path)
    mc = model.cfg
    if tokenizer.vocab_size > mc.vocab_size:
        raise RunError(f"the tokenizer of {str(path)!r} has {tokenizer.vocab_size} tokens but the model only {mc.vocab_size} embeddings")
    task = "lm" if mc.head == "lm" else mc.head
    cfg = Config(
        model=mc,
        data=DataConfig(task=task, tokenizer="hf", seq_len=min(IMPORT_SEQ_LEN, mc.max_seq_len)),
        train=TrainConfig(lr=FINETUNE_LR),
    )
    write_run_folder(out, cfg, tokenizer, model)
    return cfg
