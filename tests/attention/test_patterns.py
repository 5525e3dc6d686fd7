"""Fixed patterns: each equals dense attention under its own mask; the masks have the stated shape."""

import pytest
import torch

from routelab.attention.engine import reference_attention
from tests.attention.helpers import H, assert_same_outputs_and_grads, build, coverage, qkv_with_padding

PATTERNS = {
    "local": dict(kind="local", window=5, block_size=8),
    "strided": dict(kind="strided", stride=6, window=3, block_size=8),
    "fixed": dict(kind="fixed", stride=8, summary=2),
    "longformer": dict(kind="longformer", window=4, global_tokens=[0, 9], block_size=8),
    "bigbird": dict(kind="bigbird", block_size=4, window_blocks=3, num_global_blocks=1, num_random_blocks=2, seed=3),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("T", [32, 37], ids=["multiple", "not-multiple"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_pattern_equals_dense_under_its_own_mask(name, T, causal):
    attn = build(PATTERNS[name], causal)
    mask = attn.mask(T)  # (T, T), or (H, T, T) for BigBird's per-head random blocks
    parts = attn.parts(T, None)
    expected = mask.long() if mask.dim() == 3 else mask.long()[None]
    assert torch.equal(coverage(parts, T, BH=expected.shape[0]), expected)  # each allowed pair exactly once
    q, k, v, padding = qkv_with_padding(T)
    out = attn.attend(q, k, v, padding, 0)
    assert_same_outputs_and_grads(out, reference_attention(q, k, v, mask, padding), (q, k, v), padding)


@pytest.mark.parametrize("name", list(PATTERNS))
def test_causal_masks_have_nothing_above_the_diagonal(name):
    mask = build(PATTERNS[name], causal=True).mask(40)
    assert not torch.triu(mask, diagonal=1).any()
    assert torch.diagonal(mask, dim1=-2, dim2=-1).all()  # every token sees itself


@pytest.mark.parametrize("causal", [True, False])
def test_local_window_is_token_exact(causal):
    w, T = 5, 30
    mask = build(dict(kind="local", window=w, block_size=8), causal).mask(T)
    i, j = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    expected = ((i - j >= 0) & (i - j <= w)) if causal else ((i - j).abs() <= w)
    assert torch.equal(mask, expected)
    assert int(mask.sum(-1).max()) == (w + 1 if causal else 2 * w + 1)


def test_strided_and_fixed_follow_child_et_al():
    T = 24
    i, j = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    strided = build(dict(kind="strided", stride=4), causal=True).mask(T)
    assert torch.equal(strided, (j <= i) & ((i - j <= 4) | ((i - j) % 4 == 0)))
    fixed = build(dict(kind="fixed", stride=6, summary=2), causal=False).mask(T)
    assert torch.equal(fixed, (i // 6 == j // 6) | (j % 6 >= 4))


def test_longformer_global_tokens_attend_and_are_attended_everywhere():
    mask = build(dict(kind="longformer", window=2, global_tokens=[0, 7]), causal=False).mask(20)
    assert mask[[0, 7]].all() and mask[:, [0, 7]].all()
    assert not mask[10, 4] and mask[10, 8]  # outside / inside the window
    causal = build(dict(kind="longformer", window=2, global_tokens=[0, 7]), causal=True).mask(20)
    assert causal[:, 0].all() and causal[19, 7] and not causal[3, 7] and causal[7, :8].all()


def test_bigbird_random_blocks_are_reproducible_per_seed_layer_and_head():
    cfg = dict(kind="bigbird", block_size=4, num_random_blocks=2, num_global_blocks=1, seed=5)
    a, b = build(cfg, causal=False).mask(64), build(cfg, causal=False).mask(64)
    assert torch.equal(a, b)  # two constructions, same seed
    assert not torch.equal(a, build({**cfg, "seed": 6}, causal=False).mask(64))
    assert not all(torch.equal(a[0], a[h]) for h in range(1, H))  # heads draw their own blocks
    per_block = a[:, 8::4][:, :, ::4]  # (H, query blocks 2.., key blocks) of the block layout
    assert int(per_block[:, 2:].sum(-1).max()) <= 3 + 1 + 2  # window 3 + global 1 + random 2


def test_bigbird_causal_prefix_keeps_its_pattern():
    """Random blocks depend only on the query block, so a prefix's pattern never changes."""
    attn = build(dict(kind="bigbird", block_size=4, num_random_blocks=2, seed=1), causal=True)
    assert torch.equal(attn.mask(64)[:, :40, :40], attn.mask(40))
