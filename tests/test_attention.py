"""Per-sequence and prefix-shared attention against dense-mask references on random q/k/v."""

from __future__ import annotations

import pytest
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


# ---- attention features: sliding windows, soft-capping, sinks, dropout; refusals --------------------------------


def dense_reference(q, k, v, mask, scale=None, softcap=None, sinks=None):
    """Plain softmax attention over a dense boolean mask, as the eager kernels compute it; [1, T, H, D]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.reshape(1, -1, 1, 1).expand(1, -1, scores.shape[2], 1).to(scores.dtype)
        probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
    else:
        probs = torch.softmax(scores, -1)
    return (probs @ v).transpose(1, 2)


def block_diagonal(cu, total, window=None):
    from orpo_plugin.attention.contract import _lower_right_causal

    mask = torch.zeros(total, total, dtype=torch.bool)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        mask[a:b, a:b] = _lower_right_causal(b - a, b - a, None, window)
    return mask


SEGMENTS = torch.tensor([[0, 3, 2, 4], [9, 0, 1, 1], [11, 5, 1, 3], [20, 1, 3, 0], [24, 6, 7, 9]])
CU = torch.tensor([0, 4, 5, 12, 20, 34, 40], dtype=torch.int32)
FEATURE_CASES = {
    "window": dict(sliding_window=3),
    "softcap": dict(softcap=2.0, scaling=0.7),
    "sinks": dict(s_aux=torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)),
    "all": dict(sliding_window=4, softcap=1.5, s_aux=torch.tensor([1.0, 0.0, -2.0, 3.0], dtype=torch.float64)),
}


def _reference_for(layout, q, k, v, kw):
    if layout == "prefix":
        mask = prefix_sharing_mask(SEGMENTS, q.shape[2], window=kw.get("sliding_window"))
    else:
        mask = block_diagonal(CU, q.shape[2], kw.get("sliding_window"))
    return dense_reference(q, k, v, mask, kw.get("scaling"), kw.get("softcap"), kw.get("s_aux"))


@pytest.mark.parametrize("case", list(FEATURE_CASES))
@pytest.mark.parametrize("layout", ["varlen", "prefix"])
def test_orpo_sdpa_honours_features(layout, case):
    kw = FEATURE_CASES[case]
    q, k, v = qkv(46 if layout == "prefix" else 40, seed=4)
    lay = {"prefix_segments": SEGMENTS} if layout == "prefix" else {"cu_seq_lens_q": CU}
    ours, _ = orpo_sdpa_attention(None, q, k, v, None, position_ids=None, dropout=0.0, **lay, **kw)
    ref = _reference_for(layout, q, k, v, kw)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    # and the feature matters here: without it the output differs
    plain, _ = orpo_sdpa_attention(None, q, k, v, None, **lay)
    assert (plain - ref).abs().max() > 1e-3


def test_window_counts_unshared_distances_in_prefix_sharing():
    """A rejected token's distance to a prompt token is taken in [prompt][rejected], not in the shared row."""
    mask = prefix_sharing_mask(torch.tensor([[0, 3, 4, 2]]), 9, window=3).int()
    # rejected tokens sit at row 7, 8 but at positions 3, 4 of [prompt][rejected]
    assert mask[7].tolist() == [0, 1, 1, 0, 0, 0, 0, 1, 0]
    assert mask[8].tolist() == [0, 0, 1, 0, 0, 0, 0, 1, 1]
    assert mask[6].tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0]  # chosen token at position 6


@pytest.mark.parametrize("case", ["window", "softcap"])
def test_flash_varlen_prefix_sharing_honours_window_and_softcap(case):
    from orpo_plugin.attention import orpo_flash_attention, varlen_reference

    kw = FEATURE_CASES[case]
    q, k, v = qkv(46, seed=5)
    ours, _ = orpo_flash_attention(None, q, k, v, None, prefix_segments=SEGMENTS, kernel=varlen_reference, **kw)
    torch.testing.assert_close(ours, _reference_for("prefix", q, k, v, kw), atol=1e-12, rtol=1e-12)


