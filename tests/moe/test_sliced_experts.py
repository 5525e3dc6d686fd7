"""A model built holding a slice of its experts (``expert_slice``, what each expert-parallel process
builds) starts exactly as those experts, and every other tensor, of the whole model built from the
same seed; sliced draws equal torch's own ``normal_`` for any shape; upcycling fills only the slice;
checkpoints read only the slice's rows."""

from __future__ import annotations

import pytest
import torch

from routelab import ModelConfig, RoutedTransformer
from routelab.io import load_state_dict, save_state_dict
from routelab.moe.sliced_init import normal_rows
from routelab.upcycle import upcycle_into


@pytest.mark.parametrize("shape", [(4, 16, 64), (3, 5, 7), (5, 33, 17), (2, 2, 3), (6, 100000 // 6 + 3)])
def test_sliced_normal_draws_equal_the_whole_tensors_rows_and_leave_the_generator_alike(shape):
    for lo, hi in [(0, shape[0]), (0, 1), (shape[0] // 2, shape[0]), (shape[0] - 1, shape[0])]:
        torch.manual_seed(3)
        whole, after = torch.empty(shape).normal_(0, 0.7), torch.rand(4)
        torch.manual_seed(3)
        part, after_part = normal_rows(shape[0], shape[1:], lo, hi, 0.7), torch.rand(4)
        assert torch.equal(part, whole[lo:hi]), (shape, lo, hi)
        assert torch.equal(after, after_part)  # the stream after it is the same too


def _cfg(d: int, hidden: int, **ffn) -> ModelConfig:
    return ModelConfig(vocab_size=37, d_model=d, n_heads=2, n_layers=2,
                       ffn={"kind": "moe", "num_experts": 4, "hidden": hidden, "router": "topk", **ffn})


@pytest.mark.parametrize("cfg", [_cfg(16, 32, activation="swiglu"), _cfg(12, 9, moe_every=2)])  # 12 * 9: not a multiple of 16
def test_a_sliced_model_starts_as_its_experts_of_the_whole_model(cfg):
    torch.manual_seed(5)
    whole, after = RoutedTransformer(cfg).state_dict(), torch.rand(3)
    for index in range(2):
        torch.manual_seed(5)
        model = RoutedTransformer(cfg, expert_slice=(index, 2))
        assert torch.equal(torch.rand(3), after)  # the global stream was consumed as by the whole model
        rows = model.expert_rows()
        assert rows and all(r == (2 * index, 2 * index + 2, 4) for r in rows.values())
        for name, t in model.state_dict().items():
            expect = whole[name][2 * index : 2 * index + 2] if name in rows else whole[name]
            assert torch.equal(t, expect), name
        n_expert = sum(t.numel() for n, t in model.state_dict().items() if n in rows)
        assert n_expert * 2 == sum(whole[n].numel() for n in rows)  # half the experts allocated


def test_a_sliced_layer_runs_only_under_expert_parallelism():
    model = RoutedTransformer(_cfg(16, 32), expert_slice=(0, 2))
    with pytest.raises(RuntimeError, match="holds a slice of its experts: it runs under expert parallelism only"):
        model(torch.randint(0, 37, (1, 5)))


def test_a_bad_expert_slice_is_refused_in_one_line():
    from routelab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^model.ffn \(layer 0\): expert_slice=\(0, 3\) is invalid; allowed: .*dividing num_experts=4$"):
        RoutedTransformer(_cfg(16, 32), expert_slice=(0, 3))
    with pytest.raises(ConfigError, match=r"^expert_slice=\(0, 2\) is invalid for model.ffn.kind='dense'"):
        RoutedTransformer(ModelConfig(vocab_size=37, d_model=16, n_heads=2, n_layers=1), expert_slice=(0, 2))


@pytest.mark.parametrize("from_dense", [True, False])
def test_upcycling_into_a_sliced_model_fills_its_rows_of_the_whole_targets(from_dense):
    target_cfg = _cfg(12, 9)
    if from_dense:
        import dataclasses

        source_cfg = dataclasses.replace(target_cfg, ffn={"kind": "dense", "hidden": 9})
    else:
        source_cfg = target_cfg
    torch.manual_seed(1)
    source = RoutedTransformer(source_cfg).state_dict()
    torch.manual_seed(2)
    whole = RoutedTransformer(target_cfg)
    upcycle_into(whole, source_cfg, source, noise=0.1, generator=torch.Generator().manual_seed(7))
    full = whole.state_dict()
    for index in range(2):
        torch.manual_seed(2)
        part = RoutedTransformer(target_cfg, expert_slice=(index, 2))
        upcycle_into(part, source_cfg, source, noise=0.1, generator=torch.Generator().manual_seed(7))
        rows = part.expert_rows()
        for name, t in part.state_dict().items():
            expect = full[name][2 * index : 2 * index + 2] if name in rows else full[name]
            assert torch.equal(t, expect), name


def test_load_state_dict_reads_only_the_rows_asked_for(tmp_path, monkeypatch):
    import routelab.io as io

    state = {"a": torch.arange(24.0).view(6, 4), "b": torch.ones(3)}
    save_state_dict(state, tmp_path / "w.safetensors")
    whole_reads = []
    real = io.safe_open

    class Spy:  # records the tensors read whole
        def __init__(self, *args, **kwargs):
            self.f = real(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, name):
            whole_reads.append(name)
            return self.f.get_tensor(name)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(io, "safe_open", Spy)
    got = load_state_dict(tmp_path / "w.safetensors", rows=lambda k, shape: (2, 4) if k == "a" else None)
    assert torch.equal(got["a"], state["a"][2:4]) and torch.equal(got["b"], state["b"])
    assert whole_reads == ["b"]
    assert list(load_state_dict(tmp_path / "w.safetensors", keys=lambda k: k == "b")) == ["b"]
