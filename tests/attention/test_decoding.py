"""Cached decoding equals recomputing the full prefix, for every causal kind; with grouped-query
attention too, whose cache keeps only the key/value heads."""

import pytest
import torch

from routelab import RoutedTransformer
from tests.conftest import repeated_kv_twin, tiny_config

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


# every kind with a KV cache except the synthesizer, whose projections are its own (it refuses n_kv_heads)
GQA_KINDS = {name: kind for name, kind in CAUSAL_KINDS.items() if kind["kind"] != "synthesizer"}


def decode_in_steps(model, x):
    """Logits of x (B, 30) decoded with a cache: a prompt, single tokens, a chunk, single tokens."""
    cache = model.new_cache()
    steps = [model(x[:, :7], cache=cache).logits]
    steps += [model(x[:, t : t + 1], cache=cache).logits for t in range(7, 20)]
    steps += [model(x[:, 20:26], cache=cache).logits]
    steps += [model(x[:, t : t + 1], cache=cache).logits for t in range(26, 30)]
    return torch.cat(steps, dim=1), cache


@pytest.mark.parametrize("name", list(CAUSAL_KINDS))
def test_cached_decoding_equals_full_forward(name):
    model = RoutedTransformer(tiny_config(attention=CAUSAL_KINDS[name])).eval()
    x = torch.randint(0, 61, (2, 30))
    full = model(x).logits
    torch.testing.assert_close(decode_in_steps(model, x)[0], full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_kv_heads", [2, 1])
@pytest.mark.parametrize("name", list(GQA_KINDS))
def test_gqa_cache_keeps_only_the_kv_heads_and_decodes_as_before(name, n_kv_heads):
    """n_heads=4: cached decoding equals the full forward, both equal the multi-head twin with repeated
    key/value weights (what the layer computed when its cache held repeated heads), and the cache
    holds n_kv_heads heads: 4 / n_kv_heads times fewer bytes than the twin's. kmeans keys are its
    shared queries (one per query head), so only its values shrink."""
    model = RoutedTransformer(tiny_config(n_kv_heads=n_kv_heads, attention=GQA_KINDS[name])).eval()
    twin = repeated_kv_twin(model)
    x = torch.randint(0, 61, (2, 30))
    with torch.no_grad():
        full, (cached, cache) = model(x).logits, decode_in_steps(model, x)
        twin_full, (twin_cached, twin_cache) = twin(x).logits, decode_in_steps(twin, x)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(full, twin_full, atol=1e-6, rtol=0)
    torch.testing.assert_close(cached, twin_cached, atol=1e-6, rtol=0)
    key_heads = 4 if name == "kmeans" else n_kv_heads
    for c, t in zip(cache, twin_cache):
        assert c.k.shape[1] == key_heads and c.v.shape[1] == n_kv_heads
        assert t.k.shape[1] == t.v.shape[1] == 4 and c.k.shape[2:] == t.k.shape[2:]
        assert c.v.nbytes * (4 // n_kv_heads) == t.v.nbytes
        assert c.k.nbytes * (4 // key_heads) == t.k.nbytes
        if "kmean" in c.extra:  # moba / block_topp keep their key-block means per key/value head too
            assert c.extra["kmean"].shape[1] == n_kv_heads


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
