"""Every attention kind accepts every length from 1 to ``max_seq_len``: in training (forward and
backward), evaluation, cached decoding and inspection, including lengths below and not a multiple of
each kind's block size, window and stride. Static patterns also equal dense attention under their
own mask at every length."""

import pytest
import torch

from routelab import RoutedTransformer
from routelab.attention.engine import reference_attention
from routelab.report.inspect import allowed_pairs, attention_routes
from tests.attention.helpers import assert_same_outputs_and_grads, build, qkv_with_padding
from tests.conftest import tiny_config

MAX_LEN = 24
# small blocks, windows and strides, so the sweep crosses several of each and lengths below them
KINDS = {
    "dense": dict(kind="dense"),
    "local": dict(kind="local", window=5, block_size=4),
    "strided": dict(kind="strided", stride=6, window=3, block_size=4),
    "fixed": dict(kind="fixed", stride=8, summary=2),
    "longformer": dict(kind="longformer", window=4, global_tokens=[0, 9], block_size=4),
    "bigbird": dict(kind="bigbird", block_size=8, num_global_blocks=1, num_random_blocks=1, seed=3),
    "bigbird-2-global": dict(kind="bigbird", block_size=4, num_global_blocks=2, num_random_blocks=2, seed=1),
    "synthesizer": dict(kind="synthesizer"),
    "kmeans": dict(kind="kmeans", num_clusters=3, local_heads=1, window=3, block_size=4),
    "moba": dict(kind="moba", block_size=8, top_k=2),
    "block_topp": dict(kind="block_topp", block_size=4, top_p=0.7, max_blocks=3),
}
STATIC = ("local", "strided", "fixed", "longformer", "bigbird", "bigbird-2-global")
LENGTHS = range(1, MAX_LEN + 1)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", STATIC)
def test_static_pattern_equals_dense_at_every_length(name, causal):
    attn = build(KINDS[name], causal)
    for T in LENGTHS:
        q, k, v, padding = qkv_with_padding(T, pad=min(2, T - 1))
        out = attn.attend(q, k, v, padding, 0)
        ref = reference_attention(q, k, v, attn.mask(T), padding)
        try:
            assert_same_outputs_and_grads(out, ref, (q, k, v), padding)
        except AssertionError as e:
            raise AssertionError(f"{name} at T={T}: {e}") from None


def _model(name: str, causal: bool) -> RoutedTransformer:
    head = dict(head="lm") if causal else dict(head="classification", num_labels=3)
    cfg = tiny_config(attention=KINDS[name], n_layers=1, max_seq_len=MAX_LEN, **head)
    return RoutedTransformer(cfg)


@pytest.mark.parametrize("causal", [True, False], ids=["lm", "classifier"])
@pytest.mark.parametrize("name", list(KINDS))
def test_train_eval_and_inspect_at_every_length(name, causal):
    model = _model(name, causal)
    for T in LENGTHS:
        x = torch.randint(0, 61, (2, T))
        labels = x if causal else torch.tensor([0, 2])
        model.train()
        out = model(x, labels=labels)
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), f"{name} T={T}: non-finite gradients"
        model.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            logits = model(x).logits
        assert torch.isfinite(logits).all(), f"{name} T={T}"
        maps = attention_routes(model, x[:1])
        assert maps[0].shape[-2:] == (T, T), f"{name} T={T}"
        assert all(m is None or m.shape[-2:] == (T, T) for m in allowed_pairs(model, T))


@pytest.mark.parametrize("name", list(KINDS))
def test_cached_decoding_at_every_prompt_length(name):
    """A prompt of any length, then single tokens up to ``max_seq_len``, equals the full forward."""
    model = _model(name, causal=True).eval()
    x = torch.randint(0, 61, (1, MAX_LEN))
    with torch.no_grad():
        full = model(x).logits
        for prompt in (1, 2, 3, 7, 8, 9, MAX_LEN - 1, MAX_LEN):
            cache = model.new_cache()
            steps = [model(x[:, :prompt], cache=cache).logits]
            steps += [model(x[:, t : t + 1], cache=cache).logits for t in range(prompt, MAX_LEN)]
            try:
                torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
            except AssertionError as e:
                raise AssertionError(f"{name}, prompt of {prompt}: {e}") from None
