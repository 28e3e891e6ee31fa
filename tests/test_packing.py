"""Token-budget packing: exact cover, hard budget, determinism, DDP balance and the batch sampler."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from orpo_plugin.packing import DEFAULT_WINDOW, PackedBatchSampler, balance_for_ranks, pack_groups


@st.composite
def packing_inputs(draw, max_pairs: int = 120):
    max_tokens = draw(st.integers(1, 300))
    lengths = draw(st.lists(st.integers(1, max_tokens), max_size=max_pairs))
    return lengths, max_tokens


def _flatten(groups):
    return [i for g in groups for i in g]


def _tokens(group, lengths):
    return sum(lengths[i] for i in group)


def _reference_ffd(items, lengths, capacity):
    bins, room = [], []
    for i in sorted(items, key=lambda i: -lengths[i]):
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def _lognormal_lengths(n=500, seed=0):
    rng = random.Random(seed)
    return [max(1, round(rng.lognormvariate(5.0, 0.8))) for _ in range(n)]


# ---------------------------------------------------------------- pack_groups


@settings(max_examples=200, deadline=None)
@given(
    packing_inputs(),
    st.integers(-5, 5),
    st.integers(0, 5),
    st.none() | st.integers(1, 40),
    st.booleans(),
)
def test_every_index_once_and_hard_budget(inp, seed, epoch, window, shuffle):
    lengths, max_tokens = inp
    groups = pack_groups(lengths, max_tokens, seed=seed, epoch=epoch, window=window, shuffle=shuffle)
    assert sorted(_flatten(groups)) == list(range(len(lengths)))
    assert all(groups), "no empty group"
    for g in groups:
        assert _tokens(g, lengths) <= max_tokens


@settings(max_examples=100, deadline=None)
@given(packing_inputs(), st.integers(0, 10**6), st.integers(0, 50), st.none() | st.integers(1, 40))
def test_deterministic(inp, seed, epoch, window):
    lengths, max_tokens = inp
    a = pack_groups(lengths, max_tokens, seed=seed, epoch=epoch, window=window)
    b = pack_groups(list(lengths), max_tokens, seed=seed, epoch=epoch, window=window)
    assert a == b


@settings(max_examples=100, deadline=None)
@given(packing_inputs(), st.none() | st.integers(1, 40))
def test_unshuffled_is_windowed_ffd_in_index_order(inp, window):
    lengths, max_tokens = inp
    w = DEFAULT_WINDOW if window is None else window
    expected = []
    for start in range(0, len(lengths), w):
        expected += _reference_ffd(list(range(start, min(start + w, len(lengths)))), lengths, max_tokens)
    assert pack_groups(lengths, max_tokens, window=window, shuffle=False) == expected
    assert pack_groups(lengths, max_tokens, seed=3, epoch=7, window=window, shuffle=False) == expected


def test_windows_bound_which_pairs_meet():
    lengths = [1] * 40
    groups = pack_groups(lengths, 100, window=10, seed=1)
    assert len(groups) == 4
    assert all(len(g) == 10 for g in groups)
    shuffled = list(range(40))
    random.Random(1 * 1_000_003 + 0).shuffle(shuffled)
    windows = [set(shuffled[k : k + 10]) for k in range(0, 40, 10)]
    assert sorted(map(sorted, windows)) == sorted(sorted(g) for g in groups)


def test_seed_and_epoch_change_the_order():
    lengths = _lognormal_lengths(300)
    budget = 4 * max(lengths)
    base = pack_groups(lengths, budget, seed=0, epoch=0)
    other_seed = pack_groups(lengths, budget, seed=1, epoch=0)
    other_epoch = pack_groups(lengths, budget, seed=0, epoch=1)
    assert base != other_seed
    assert base != other_epoch
    assert _flatten(base) != _flatten(other_seed)
    as_sets = lambda gs: {frozenset(g) for g in gs}  # noqa: E731
    assert as_sets(base) != as_sets(other_epoch), "pairs should meet different partners across epochs"


def test_ffd_fill_ratio_on_lognormal_lengths():
    lengths = _lognormal_lengths(500)
    budget = round(8 * sum(lengths) / len(lengths))
    assert max(lengths) <= budget
    groups = pack_groups(lengths, budget, seed=0)
    fill = sum(lengths) / (len(groups) * budget)
    assert fill >= 0.9, fill


def test_empty_input():
    assert pack_groups([], 10) == []
    assert balance_for_ranks([], [], 4) == []


def test_overlong_pair_names_index_length_and_budget():
    lengths = [10] * 20
    lengths[17] = 3000
    with pytest.raises(ValueError) as err:
        pack_groups(lengths, 2048)
    msg = str(err.value)
    assert "pair 17" in msg and "3000" in msg and "2048" in msg and "packing_max_tokens" in msg
    with pytest.raises(ValueError, match="pair 17"):
        PackedBatchSampler(lengths, 2048)


@pytest.mark.parametrize("bad", [0, -3, 2.5, 3.0, "7", None, True])
def test_invalid_length_raises_with_index(bad):
    lengths = [5, 5, 5, bad, 5]
    with pytest.raises(ValueError, match="pair 3"):
        pack_groups(lengths, 100)


@pytest.mark.parametrize("bad", [0, -1, 10.0, "100", None, False])
def test_invalid_budget_raises(bad):
    with pytest.raises(ValueError, match="max_tokens"):
        pack_groups([1, 2, 3], bad)


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_invalid_window_raises(bad):
    with pytest.raises(ValueError, match="window"):
        pack_groups([1, 2, 3], 10, window=bad)


def test_accepts_numpy_and_torch_integers():
    np = pytest.importorskip("numpy")
    import torch

    lengths = [3, 4, 5, 6]
    expected = pack_groups(lengths, 9, seed=2)
    assert pack_groups(np.array(lengths), 9, seed=2) == expected
    assert pack_groups(torch.tensor(lengths), 9, seed=2) == expected
    assert pack_groups(lengths, np.int64(9), seed=2) == expected


# ---------------------------------------------------------------- balance_for_ranks


@settings(max_examples=200, deadline=None)
@given(packing_inputs(max_pairs=60), st.integers(1, 9), st.integers(0, 3))
def test_balance_multiple_cover_and_budget(inp, num_replicas, seed):
    lengths, max_tokens = inp
    groups = pack_groups(lengths, max_tokens, seed=seed)
    before = [list(g) for g in groups]
    balanced = balance_for_ranks(groups, lengths, num_replicas)
    assert groups == before, "input not modified"
    assert len(balanced) % num_replicas == 0
    assert all(balanced)
    counts = Counter(_flatten(balanced))
    assert set(counts) == set(range(len(lengths)))
    for g in balanced:
        assert _tokens(g, lengths) <= max_tokens
    target = -(-len(groups) // num_replicas) * num_replicas if groups else 0
    assert len(balanced) == target
    if len(lengths) >= target:
        assert all(c == 1 for c in counts.values()), "splitting suffices, so nothing may repeat"
    else:
        assert all(len(g) == 1 for g in balanced)
        assert sum(counts.values()) == target


def test_balance_splits_the_largest_group():
    lengths = [5, 5, 5, 5, 1, 1, 50]
    groups = [[6], [0, 1, 2, 3], [4, 5]]
    out = balance_for_ranks(groups, lengths, 4)
    assert out == [[6], [0, 2], [1, 3], [4, 5]]


def test_balance_already_multiple_is_unchanged():
    groups = [[0, 1], [2], [3], [4, 5]]
    assert balance_for_ranks(groups, [1] * 6, 2) == groups
    assert balance_for_ranks(groups, [1] * 6, 1) == groups


def test_balance_repeats_only_when_too_few_pairs():
    lengths = [10, 10, 10]
    groups = [[2], [0], [1]]
    out = balance_for_ranks(groups, lengths, 4)
    assert out == [[2], [0], [1], [2]]
    out = balance_for_ranks([[0, 1, 2]], lengths, 8)
    assert out == [[0], [2], [1], [0], [2], [1], [0], [2]]


# ---------------------------------------------------------------- PackedBatchSampler


@settings(max_examples=60, deadline=None)
@given(packing_inputs(max_pairs=80), st.integers(1, 6), st.integers(0, 4), st.integers(0, 3))
def test_ranks_partition_balanced_groups(inp, num_replicas, epoch, seed):
    lengths, max_tokens = inp
    samplers = [
        PackedBatchSampler(lengths, max_tokens, seed=seed, num_replicas=num_replicas, rank=r)
        for r in range(num_replicas)
    ]
    for s in samplers:
        s.set_epoch(epoch)
    expected = balance_for_ranks(pack_groups(lengths, max_tokens, seed=seed, epoch=epoch), lengths, num_replicas)
    per_rank = [list(s) for s in samplers]
    assert all(s.groups == expected for s in samplers)
    assert len({len(s) for s in samplers}) == 1
    assert [len(s) for s in samplers] == [len(b) for b in per_rank]
    interleaved = [per_rank[k % num_replicas][k // num_replicas] for k in range(len(expected))]
    assert interleaved == expected


def test_len_is_exact_and_follows_epoch():
    lengths = _lognormal_lengths(200)
    s = PackedBatchSampler(lengths, 4 * max(lengths), num_replicas=3, rank=1)
    for epoch in range(4):
        s.set_epoch(epoch)
        assert len(s) == len(list(s)) == len(s.groups) // 3


def test_dataloader_yields_the_groups():
    data = [f"pair-{i}" for i in range(57)]
    lengths = [1 + (i * 7) % 13 for i in range(57)]
    sampler = PackedBatchSampler(lengths, 20, seed=5, num_replicas=2, rank=0)
    sampler.set_epoch(2)
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=list)
    batches = list(loader)
    expected = sampler.groups[0::2]
    assert batches == [[data[i] for i in g] for g in expected]
    assert len(loader) == len(expected)
    for b in batches:
        assert sum(lengths[int(x.split("-")[1])] for x in b) <= 20


def test_state_dict_round_trip_restores_order():
    lengths = _lognormal_lengths(150)
    budget = 3 * max(lengths)
    a = PackedBatchSampler(lengths, budget, seed=11)
    a.set_epoch(3)
    order = list(a)
    state = a.state_dict()
    assert state == {"epoch": 3, "seed": 11}

    b = PackedBatchSampler(lengths, budget)
    assert list(b) != order
    b.load_state_dict(state)
    assert list(b) == order
    assert b.groups == a.groups


def test_groups_property_is_read_only_copy():
    s = PackedBatchSampler([3, 3, 3, 3], 6)
    g = s.groups
    g[0].append(99)
    g.append([98])
    assert s.groups != g
    with pytest.raises(AttributeError):
        s.groups = []  # type: ignore[misc]


def test_stats():
    lengths = _lognormal_lengths(500)
    budget = round(8 * sum(lengths) / len(lengths))
    s = PackedBatchSampler(lengths, budget, num_replicas=4)
    st_ = s.stats()
    tokens = [sum(lengths[i] for i in g) for g in s.groups]
    assert st_["num_groups"] == len(s.groups) and st_["num_groups"] % 4 == 0
    assert st_["num_pairs"] == 500 and st_["num_repeated"] == 0
    assert st_["groups_per_rank"] == len(s)
    assert st_["min_group_tokens"] == min(tokens) and st_["max_group_tokens"] == max(tokens) <= budget
    assert st_["mean_group_tokens"] == pytest.approx(sum(tokens) / len(tokens))
    assert st_["fill_ratio"] == pytest.approx(sum(lengths) / (len(tokens) * budget))
    assert st_["fill_ratio"] > 0.85


def test_sampler_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        PackedBatchSampler([1, 2], 4, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="num_replicas"):
        PackedBatchSampler([1, 2], 4, num_replicas=0)
