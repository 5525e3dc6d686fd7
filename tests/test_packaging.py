"""What an installed routelab relies on: the console entry point, the version, and presets that are
package data and valid. (scripts/wheel_check.sh builds and installs the wheel itself.)"""

import importlib.metadata

import pytest

import routelab
from routelab.presets import CONFIGS_DIR, preset_names


def test_console_script_is_cli_run():
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name="routelab")
    from routelab.cli import run

    assert entry.value == "routelab.cli:run" and entry.load() is run


def test_version_has_one_source():
    assert importlib.metadata.version("routelab") == routelab.__version__


def test_every_preset_is_a_yaml_file_the_wheel_ships():
    """pyproject.toml ships routelab/configs/*.yaml: a preset named otherwise would be left out."""
    files = sorted(p.name for p in CONFIGS_DIR.iterdir() if not p.name.startswith("."))
    assert files and all(name.endswith(".yaml") for name in files), files
    assert "lm-tiny" in preset_names() and "compare-lm" in preset_names()


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads(name):
    from routelab.compare import load_compare_config
    from routelab.config import Config, read_yaml_mapping

    path = CONFIGS_DIR / f"{name}.yaml"
    if "variants" in read_yaml_mapping(path):
        cmp, configs = load_compare_config(path)  # every variant built and checked (model on the meta device)
        runs = [v.name if cmp.seeds == 1 else f"{v.name}/seed-{s}" for v in cmp.variants for s in range(cmp.seeds)]
        assert list(configs) == [f"prepare/{p.name}" for p in cmp.prepare] + runs
    else:
        assert Config.load(path).model.head in ("lm", "classification", "token_classification")
