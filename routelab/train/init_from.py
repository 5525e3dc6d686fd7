"""Starting from another model's weights: ``train.init_from`` (``routelab train --init-from DIR``)
and the run folder ``routelab upcycle`` writes.

A source is a run folder (``config.yaml``: its ``model/``, else its newest checkpoint, read by
``load_run``) or a ``save_pretrained`` folder (``config.json`` + ``model.safetensors``; a run's
``model/`` also holds its ``tokenizer.json``). Its weights are mapped onto the new run's model by
``routelab.upcycle``: the same model loads as it is; a dense FFN becoming an MoE, another
attention kind or a longer ``max_seq_len`` are upcycled (logged in one line). The new run starts at
step 0 with a fresh optimizer and LR schedule; a resumed run reads its own checkpoint, not the source.

Tokenizer policy: the new run uses the source's ``tokenizer.json`` (copied into the run folder),
since the weights were trained on its ids. A ``data.tokenizer`` of another kind is refused (one line
saying which to set); ``model.vocab_size`` / ``num_labels`` left null are the source's. A source
without ``tokenizer.json`` is accepted only with ``data.tokenizer: byte`` (a fixed vocabulary).
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from routelab.config import Config, DataConfig, apply_overrides, to_dict
from routelab.data import load_tokenizer
from routelab.data.tokenizers import ByteTokenizer
from routelab.errors import ConfigError
from routelab.hf_folder import hf_model_type
from routelab.model import CONFIG_JSON, RoutedTransformer
from routelab.outputs import check_run_target, is_empty
from routelab.train.run import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    RunError,
    load_run,
    load_run_config,
    write_run_folder,
)
from routelab.upcycle import Conversion, check_convertible, fill_from_source, upcycle_into, upcycle_with_conversion

log = logging.getLogger("routelab.train")


@dataclass
class InitSource:
    """A folder's weights: ``model`` (eval mode, CPU), its ``tokenizer.json`` (None if it has none),
    and its run config (None for a model folder)."""

    path: Path
    model: RoutedTransformer
    tokenizer_file: Path | None
    config: Config | None


def read_init_source(path: str | Path, then: str = "upcycle DIR") -> InitSource:
    """Read a run folder or a ``save_pretrained`` folder; anything else raises ``RunError`` (one line).
    A Hugging Face folder is refused with the import command to run first, and ``then`` the step
    that reads the imported ``DIR``."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        run = load_run(path)
        return InitSource(path, run.model, path / TOKENIZER_FILE, run.cfg)
    model_type = hf_model_type(path)
    if model_type is not None:
        raise RunError(f"{str(path)!r} is a Hugging Face checkpoint (model_type {model_type!r}), not a routelab model; run "
                       f"`routelab import hf {shlex.quote(str(path))} --out DIR` first, then {then}")
    if (path / CONFIG_JSON).is_file():
        tokenizer = path / TOKENIZER_FILE
        return InitSource(path, RoutedTransformer.from_pretrained(path), tokenizer if tokenizer.is_file() else None, None)
    what = "does not exist" if not path.exists() else "is not a run folder (config.yaml) nor a saved model folder (config.json)"
    raise RunError(f"{str(path)!r} {what}; give a folder written by routelab train, routelab upcycle or save_pretrained")


def check_tokenizer(cfg: Config, source: InitSource) -> None:
    """The run must use the source's tokenizer kind (see the module docstring)."""
    where = f"train.init_from={str(source.path)!r}"
    if source.tokenizer_file is None:
        if cfg.data.tokenizer == "byte" and cfg.data.source != "listops":
            return
        raise RunError(
            f"{where} has no {TOKENIZER_FILE}, so the token ids its weights were trained on are unknown;"
            f" put the model's {TOKENIZER_FILE} beside its config.json"
        )
    kind = load_tokenizer(source.tokenizer_file).kind
    text_kinds = typing.get_args(typing.get_type_hints(DataConfig)["tokenizer"])
    if kind in text_kinds and kind != cfg.data.tokenizer:
        raise ConfigError(
            f"{where} holds a {kind!r} tokenizer but data.tokenizer={cfg.data.tokenizer!r}; the run uses the"
            f" weights' tokenizer: set data.tokenizer={kind}"
        )


