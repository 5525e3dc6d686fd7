"""Preset configs shipped with routelab (``lm-tiny``, ``compare-lm``, ...) and how a name resolves.

A name given to ``routelab train`` or ``routelab compare`` is a YAML path if such a file exists,
else the name of a preset in ``CONFIGS_DIR``.
"""

from __future__ import annotations

from pathlib import Path

from routelab.errors import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # package data: installed with routelab


def preset_names() -> list[str]:
    """The shipped presets, sorted."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")) if CONFIGS_DIR.is_dir() else []


def resolve_config_path(name: str) -> Path:
    """A path, or the name of a preset (``lm-tiny`` -> ``CONFIGS_DIR/lm-tiny.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    preset = CONFIGS_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if preset.is_file():
        return preset
    raise ConfigError(f"config {name!r} is neither a file nor a preset; presets: {', '.join(preset_names()) or 'none'}")
