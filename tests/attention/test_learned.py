"""Learned routers: each equals dense attention under the mask of the routes it chose."""

import pytest
import torch
import torch.nn.functional as F

from routelab.attention.engine import reference_attention
from routelab.attention.kmeans import arrival_groups, balanced_clusters, group_slots
from tests.attention.helpers import HD, H, assert_same_outputs_and_grads, build, qkv_with_padding

BLOCK_SELECT = {
    "moba": dict(kind="moba", block_size=4, top_k=2),
    "block_topp": dict(kind="block_topp", block_size=4, top_p=0.6, max_blocks=3),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("T", [32, 37], ids=["multiple", "not-multiple"])
@pytest.mark.parametrize("name", list(BLOCK_SELECT))
def test_block_select_equals_dense_under_its_routes(name, T, causal):
    attn = build(BLOCK_SELECT[name], causal)
    q, k, v, padding = qkv_with_padding(T)
    out, routes = attn.attend_routes(q, k, v, padding, None)
    assert (routes.blocks >= 0).any()  # it did route somewhere
    if causal:  # only past blocks
        qb = torch.arange(routes.blocks.shape[2])[:, None]
        assert ((routes.blocks < qb) | (routes.blocks < 0)).all()
    assert_same_outputs_and_grads(out, reference_attention(q, k, v, routes.mask(T), padding), (q, k, v), padding)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("T", [32, 37], ids=["multiple", "not-multiple"])
@pytest.mark.parametrize("local_heads, max_seq_len", [(0, 64), (1, 64), (0, 256)])
def test_kmeans_equals_dense_under_its_groups(local_heads, max_seq_len, T, causal):
    """max_seq_len=256 and 2 clusters make groups of up to 128 slots: groups land in size buckets."""
    clusters = 2 if max_seq_len == 256 else 3
    cfg = dict(kind="kmeans", num_clusters=clusters, local_heads=local_heads, window=3, block_size=4)
    attn = build(cfg, causal, max_seq_len=max_seq_len).eval()
    _, _, v, padding = qkv_with_padding(T)
    r = F.layer_norm(torch.randn(2, H, T, HD), (HD,)).requires_grad_()  # shared q = k
    out, routes = attn._full(r, r, v, padding)
    real = ~padding[:, None, :].expand(2, H - local_heads, T)
    assert torch.equal(routes.groups[:, local_heads:] >= 0, real)  # every real token is in one group
    ref = reference_attention(r, r, v, routes.mask(T), padding)
    assert_same_outputs_and_grads(out, ref, (r, v), padding)


def test_kmeans_groups_are_balanced():
    g = torch.Generator().manual_seed(0)
    aff = F.normalize(torch.randn(2, 3, 50, 4, generator=g), dim=-1)
    real = torch.ones(2, 50, dtype=torch.bool)
    real[1, 41:] = False
    cap = (real.sum(-1) + 3) // 4  # ceil(n / c)
    cluster = balanced_clusters(aff, real, cap)
    assert torch.equal(cluster >= 0, real[:, None].expand(2, 3, 50))
    sizes = F.one_hot(cluster.clamp(min=0), 4).mul(real[:, None, :, None]).sum(2)  # (B, H, c)
    assert (sizes <= cap[:, None, None]).all() and torch.equal(sizes.sum(-1), real.sum(-1)[:, None].expand(2, 3))
    # the round-1 winners of a centroid are its nearest proposers
    groups, counts = arrival_groups(
        torch.tensor([[[0, 1, 0, 0, 1, 0, -1, 0]]]), 2, torch.zeros(1, 1, 2, dtype=torch.long)
    )
    assert groups[0, 0].tolist() == [0, 1 << 20, 0, 1, 1 << 20, 1, -1, 2] and counts.tolist() == [[[5, 2]]]


def test_group_slots_buckets_groups_by_size():
    groups = torch.tensor([[0, 1, 0, 2, 1, 0, 0, 0, -1, 2, 0, 0]])  # sizes 7, 2, 2 (token 8 in no group)
    buckets, dense = group_slots(groups, size=8, min_size=2)
    assert [tuple(b.shape) for b in buckets] == [(1, 1, 8), (1, 2, 2)]
    assert buckets[0][0, 0].tolist() == [0, 2, 5, 6, 7, 10, 11, -1]  # group 0, position order, empty slot last
    assert buckets[1][0].tolist() == [[1, 4], [3, 9]]
    assert dense[0].tolist() == [0, 1, 0, 2, 1, 0, 0, 0, -1, 2, 0, 0]


def test_kmeans_centroids_move_only_by_ema_and_only_in_training():
    attn = build(dict(kind="kmeans", num_clusters=3, ema_decay=0.9), causal=True)
    assert "centroids" not in dict(attn.named_parameters())  # never touched by an optimizer
    x = torch.randn(2, 10, H * HD)
    before = attn.centroids.clone()
    attn.eval()
    attn(x).sum().backward()
    assert torch.equal(attn.centroids, before)
    attn.train()
    with torch.no_grad():
        r = F.normalize(F.layer_norm(attn._heads(attn.q_proj(x)), (HD,)), dim=-1)
        nearest = (r @ before.transpose(-1, -2)).argmax(-1)  # (B, H, T)
        expected = before.clone()
        for h in range(H):
            for c in range(3):
                members = r[:, h][nearest[:, h] == c]
                if len(members):
                    expected[h, c] = F.normalize(0.9 * before[h, c] + 0.1 * members.mean(0), dim=-1)
    attn(x).sum().backward()
    torch.testing.assert_close(attn.centroids, expected, atol=1e-6, rtol=0)
    assert not torch.equal(attn.centroids, before)


def test_block_topp_gives_more_blocks_to_flatter_routing():
    """Top-p takes the fewest blocks reaching mass p: a peaked score row needs 1, a flat one several."""
    attn = build(dict(kind="block_topp", block_size=4, top_p=0.9, max_blocks=5), causal=False)
    peaked = torch.tensor([[[[20.0, 0, 0, 0, 0, 0]]]])
    flat = torch.zeros(1, 1, 1, 6)
    assert (attn.select(peaked) >= 0).sum() == 1
    assert (attn.select(flat) >= 0).sum() == 5  # capped by max_blocks (0.9 of 6 equal blocks needs 6)
    q, k, v, padding = qkv_with_padding(32)
    _, routes = attn.attend_routes(q, k, v, padding, None)
    assert 1.0 <= routes.stats["mean_blocks"] <= 6.0


@pytest.mark.parametrize("causal", [True, False])
def test_synthesizer_dense_is_tay_eq_1_2(causal):
    """p_i = softmax(W2 relu(W1 x_i + b1) + b2)[:T] masked and renormalised; a_i = sum_j p_ij x_j."""
    attn = build(dict(kind="synthesizer"), causal, n_heads=1, d_model=8, max_seq_len=16).eval()
    x = torch.randn(2, 11, 8)
    padding = torch.zeros(2, 11, dtype=torch.bool)
    padding[1, 8:] = True
    out, routes = attn(x, padding_mask=padding, return_routes=True)
    logits = attn.w2(F.relu(attn.w1(x)))[..., :11]  # (B, T, T) over positions
    allowed = ~padding[:, None, :]
    if causal:
        allowed = allowed & torch.ones(11, 11, dtype=torch.bool).tril()
    p = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    torch.testing.assert_close(out, p @ x, atol=1e-6, rtol=0)
    torch.testing.assert_close(routes.weights[:, 0], p, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["random", "factorized"])
def test_synthesizer_variants_and_mix_respect_the_mask(variant):
    attn = build(dict(kind="synthesizer", variant=variant, mix_dot=True, values="linear"), causal=True)
    x = torch.randn(2, 9, H * HD)
    out, routes = attn(x, return_routes=True)
    w = routes.weights
    assert out.shape == x.shape and not torch.triu(w[0, 0], 1).any()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, H, 9))
    out.sum().backward()
    assert attn.mix.grad is not None
