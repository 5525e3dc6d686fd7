"""Cached decoding equals recomputing the full prefix, for every causal kind."""

import pytest
import torch

from routelab import RoutedTransformer
from tests.conftest import tiny_config

CAUSAL_KINDS = {
    "dense": dict(kind="dense"),
    "local": dict(kind="local", window=5, block_size=4),
    "strided": dict(kind="strided", stride=4, window=3, block_size=4),
    "fixed": dict(kind="fixed", stride=8, summary=2),
    "longformer": dict(kind="longformer", window=4, global_tokens=[0, 9], block_size=4),
    "bigbird": dict(kind="bigbird", block_size=4, num_random_blocks=2, seed=3),
    "synthesizer": dict(kind="synthesizer"),
    "synthesizer-random-mix": dict(kind="synthesizer", variant="random", mix_dot=True, values="linear"),
    "kmeans": dict(kind="kmeans", num_clusters=3, local_heads=1, window=3),
    "moba": dict(kind="moba", block_size=4, top_k=2),
    "block_topp": dict(kind="block_topp", block_size=4, top_p=0.7, max_blocks=3),
}


@pytest.mark.parametrize("name", list(CAUSAL_KINDS))
def test_cached_decoding_equals_full_forward(name):
    model = RoutedTransformer(tiny_config(attention=CAUSAL_KINDS[name])).eval()
    x = torch.randint(0, 61, (2, 30))
    full = model(x).logits
    cache = model.new_cache()
    steps = [model(x[:, :7], cache=cache).logits]  # a prompt, single tokens, a chunk, single tokens
    steps += [model(x[:, t : t + 1], cache=cache).logits for t in range(7, 20)]
    steps += [model(x[:, 20:26], cache=cache).logits]
    steps += [model(x[:, t : t + 1], cache=cache).logits for t in range(26, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_cached_decoding_with_left_padding():
    """A left-padded batch decodes like each row alone (block routes ignore padded keys)."""
    model = RoutedTransformer(tiny_config(attention=CAUSAL_KINDS["moba"])).eval()
    x = torch.randint(1, 61, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :6] = 0
    full = model(x, attention_mask=mask).logits
    cache = model.new_cache()
    steps = [model(x[:, :9], attention_mask=mask[:, :9], cache=cache).logits]
    steps += [model(x[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits for t in range(9, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_local_cache_never_exceeds_the_window():
    w = 5
    model = RoutedTransformer(tiny_config(attention=dict(kind="local", window=w, block_size=4))).eval()
    x = torch.randint(0, 61, (1, 40))
    cache = model.new_cache()
    model(x[:, :12], cache=cache)
    sizes = [cache[0].k.shape[2]]
    for t in range(12, 40):
        model(x[:, t : t + 1], cache=cache)
        sizes.append(max(c.k.shape[2] for c in cache))
    assert max(sizes) == w and cache[0].offset == 40
