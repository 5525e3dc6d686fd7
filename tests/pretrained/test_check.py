"""``routelab import hf ... --check``: the written run folder compared with transformers' own model."""

from __future__ import annotations

import re

import pytest
import torch

from routelab.cli import main
from routelab.pretrained.check import check_against_transformers
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
