"""inspect on a tiny trained run: files written, and the expert assignment it shows is the MoE
layer's actual decision (checked against the layer's output, not against the same helper)."""

import json
import re

import numpy as np
import pytest
import torch

from routelab.config import Config
from routelab.report.inspect import _capture_inputs
from routelab.report.inspect_report import inspect_run
from routelab.train import load_run, train

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    corpus = root / "corpus.txt"
    corpus.write_text("def square(x):\n    return x * x\n" * 60)
    cfg = Config.from_dict(
        {
            "model": {
                "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32,
                "ffn": {"kind": "moe", "router": "topk", "top_k": 2, "num_experts": 4, "hidden": 16},
                "attention": {"kind": "moba", "block_size": 8, "top_k": 1},
            },
            "data": {"source": str(corpus), "seq_len": 32, "val_fraction": 0.2},
            "train": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "eval_every": 0, "log_every": 1,
                      "checkpoint_every": 0, "progress": False},
        }
    )  # fmt: skip
    train(cfg, root / "run")
    return root / "run"


def test_inspect_writes_pages_and_images(moe_run, tmp_path):
    out = inspect_run(moe_run, text="def square(x): return x", out=tmp_path / "ins")
    page = (out / "experts.html").read_text()
    srcs = re.findall(r"src='([^']+)'", page)
    assert {"experts_layers.0.ffn.png", "experts_layers.1.ffn.png", "attention_layer0.png", "attention_layer1.png"} <= set(srcs)
    for src in srcs:
        data = (out / src).read_bytes()
        assert data[:8] == PNG and len(data) > 1000
    routes = json.loads((out / "routes.json").read_text())
    assert len(routes["tokens"]) == len("def square(x): return x")  # byte tokenizer: one per character
    for w in routes["attention_mean_over_heads"]:  # causal, rows are distributions
        w = np.asarray(w)
        assert np.allclose(w.sum(-1), 1.0, atol=1e-5) and np.allclose(np.triu(w, 1), 0.0)


def test_expert_assignment_shown_is_the_layers_decision(moe_run, tmp_path):
    text = "return x * x"
    out = inspect_run(moe_run, text=text, out=tmp_path / "ins")
    shown = json.loads((out / "routes.json").read_text())["experts"]
    run = load_run(moe_run, with_data=False)
    model = run.model.eval()
    ids = torch.tensor([run.tokenizer.encode(text)])
    inputs = _capture_inputs(model, ids, "ffn")  # what each MoE layer received
    for i, x in enumerate(inputs):
        gates = torch.tensor(shown[f"layers.{i}.ffn"], dtype=torch.float32)  # (T, E)
        assert ((gates > 0).sum(-1) == 2).all()  # top-2, dropless: two experts per token
        # the layer's real output equals sum_e gate[t, e] * expert_e(x_t) with the gates shown
        ffn = model.layers[i].ffn
        with torch.no_grad():
            y = ffn(x, token_ids=ids).hidden[0]  # (T, D)
            per_expert = ffn.experts.forward_all(x[0])  # (E, T, D)
        expected = torch.einsum("te,etd->td", gates, per_expert)
        torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-4)
        # and the chosen experts are the router's top-2 logits
        with torch.no_grad():
            top = ffn.router.logits(x[0]).topk(2, -1).indices.sort(-1).values  # (T, 2)
        assert torch.equal(top, (gates > 0).nonzero()[:, 1].view(-1, 2))
    # the HTML colours each token by its largest gate
    page = (out / "experts.html").read_text()
    assert page.count("<span") == 2 * len(text)


def test_fixed_pattern_shows_its_allowed_pairs(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("x = [i for i in range(9)]\n" * 60)
    w = 3
    cfg = Config.from_dict(
        {
            "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 32,
                      "attention": {"kind": "local", "window": w, "block_size": 8}},
            "data": {"source": str(corpus), "seq_len": 32, "val_fraction": 0.2},
            "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "eval_every": 0, "checkpoint_every": 0,
                      "progress": False},
        }
    )  # fmt: skip
    train(cfg, tmp_path / "run")
    out = inspect_run(tmp_path / "run", example=0, out=tmp_path / "ins")
    routes = json.loads((out / "routes.json").read_text())
    (mask,) = np.asarray(routes["allowed_pairs"][0])  # (T, T): one mask shared by the heads
    T = len(routes["tokens"])
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    assert np.array_equal(mask.astype(bool), (i - j >= 0) & (i - j <= w))  # causal window, by hand
    weights = np.asarray(routes["attention_mean_over_heads"][0])
    assert np.all(weights[~mask.astype(bool)] == 0)  # the heads use only allowed pairs
