"""Hostile or odd YAML ends in one error line naming the file, fast and in little memory: an alias
bomb ("billion laughs"), an alias inside its own anchor, nesting deeper than the parser recurses, a
value YAML reads as a date. Anchors and aliases used as intended still work."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from routelab.cli import main
from routelab.config import MAX_YAML_VALUES, Config, ConfigError, apply_overrides, load_yaml


def alias_bomb(levels: int) -> str:
    """``levels`` lines, each a list of nine aliases of the line before: 9**levels values expanded."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("routelab: error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def test_a_nine_level_alias_bomb_is_refused_without_expanding_it() -> None:
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"'bomb.yaml' expands to 4\d\d,\d{3},\d{3} values through its aliases"):
        load_yaml(alias_bomb(9), "'bomb.yaml'")
    assert time.perf_counter() - start < 10  # bounds a hang: expanding it takes over a minute and GBs


@pytest.mark.parametrize("where", ["config", "base", "comparison", "run folder"])
def test_an_alias_bomb_is_one_line_naming_the_file(tmp_path, capsys, where) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb(6))  # 9**6 strings: enough to be refused, small enough to expand if it were not
    if where == "config":
        argv = ["train", str(bomb), "--out", str(tmp_path / "run")]
    elif where == "base":
        (tmp_path / "variant.yaml").write_text("base: bomb.yaml\ntrain: {steps: 2}\n")
        argv = ["train", str(tmp_path / "variant.yaml"), "--out", str(tmp_path / "run")]
    elif where == "comparison":
        argv = ["compare", str(bomb), "--out", str(tmp_path / "cmp")]
    else:  # a run folder's config.yaml, read by eval
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "config.yaml").write_text(alias_bomb(6))
        bomb = tmp_path / "run" / "config.yaml"
        argv = ["eval", str(tmp_path / "run")]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert re.search(re.escape(f"{str(bomb)!r} expands to ") + r"6\d\d,\d{3} values through its aliases", line), line
    assert f"at most {MAX_YAML_VALUES:,}" in line


def test_an_alias_inside_its_own_anchor_is_one_line(tmp_path, capsys) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text("model: {d_model: 32}\nloop: &a [1, *a]\n")
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    assert f"{str(path)!r} line 2: an alias refers to a value that contains it" in one_error_line(capsys)


def test_nesting_deeper_than_the_parser_recurses_is_one_line(tmp_path, capsys) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("model: " + "[" * 3000 + "]" * 3000 + "\n")
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    assert f"{str(path)!r} is nested too deeply to read" in one_error_line(capsys)


def test_a_date_where_a_number_belongs_is_a_type_error_not_a_traceback(tmp_path, capsys) -> None:
    path = tmp_path / "date.yaml"
    path.write_text("train: {steps: 2024-01-01}\n")
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    assert "train.steps=datetime.date(2024, 1, 1) is invalid; allowed: an integer" in one_error_line(capsys)


def test_a_harmless_anchor_and_alias_still_load(tmp_path) -> None:
    path = tmp_path / "anchored.yaml"
    path.write_text(
        "model: {d_model: 32, n_layers: 1, n_heads: 2, max_seq_len: &len 64}\n"
        "data: {seq_len: *len}\n"
        "train: {steps: 3}\n"
    )
    cfg = Config.load(path, ["train.steps=4"])
    assert (cfg.model.max_seq_len, cfg.data.seq_len, cfg.train.steps) == (64, 64, 4)


def test_an_override_changes_one_use_of_a_shared_section() -> None:
    shared = {"kind": "dense"}
    out = apply_overrides({"model": {"attention": shared, "ffn": shared}}, ["model.attention.kind=local"])
    assert out["model"]["attention"]["kind"] == "local" and out["model"]["ffn"]["kind"] == "dense"
    assert shared == {"kind": "dense"}


def test_a_set_value_is_bounded_too() -> None:
    with pytest.raises(ConfigError, match="--set value .* expands to"):
        apply_overrides({}, ["model.x=" + "[" + ", ".join(["&a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"] + ["*a"] * 20000) + "]"])


def test_yaml_files_shipped_with_routelab_stay_far_below_the_limit() -> None:
    import routelab

    for path in sorted((Path(routelab.__file__).parent / "configs").glob("*.yaml")):
        assert load_yaml(path.read_text(), repr(path.name)) is not None
