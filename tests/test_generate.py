"""Cached generation equals full recomputation; sampling filters behave as defined."""

import pytest
import torch

from routelab import RoutedTransformer
from routelab.generate import SamplingConfig, filter_logits, generate
from tests.conftest import repeated_kv_twin, tiny_config


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_cached_logits_equal_full_recomputation(positions):
    model = RoutedTransformer(tiny_config(positions=positions)).eval()
    x = torch.randint(0, 61, (2, 30))
    full = model(x).logits
    cache = model.new_cache()
    steps = [model(x[:, :7], cache=cache).logits]  # a prompt, then one token at a time
    steps += [model(x[:, t : t + 1], cache=cache).logits for t in range(7, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_gqa_generation_keeps_a_cache_of_the_kv_heads_only():
    """n_heads=8, n_kv_heads=2, d_model=256, 2 layers, generating 256 tokens: the same tokens as the
    multi-head twin with repeated k/v weights, whose cache (the repeated heads, as GQA caches were
    before) is 4x larger: 256 KiB against 1 MiB in fp32 (the README's number)."""
    model = RoutedTransformer(tiny_config(d_model=256, n_heads=8, n_kv_heads=2, max_seq_len=320)).eval()
    twin = repeated_kv_twin(model)
    prompt = torch.randint(0, 61, (1, 1))
    cache_bytes = []
    for m in (model, twin):
        caches, new_cache = [], m.new_cache
        m.new_cache = lambda caches=caches, new_cache=new_cache: caches.append(new_cache()) or caches[-1]
        out = generate(m, prompt, SamplingConfig(max_new_tokens=256, temperature=0))
        assert out.shape == (1, 257) and caches[0][0].offset == 256  # the last token is never fed back
        cache_bytes.append((out, sum(c.k.nbytes + c.v.nbytes for c in caches[0])))
    (out, nbytes), (twin_out, twin_bytes) = cache_bytes
    assert torch.equal(out, twin_out)
    assert nbytes == 2 * 2 * 2 * 256 * 32 * 4 == 256 * 1024  # layers, k and v, heads, positions, head dim, fp32
    assert twin_bytes == 4 * nbytes


def test_greedy_generation_matches_argmax_of_full_forward():
    model = RoutedTransformer(tiny_config()).eval()
    prompt = torch.randint(0, 61, (2, 5))
    out = generate(model, prompt, SamplingConfig(max_new_tokens=10, temperature=0))
    assert out.shape == (2, 15) and torch.equal(out[:, :5], prompt)
    for t in range(5, 15):  # each token is the argmax of recomputing the whole prefix
        assert torch.equal(out[:, t], model(out[:, :t]).logits[:, -1].argmax(-1))


def test_stop_token_ends_generation_and_max_seq_len_caps_it():
    model = RoutedTransformer(tiny_config()).eval()
    prompt = torch.randint(0, 61, (1, 4))
    first = generate(model, prompt, SamplingConfig(max_new_tokens=1, temperature=0))[0, -1].item()
    out = generate(model, prompt, SamplingConfig(max_new_tokens=20, temperature=0, stop_tokens=(first,)))
    assert out.shape == (1, 5)
    long = generate(model, prompt, SamplingConfig(max_new_tokens=100, temperature=0))
    assert long.shape[1] == 48  # max_seq_len


def test_seeded_sampling_is_reproducible():
    model = RoutedTransformer(tiny_config()).eval()
    prompt = torch.randint(0, 61, (3, 4))
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=10, top_p=0.9, seed=7)
    assert torch.equal(generate(model, prompt, cfg), generate(model, prompt, cfg))


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda x: torch.isfinite(x)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False, False]
    # cumulative 0.5, 0.7, 0.85: p=0.7 needs the first two; p=0.71 needs three
    assert kept(filter_logits(logits, top_p=0.7)) == [True, True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.71)) == [True, True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.01)) == [True, False, False, False, False]


def test_bad_sampling_options_are_clear():
    with pytest.raises(ValueError, match="top_p=0 is invalid"):
        SamplingConfig(top_p=0)
    model = RoutedTransformer(tiny_config(head="classification", num_labels=2))
    with pytest.raises(ValueError, match="needs an lm head"):
        generate(model, torch.zeros(1, 3, dtype=torch.long))
