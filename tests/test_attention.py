"""Per-sequence and prefix-shared attention against dense-mask references on random q/k/v."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orpo_plugin.attention import orpo_sdpa_attention, prefix_sharing_mask


def qkv(total, heads=4, kv_heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, total, dim, generator=g, dtype=torch.float64)
    k = torch.randn(1, kv_heads, total, dim, generator=g, dtype=torch.float64)
    v = torch.randn(1, kv_heads, total, dim, generator=g, dtype=torch.float64)
    return q, k, v


def dense(q, k, v, mask):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def test_prefix_sharing_mask_pattern():
    # one pair: prompt 2, chosen 2, rejected 2
    mask = prefix_sharing_mask(torch.tensor([[0, 2, 2, 2]]), 6).int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],  # chosen sees prompt and itself
            [1, 1, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],  # rejected sees prompt, never chosen
            [1, 1, 0, 0, 1, 1],
        ]
    )
    assert torch.equal(mask, expected)


def test_prefix_shared_attention_equals_dense_mask():
    segments = torch.tensor([[0, 3, 2, 4], [9, 0, 1, 1], [11, 5, 1, 3], [20, 1, 3, 0]])
    total = 24
    q, k, v = qkv(total)
    ours, _ = orpo_sdpa_attention(None, q, k, v, None, scaling=None, prefix_segments=segments)
    ref = dense(q, k, v, prefix_sharing_mask(segments, total))
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)


def test_varlen_attention_equals_block_diagonal_mask():
    cu = torch.tensor([0, 4, 5, 12, 20], dtype=torch.int32)
    total = 20
    q, k, v = qkv(total, seed=1)
    ours, _ = orpo_sdpa_attention(None, q, k, v, None, cu_seq_lens_q=cu)
    mask = torch.zeros(total, total, dtype=torch.bool)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        mask[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
    torch.testing.assert_close(ours, dense(q, k, v, mask), atol=1e-12, rtol=1e-12)


def test_refuses_batched_rows_and_missing_layout():
    q, k, v = qkv(6)
    import pytest

    with pytest.raises(ValueError, match="one packed row"):
        orpo_sdpa_attention(None, q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), None)
    with pytest.raises(ValueError, match="needs `cu_seq_lens_q`"):
        orpo_sdpa_attention(None, q, k, v, None)


def test_prefix_sharing_through_the_flash_varlen_interface():
    """The flash path's layout (gathered keys, cu_seqlens_q != cu_seqlens_k) with the varlen contract run on CPU."""
    from orpo_plugin.attention import orpo_flash_attention, varlen_reference

    segments = torch.tensor([[0, 3, 2, 4], [9, 0, 1, 1], [11, 5, 1, 3], [20, 1, 3, 0]])
    total = 24
    q, k, v = qkv(total, seed=2)
    ours, _ = orpo_flash_attention(None, q, k, v, None, prefix_segments=segments, kernel=varlen_reference)
    torch.testing.assert_close(ours, dense(q, k, v, prefix_sharing_mask(segments, total)), atol=1e-12, rtol=1e-12)


def test_varlen_reference_is_bottom_right_causal():
    from orpo_plugin.attention import varlen_reference

    q, k, v = qkv(5, heads=2, kv_heads=2, seed=3)
    cu_q = torch.tensor([0, 2], dtype=torch.int32)
    cu_k = torch.tensor([0, 5], dtype=torch.int32)
    out = varlen_reference(q[0, :, 3:].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu_q, cu_k, 2, 5)
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)[0, :, 3:].transpose(0, 1)
    torch.testing.assert_close(out, full, atol=1e-12, rtol=1e-12)