def start_from(cfg: Config) -> tuple[Config, InitSource]:
    """For a fresh run with ``train.init_from``: read the source, take its vocabulary / label sizes
    where the config leaves them null, and check that its weights map onto the config's model and
    its tokenizer fits, before any data is read. Returns the config to train and the source."""
    try:
        with torch.random.fork_rng(devices=[]):  # reading builds a model: leave the run's RNG stream alone
            source = read_init_source(cfg.train.init_from, then="train --init-from DIR")
    except RunError as e:
        raise RunError(f"train.init_from: {e}") from None
    model = fill_from_source(cfg.model, source.model.cfg)
    try:
        check_convertible(source.model.cfg, model)
    except ConfigError as e:
        raise ConfigError(f"train.init_from={str(source.path)!r}: {e}") from None
    check_tokenizer(cfg, source)
    return dataclasses.replace(cfg, model=model), source


def resumed_sizes(cfg: Config, out: Path) -> Config:
    """A resumed run that started from ``init_from`` keeps the vocabulary / label sizes it took from
    its source, read from its own ``config.yaml`` (the source folder is no longer read)."""
    saved = load_run_config(out / CONFIG_FILE)
    if not saved.train.init_from:
        return cfg
    return dataclasses.replace(cfg, model=fill_from_source(cfg.model, saved.model))


def copy_tokenizer(cfg: Config, source: InitSource, out: Path) -> tuple[Config, InitSource]:
    """The source's ``tokenizer.json`` into the run folder, where the data loader reads it; returns
    its arguments (``copy_tokenizer(*start_from(cfg), out)``)."""
    if source.tokenizer_file is not None:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source.tokenizer_file, out / TOKENIZER_FILE)
    return cfg, source


def init_model(model: RoutedTransformer, source: InitSource, cfg: Config) -> Conversion:
    """Fill the freshly built ``model`` with the source's weights (noise on expert copies:
    ``train.init_noise``, seeded by ``train.seed``) and log what was done in one line."""
    gen = torch.Generator().manual_seed(cfg.train.seed)
    done = upcycle_into(model, source.model.cfg, source.model.state_dict(), cfg.train.init_noise, gen)
    if done.plain_load:
        log.info("initialised from %s: all %d tensors loaded", source.path, len(done.copied))
    else:
        log.info("initialised from %s, upcycled: %s", source.path, done.describe())
    return done


# ----------------------------------------------------------------------------------------------
# routelab upcycle


def write_upcycled(
    source_dir: str | Path, out: str | Path, overrides: list[str], noise: float = 0.0, seed: int = 0
) -> tuple[Path, Conversion]:
    """``routelab upcycle``: the source's config with ``overrides`` (``model.ffn.kind=moe``, ...)
    applied, its weights upcycled onto that model, written as a run folder (``config.yaml``,
    ``tokenizer.json``, ``model/``) that ``generate``, ``eval`` and ``train --init-from`` read.
    ``out`` must not exist or be empty; it appears whole or not at all."""
    out = check_run_target(out, [("the source folder", source_dir)])
    if not is_empty(out):
        raise RunError(f"output folder {str(out)!r} already holds a run; choose a new or empty --out")
    source = read_init_source(source_dir)
    tokenizer = load_tokenizer(source.tokenizer_file) if source.tokenizer_file else None
    if source.config is not None:
        base = source.config.to_dict()
    else:  # a model folder: its model, default data and training sections that fit it
        m = source.model.cfg
        data = {"task": m.head, "seq_len": min(DataConfig.seq_len, m.max_seq_len)}
        if tokenizer is not None and tokenizer.kind in typing.get_args(typing.get_type_hints(DataConfig)["tokenizer"]):
            data["tokenizer"] = tokenizer.kind
        base = {"model": to_dict(m), "data": data}
    base.setdefault("train", {})["init_from"] = None
    cfg = Config.from_dict(apply_overrides(base, overrides))
    if tokenizer is None:
        if cfg.data.tokenizer != "byte":
            raise RunError(f"{str(source_dir)!r} has no {TOKENIZER_FILE}; put the model's tokenizer beside its config.json")
        tokenizer = ByteTokenizer()
    model, done = upcycle_with_conversion(source.model, cfg.model, noise, seed)
    cfg = dataclasses.replace(cfg, model=model.cfg)
    write_run_folder(out, cfg, tokenizer, model)
    return out, done
