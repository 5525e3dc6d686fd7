"""The block-sparse engine: each implementation equals dense SDPA under the pattern's mask."""

import pytest
import torch

from routelab.attention.engine import Part, Windows, attend_parts, reference_attention
from routelab.attention.patterns import band, band_parts
from tests.attention.helpers import H, assert_same_outputs_and_grads, coverage, qkv_with_padding


@pytest.mark.parametrize("impl", ["flash", "sdpa", "math"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T, window, block", [(32, 5, 8), (37, 5, 8), (9, 20, 4), (21, 3, 16), (64, 8, 8)])
def test_band_equals_dense_masked_reference(impl, causal, T, window, block):
    allow = lambda i, j: band(i, j, window, causal)  # noqa: E731
    parts = band_parts(T, window, block, causal, None)
    pos = torch.arange(T)
    assert torch.equal(coverage(parts, T)[0], allow(pos[:, None], pos[None]).long())
    q, k, v, padding = qkv_with_padding(T)
    ref = reference_attention(q, k, v, allow(pos[:, None], pos[None]), padding)
    out = attend_parts(q, k, v, parts, padding_mask=padding, impl=impl)
    assert_same_outputs_and_grads(out, ref, (q, k, v), padding)


def _two_part_pattern(T):
    """Even keys as one part, odd keys as another (a pattern that needs the log-sum-exp merge)."""
    pos = torch.arange(T)
    even, odd = pos[pos % 2 == 0][None], pos[pos % 2 == 1][None]
    everyone = Windows(0, T, T, 1)
    near = lambda keys: (keys[None, :] - pos[:, None]).abs() <= 6  # noqa: E731
    parts = [Part(everyone, even, near(even[0])[None, None]), Part(everyone, odd, near(odd[0])[None, None])]
    return parts, (pos[None, :] - pos[:, None]).abs() <= 6


@pytest.mark.parametrize("impl", ["flash", "math"])
def test_multi_part_merge_is_exact(impl):
    T = 19
    parts, mask = _two_part_pattern(T)
    assert torch.equal(coverage(parts, T)[0], mask.long())  # every allowed pair exactly once
    q, k, v, padding = qkv_with_padding(T)
    out = attend_parts(q, k, v, parts, padding_mask=padding, impl=impl)
    assert_same_outputs_and_grads(out, reference_attention(q, k, v, mask, padding), (q, k, v), padding)


def test_per_batch_head_groups_and_queries_with_no_key():
    """Learned layouts give positions per (batch, head); a query whose keys are all masked gets 0."""
    T, B, L = 12, 2, 6
    g = torch.Generator().manual_seed(3)
    keys = torch.stack([torch.randperm(T, generator=g)[:L] for _ in range(B * H)])  # (BH, L)
    keys[0, :3] = -1  # unused slots
    slot_mask = torch.rand(B * H, T, L, generator=g) > 0.3
    slot_mask[H + 1, 4] = False  # query 4 of (batch 1, head 1) may see no key
    part = Part(Windows(0, T, T, 1), keys[:, None, :], slot_mask[:, None])
    dense = torch.zeros(B * H, T, T + 1, dtype=torch.bool)  # column T collects the unused slots
    dense.scatter_(2, torch.where(keys >= 0, keys, T)[:, None, :].expand(B * H, T, L), slot_mask)
    mask = dense[..., :T].view(B, H, T, T)
    q, k, v, _ = qkv_with_padding(T, B=B)
    no_padding = torch.zeros(B, T, dtype=torch.bool)
    for impl in ("flash", "sdpa", "math"):
        out = attend_parts(q, k, v, [part], impl=impl)
        assert torch.all(out[1, 1, 4] == 0)
        assert_same_outputs_and_grads(out, reference_attention(q, k, v, mask), (q, k, v), no_padding)


def test_sliding_window_views_do_not_copy_keys():
    """Overlapping key windows are strided views of one padded tensor (no gathered copies)."""
    from routelab.attention.engine import _Layout

    parts = band_parts(64, 8, 16, True, None)
    layout = _Layout([p.keys for p in parts], 64, 1, sentinel=False)
    k = layout.pad(torch.randn(1, 64, 4))
    view = layout.take(k, parts[0].keys)
    assert view.shape == (1, 3, 24, 4) and view.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
    assert parts[0].mask.shape == (1, 1, 16, 24)  # interior blocks share one mask
