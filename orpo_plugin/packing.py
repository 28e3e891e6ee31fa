"""Which preference pairs share a micro-batch under a token budget.

Pairs are shuffled, cut into windows and packed by first-fit-decreasing inside each window, so micro-batches
stay full while the pairs that meet change every epoch. The budget is hard: a group never costs more than
`max_tokens`, and a pair is never split across groups.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import Sampler

DEFAULT_WINDOW = 1024
"""Pairs per packing window when `window=None`.

FFD needs a choice of sizes to fill bins well: at 8 pairs per budget a window of 1024 fills >90% on
lognormal lengths. It also bounds how far packing reorders data (a pair only meets pairs from its own window
of the shuffled order), and because FFD sorts within a window only, the shuffle still decides who meets whom:
packing the whole dataset at once would produce nearly the same groups every epoch.
"""


def _as_int(value: Any) -> int | None:
    """The value as a plain int (numpy/torch integers too), or None for bools and non-integers."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _positive_int(value: Any, what: str) -> int:
    n = _as_int(value)
    if n is None or n <= 0:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return n


def _int(value: Any, what: str) -> int:
    n = _as_int(value)
    if n is None:
        raise ValueError(f"{what} must be an int, got {value!r}")
    return n


def _validate_lengths(lengths: Sequence[int], max_tokens: int) -> list[int]:
    """Lengths as plain ints; every one positive and within the budget, else a ValueError naming the pair."""
    out: list[int] = []
    for i, raw in enumerate(lengths):
        n = _as_int(raw)
        if n is None:
            raise ValueError(f"pair {i} has invalid length {raw!r}: lengths must be positive ints")
        if n <= 0:
            raise ValueError(f"pair {i} has invalid length {n}: lengths must be positive ints")
        if n > max_tokens:
            raise ValueError(
                f"pair {i} needs {n} tokens but packing_max_tokens is {max_tokens}; "
                "raise packing_max_tokens or lower max_length"
            )
        out.append(n)
    return out


