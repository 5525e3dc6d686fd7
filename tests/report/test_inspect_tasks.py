"""inspect on a multi-task model: the tasks x experts map, from the layer's actual decisions."""

import json

import numpy as np
import pytest
import torch

from routelab.model import RoutedTransformer
from routelab.report.inspect import task_expert_loads
from routelab.report.inspect_report import inspect_run
from tests.pretrained.test_extract import _multi_task_run

PNG = b"\x89PNG\r\n\x1a\n"


def test_task_expert_loads_of_a_task_router_follow_its_table():
    torch.manual_seed(0)
    from tests.conftest import tiny_config

    model = RoutedTransformer(tiny_config(task_names=["a", "b", "c"], ffn={"kind": "moe", "num_experts": 4, "router": {"kind": "task", "top_k": 2}}))
    ids = torch.randint(0, 61, (3, 5))
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 5])
    loads = task_expert_loads(model, ids, torch.tensor([0, 1, 0]), attention_mask=mask)
    assert set(loads) == {"layers.0.ffn", "layers.1.ffn"}
    np.testing.assert_array_equal(loads["layers.0.ffn"], [[10, 10, 0, 0], [0, 0, 3, 3], [0, 0, 0, 0]])


def test_inspect_a_multi_task_run_writes_the_task_map(tmp_path):
    run = _multi_task_run(tmp_path)
    out = inspect_run(run, text="def f(x):", out=tmp_path / "insp", task="code")
    assert (out / "task_experts.png").read_bytes().startswith(PNG)
    record = json.loads((out / "routes.json").read_text())
    assert record["task_names"] == ["prose", "code"]
    n = len(record["tokens"])
    assert record["task_expert_load"]["layers.0.ffn"] == [[n, n, 0, 0], [0, 0, n, n]]  # top 2: prose 0,1; code 2,3
    assert record["task_overlap_jaccard"]["layers.0.ffn"] == [[1.0, 0.0], [0.0, 1.0]]
    gates = np.array(record["experts"]["layers.0.ffn"])  # routed as "code"
    assert (gates[:, 2:] == 0.5).all() and (gates[:, :2] == 0).all()
    page = (out / "experts.html").read_text()
    assert "Experts per task" in page and "Jaccard" in page
    with pytest.raises(Exception, match="unknown task 'poetry'"):
        inspect_run(run, text="x", out=tmp_path / "insp2", task="poetry")
