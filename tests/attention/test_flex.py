"""The opt-in FlexAttention inference path for ``local``: exact, and a clean fallback."""

import pytest
import torch

import routelab.attention.flex as flex
from routelab.attention.engine import reference_attention
from routelab.attention.patterns import band
from tests.attention.helpers import build, qkv_with_padding


def test_local_falls_back_to_the_engine_when_flex_fails(monkeypatch, caplog):
    attn = build(dict(kind="local", window=4, block_size=8, flex_inference=True), causal=True)
    q, k, v, _ = qkv_with_padding(20, pad=0)

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(flex, "flex_attend", broken)
    with torch.no_grad():
        out = attn.attend(q, k, v, None, 0)
    pos = torch.arange(20)
    torch.testing.assert_close(
        out, reference_attention(q, k, v, band(pos[:, None], pos[None], 4, True)), atol=1e-5, rtol=0
    )
    assert "FlexAttention unavailable" in caplog.text and attn._flex_failed
    attn.attend(q, k, v, None, 0).sum().backward()  # with autograd: always the engine


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_flex_local_equals_dense_under_the_window(causal):
    """Compiles FlexAttention (several seconds): deselect with -m 'not slow'."""
    T, w = 300, 20
    q, k, v, _ = qkv_with_padding(T, pad=0)
    with torch.no_grad():
        out = flex.flex_local(q, k, v, w, causal)
    pos = torch.arange(T)
    torch.testing.assert_close(
        out, reference_attention(q, k, v, band(pos[:, None], pos[None], w, causal)), atol=1e-5, rtol=0
    )
