"""The end of a run: the final ``model/`` folder (weights, config, tokenizer), swapped in whole."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from routelab.io import make_temp_dir, replace_dir
from routelab.model import RoutedTransformer


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