def _first_fit_decreasing(items: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """FFD of `items` (indices into `lengths`) into bins of `capacity`; bins in opening order.

    First fit is a leftmost-bin-with-room query on a max segment tree over remaining capacities, O(log n) per
    item. Unopened bins hold the full capacity, so the query opens a new bin exactly when no open bin fits.
    """
    order = sorted(items, key=lambda i: -lengths[i])
    size = 1
    while size < len(order):
        size *= 2
    room = [capacity] * (2 * size)
    bins: list[list[int]] = []
    for i in order:
        need = lengths[i]
        node = 1
        while node < size:
            node = 2 * node if room[2 * node] >= need else 2 * node + 1
        slot = node - size
        if slot == len(bins):
            bins.append([])
        bins[slot].append(i)
        room[node] -= need
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return bins


def pack_groups(
    lengths: Sequence[int],
    max_tokens: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    window: int | None = None,
    shuffle: bool = True,
) -> list[list[int]]:
    """Group pair indices into micro-batches whose summed length is at most `max_tokens`.

    Every index appears exactly once. With `shuffle`, the indices are shuffled by a generator seeded from
    (seed, epoch), packed by first-fit-decreasing in consecutive windows of `window` pairs
    (`None` -> DEFAULT_WINDOW = 1024), and the resulting groups are shuffled again. Without `shuffle`, the
    windows run over 0..n-1 in order and the groups keep their window order. Deterministic in all inputs.
    """
    max_tokens = _positive_int(max_tokens, "max_tokens")
    seed = _int(seed, "seed")
    epoch = _int(epoch, "epoch")
    window = DEFAULT_WINDOW if window is None else _positive_int(window, "window")
    sizes = _validate_lengths(lengths, max_tokens)

    order = list(range(len(sizes)))
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    groups: list[list[int]] = []
    for start in range(0, len(order), window):
        groups.extend(_first_fit_decreasing(order[start : start + window], sizes, max_tokens))
    if shuffle:
        rng.shuffle(groups)
    return groups


def _split_in_two(group: list[int], lengths: Sequence[int]) -> tuple[list[int], list[int]]:
    """Two non-empty halves of a group with close token totals (longest pair first into the lighter half)."""
    order = sorted(group, key=lambda i: -int(lengths[i]))
    first, second = [order[0]], [order[1]]
    tokens = [int(lengths[order[0]]), int(lengths[order[1]])]
    for i in order[2:]:
        if tokens[0] <= tokens[1]:
            first.append(i)
            tokens[0] += int(lengths[i])
        else:
            second.append(i)
            tokens[1] += int(lengths[i])
    return first, second


def balance_for_ranks(groups: list[list[int]], lengths: Sequence[int], num_replicas: int) -> list[list[int]]:
    """Make the number of groups a multiple of `num_replicas`, so every DDP rank runs the same step count.

    First the group with the most pairs (ties: most tokens, then earliest) is split in two, repeatedly; halves
    of a group never exceed the budget the group met. Only once every group is a single pair, i.e. when there
    are fewer pairs than the next multiple of `num_replicas` above the group count, are whole groups repeated
    from the start of the list (as torch's DistributedSampler pads). The input is not modified.
    """
    num_replicas = _positive_int(num_replicas, "num_replicas")
    out = [list(g) for g in groups]
    if not out:
        return out
    missing = -len(out) % num_replicas

    def weight(pos: int) -> tuple[int, int, int]:
        g = out[pos]
        return len(g), sum(int(lengths[i]) for i in g), -pos

    while missing:
        pos = max(range(len(out)), key=weight)
        if len(out[pos]) < 2:
            break
        out[pos : pos + 1] = _split_in_two(out[pos], lengths)
        missing -= 1
    n = len(out)
    out.extend(list(out[k % n]) for k in range(missing))
    return out


class PackedBatchSampler(Sampler[list[int]]):
    """Batch sampler of this rank's token-budgeted groups of dataset indices, for DataLoader(batch_sampler=).

    Every rank computes the same global grouping (pack_groups + balance_for_ranks, seeded by seed and epoch)
    and takes groups[rank::num_replicas], so all ranks see the same number of micro-batches.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        *,
        seed: int = 0,
        window: int | None = None,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__()
        self.max_tokens = _positive_int(max_tokens, "max_tokens")
        self.lengths = _validate_lengths(lengths, self.max_tokens)
        self.seed = _int(seed, "seed")
        self.window = None if window is None else _positive_int(window, "window")
        self.shuffle = bool(shuffle)
        self.num_replicas = _positive_int(num_replicas, "num_replicas")
        rank = _int(rank, "rank")
        if not 0 <= rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, {self.num_replicas}), got {rank}")
        self.rank = rank
        self.epoch = 0
        self._cache_key: tuple[int, int] | None = None
        self._cache: list[list[int]] = []

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields (call it each epoch, like DistributedSampler)."""
        self.epoch = _int(epoch, "epoch")

    def _global_groups(self) -> list[list[int]]:
        key = (self.seed, self.epoch)
        if self._cache_key != key:
            packed = pack_groups(
                self.lengths,
                self.max_tokens,
                seed=self.seed,
                epoch=self.epoch,
                window=self.window,
                shuffle=self.shuffle,
            )
            self._cache = balance_for_ranks(packed, self.lengths, self.num_replicas)
            self._cache_key = key
        return self._cache

    @property
    def groups(self) -> list[list[int]]:
        """The global, rank-balanced grouping for the current epoch (a copy; computed once per (seed, epoch))."""
        return [list(g) for g in self._global_groups()]

    def _rank_groups(self) -> list[list[int]]:
        return self._global_groups()[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        for group in self._rank_groups():
            yield list(group)

    def __len__(self) -> int:
        return len(self._rank_groups())

    def state_dict(self) -> dict[str, int]:
        """What a resumed run needs to reproduce the order: epoch and seed."""
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore epoch and seed saved by state_dict."""
        self.seed = _int(state["seed"], "seed")
        self.epoch = _int(state["epoch"], "epoch")

    def stats(self) -> dict[str, float]:
        """Packing quality of the current epoch's global grouping (repeated pairs counted where they recur)."""
        groups = self._global_groups()
        tokens = [sum(self.lengths[i] for i in g) for g in groups]
        num_groups = len(tokens)
        num_items = sum(len(g) for g in groups)
        return {
            "num_groups": num_groups,
            "num_pairs": len(self.lengths),
            "num_repeated": num_items - len(self.lengths),
            "groups_per_rank": num_groups // self.num_replicas,
            "num_replicas": self.num_replicas,
            "mean_pairs_per_group": num_items / num_groups if num_groups else 0.0,
            "budget": self.max_tokens,
            "mean_group_tokens": sum(tokens) / num_groups if num_groups else 0.0,
            "min_group_tokens": min(tokens) if tokens else 0,
            "max_group_tokens": max(tokens) if tokens else 0,
            "fill_ratio": sum(tokens) / (num_groups * self.max_tokens) if num_groups else 0.0,
        }