def test_flash_varlen_refuses_sinks_naming_the_feature_and_the_alternative():
    from orpo_plugin.attention import orpo_flash_attention, varlen_reference

    q, k, v = qkv(46, seed=5)
    with pytest.raises(ValueError, match=r"attention sinks \(s_aux=.*orpo_flash cannot honour.*orpo_sdpa"):
        orpo_flash_attention(
            None, q, k, v, None, prefix_segments=SEGMENTS, kernel=varlen_reference, s_aux=torch.zeros(4)
        )


def test_flex_prefix_sharing_block_mask_honours_window():
    """Forward only: flex_attention has no backward on CPU in this torch."""
    from torch.nn.attention.flex_attention import flex_attention

    from orpo_plugin.attention import prefix_sharing_block_mask

    q, k, v = (t.float() for t in qkv(46, heads=2, kv_heads=2, seed=6))
    block = prefix_sharing_block_mask(SEGMENTS, 46, "cpu", window=3)
    ours = flex_attention(q, k, v, block_mask=block).transpose(1, 2)
    ref = dense_reference(q, k, v, prefix_sharing_mask(SEGMENTS, 46, window=3))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert prefix_sharing_block_mask(SEGMENTS, 46, "cpu", window=None) is not block  # one mask per window


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"alibi_slopes": torch.ones(4)}, "does not know the attention keyword 'alibi_slopes'"),
        ({"is_causal": False}, "is_causal=False"),
        ({"past_key_values": object()}, "no KV cache"),
    ],
)
def test_unknown_or_unsupported_keywords_are_refused(kwargs, message):
    q, k, v = qkv(12)
    with pytest.raises(ValueError, match=message):
        orpo_sdpa_attention(None, q, k, v, None, cu_seq_lens_q=torch.tensor([0, 5, 12]), **kwargs)


def test_inert_keywords_are_accepted():
    q, k, v = qkv(12)
    cu = torch.tensor([0, 5, 12])
    ours, _ = orpo_sdpa_attention(
        None,
        q,
        k,
        v,
        None,
        cu_seq_lens_q=cu,
        position_ids=torch.zeros(1, 12),
        use_cache=False,
        output_router_logits=False,
        is_causal=True,
        sliding_window=None,
        softcap=None,
        s_aux=None,
        dropout=0.0,
    )
    torch.testing.assert_close(ours, dense(q, k, v, block_diagonal(cu, 12)), atol=1e-12, rtol=1e-12)


def test_dropout_is_applied_in_training_and_unbiased():
    class Module(torch.nn.Module):
        pass

    module = Module().train()
    q, k, v = qkv(12, seed=7)
    cu = torch.tensor([0, 5, 12])
    clean, _ = orpo_sdpa_attention(module, q, k, v, None, cu_seq_lens_q=cu)
    torch.manual_seed(0)
    draws = torch.stack(
        [orpo_sdpa_attention(module, q, k, v, None, cu_seq_lens_q=cu, dropout=0.3)[0] for _ in range(800)]
    )
    assert (draws[0] - clean).abs().max() > 1e-2  # applied
    # inverted dropout keeps the expectation: the mean of the draws approaches the clean output (its error
    # 0.012 here with 800 draws; a dropout without the 1/(1-p) rescale is off by 0.18)
    assert (draws.mean(0) - clean).abs().mean() < 0.05
    module.eval()
    evaluated, _ = orpo_sdpa_attention(module, q, k, v, None, cu_seq_lens_q=cu, dropout=0.3)
    torch.testing.assert_close(evaluated, clean)


def test_plan_cache_is_safe_across_layouts_and_recomputation():
    """A forward over another layout between a forward and its recomputation changes nothing."""
    q, k, v = qkv(46, seed=8)
    first, _ = orpo_sdpa_attention(None, q, k, v, None, prefix_segments=SEGMENTS, sliding_window=3)
    other = orpo_sdpa_attention(None, q, k, v, None, cu_seq_lens_q=torch.tensor([0, 40, 46]))[0]
    again, _ = orpo_sdpa_attention(None, q, k, v, None, prefix_segments=SEGMENTS, sliding_window=3)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    same_values = SEGMENTS.clone()  # equal layout in another tensor: a fresh plan, same result
    torch.testing.assert_close(
        orpo_sdpa_attention(None, q, k, v, None, prefix_segments=same_values)[0],
        orpo_sdpa_attention(None, q, k, v, None, prefix_segments=SEGMENTS)[0],
    )
    assert (other - first).abs().max() > 1e-3
