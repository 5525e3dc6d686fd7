"""One FlexAttention fallback (``flex.with_flex_fallback``): a failing FlexAttention call gives the
engine's result, warns once per module, and is not tried again; the backend option is declared once
(``flex.SparseAttentionConfig``), kmeans narrowing it."""

import logging
from types import SimpleNamespace

import pytest
import torch

import routelab.attention.flex as flex
from routelab.config import Config
from routelab.errors import ConfigError
from routelab.registry import ATTENTION
from tests.attention.helpers import H, build, qkv_with_padding

WARNING = "FlexAttention unavailable"


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and WARNING in r.getMessage()]


def test_a_failing_flex_gives_the_engine_result_and_warns_once(caplog):
    module = SimpleNamespace(_flex_failed=False)
    tries = []

    def broken():
        tries.append(1)
        raise RuntimeError("no compiler here")

    engine = torch.ones(2)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert flex.with_flex_fallback(module, broken, lambda: engine) is engine
    assert len(tries) == 1 and module._flex_failed  # tried once, then the engine directly
    assert warnings(caplog) == [f"{WARNING} (no compiler here); using the block-sparse engine"]


def test_a_working_flex_is_used_and_nothing_is_logged(caplog):
    module = SimpleNamespace(_flex_failed=False)
    out = torch.zeros(1)
    with caplog.at_level(logging.WARNING):
        assert flex.with_flex_fallback(module, lambda: out, lambda: pytest.fail("the engine ran")) is out
    assert not module._flex_failed and not warnings(caplog)


def _broken(*args, **kwargs):
    raise RuntimeError("no compiler here")


@pytest.mark.parametrize("spec", [dict(kind="moba", block_size=4, top_k=2), dict(kind="bigbird", block_size=8)])
def test_block_routes_and_patterns_fall_back_to_the_engine_once(spec, monkeypatch, caplog):
    attn, engine = build(dict(spec, backend="flex"), causal=True), build(dict(spec, backend="engine"), causal=True)
    engine.load_state_dict(attn.state_dict())
    assert attn._flex_failed is False  # declared by QKVAttention
    monkeypatch.setattr(flex, "flex_attend", _broken)
    q, k, v, _ = qkv_with_padding(24, pad=0)
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        for _ in range(2):
            out, _ = attn.attend_routes(q, k, v, None, None)
            torch.testing.assert_close(out, engine.attend_routes(q, k, v, None, None)[0], atol=0, rtol=0)
    assert attn._flex_failed and len(warnings(caplog)) == 1


def test_kmeans_falls_back_to_the_engine_once(monkeypatch, caplog):
    spec = dict(kind="kmeans", num_clusters=3, local_heads=1, window=8, block_size=8)
    attn, engine = build(dict(spec, backend="flex"), causal=True), build(dict(spec, backend="engine"), causal=True)
    engine.load_state_dict(attn.state_dict())
    monkeypatch.setattr(flex, "flex_grouped", _broken)
    x = torch.randn(2, 20, H * 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        for _ in range(2):
            torch.testing.assert_close(attn.eval()(x), engine.eval()(x), atol=0, rtol=0)
    assert attn._flex_failed and len(warnings(caplog)) == 1


def test_every_kind_with_a_backend_declares_it_once():
    with_backend = [n for n in ATTENTION.names() if "backend" in ATTENTION.get(n).config_class.__dataclass_fields__]
    assert with_backend == ["bigbird", "block_topp", "fixed", "kmeans", "local", "longformer", "moba", "strided"]
    for name in with_backend:
        assert issubclass(ATTENTION.get(name).config_class, flex.SparseAttentionConfig)
        allowed = flex.allowed_backends(ATTENTION.get(name).config_class)
        assert allowed == (("auto", "engine", "flex") if name == "kmeans" else flex.BACKENDS)


def test_backend_values_outside_the_kind_are_refused_in_one_line():
    line = "model.attention.backend='dense' is invalid; allowed: 'auto', 'engine', 'flex'"
    with pytest.raises(ConfigError, match=f"^{line}$"):  # the config loader (kmeans' narrower Literal)
        Config.from_dict({"model": {"attention": {"kind": "kmeans", "backend": "dense"}}})
    with pytest.raises(ConfigError, match=f"^{line}$"):  # built in code, past the loader
        ATTENTION.get("kmeans").config_class(kind="kmeans", backend="dense")
    with pytest.raises(ConfigError, match=r"backend='gpu' is invalid; allowed: 'auto', 'engine', 'flex', 'dense'$"):
        ATTENTION.get("local").config_class(kind="local", backend="gpu")
    assert Config.from_dict({"model": {"attention": {"kind": "local", "backend": "dense"}}}).model.attention.backend == "dense"
