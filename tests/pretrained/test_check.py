"""``routelab import hf ... --check``: the written run folder compared with transformers' own model."""

from __future__ import annotations

import json
import re

import pytest
import torch

from routelab.cli import main
from routelab.pretrained.check import CheckFailed, check_against_transformers, require_agreement
from routelab.train import load_run
from tests.pretrained.helpers import save_bert, save_decoder


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_check_reports_agreement_for_a_correct_import(tmp_path, capsys, family):
    save_decoder(family, tmp_path / "hf") if family != "bert" else save_bert(tmp_path / "hf")
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run"), "--check"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    m = re.fullmatch(r"checked against transformers on 8 texts \((\d+) tokens\): hidden max \|diff\| (\S+), "
                     r"(?:logits max \|diff\| (\S+), )?mean-pooled cosine min (\S+)", line)
    assert m, line
    assert int(m[1]) > 8 and float(m[2]) < 1e-4 and float(m[4]) > 0.9999
    assert (m[3] is not None) == (family == "llama") and (m[3] is None or float(m[3]) < 1e-4)


def test_check_catches_a_wrong_conversion(tmp_path):
    save_decoder("llama", tmp_path / "hf")
    main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")])
    run = load_run(tmp_path / "run")
    with torch.no_grad():  # a q/k permutation forgotten in one layer
        q = run.model.layers[0].attn.q_proj.weight
        q.copy_(q.flip(0))
    result = check_against_transformers(tmp_path / "hf", run.model, run.tokenizer)
    assert result["logits_max_abs_diff"] > 1e-2 and result["hidden_max_abs_diff"] > 1e-2


def check_error(capsys, argv) -> str:
    """``routelab import hf ... --check`` past a tolerance: exit 2 and exactly one error line."""
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1, err
    assert captured.out.splitlines()[-1].startswith("checked against transformers")  # the numbers are still shown
    return err[0]


def test_check_exits_nonzero_past_its_tolerance(tmp_path, capsys, monkeypatch):
    """A conversion that forgets the RoPE row permutation is written, then --check fails naming the
    worst difference and its tolerance (it used to print the numbers and exit 0)."""
    save_decoder("llama", tmp_path / "hf")
    monkeypatch.setattr("routelab.pretrained.hf.halves_to_pairs", lambda w, h, d: w)
    line = check_error(capsys, ["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run"), "--check"])
    m = re.fullmatch(r"routelab: error: --check failed: (hidden|logits) max \|diff\| (\S+) is past its tolerance (\S+) "
                     r"\(0\.0001 x the largest \|\1\| transformers computes, (\S+)\); '.*run' was written but does not "
                     r"compute what transformers computes \(.*\): delete it", line)
    assert m, line
    assert float(m[2]) > float(m[3]) == pytest.approx(1e-4 * max(1.0, float(m[4])), rel=0.05)


def test_check_passes_with_a_bf16_config_over_fp32_weights(tmp_path, capsys):
    """transformers loads a config's dtype by default; --check reads the file's fp32 so that rounding
    to bf16 is not mistaken for a wrong import."""
    save_decoder("llama", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run"), "--check"]) == 0
    assert "max |diff|" in capsys.readouterr().out


@pytest.mark.parametrize("hidden, logits, cosine, worst", [
    (1.1e-6, 1.4e-6, 0.9999999, None),  # a correct import: rounding only
    (9.9e-3, 1.3e-3, 0.99999, "hidden max |diff| 9.9e-03 is past its tolerance 4.0e-04"),  # RoPE slightly off
    (3e-5, 2.1e-4, 0.9999999, "logits max |diff| 2.1e-04 is past its tolerance 1.5e-04"),
    (1e-6, 1e-6, 0.9999, "mean-pooled cosine min 0.9999000 is below its tolerance 0.9999900"),
])
def test_tolerances_name_the_worst_difference(hidden, logits, cosine, worst):
    result = {"hidden_max_abs_diff": hidden, "hidden_max_abs": 4.0, "logits_max_abs_diff": logits,
              "logits_max_abs": 1.5, "pooled_min_cosine": cosine}
    if worst is None:
        require_agreement(result, "run")
    else:
        with pytest.raises(CheckFailed, match=re.escape(worst)):
            require_agreement(result, "run")
