"""What each layout looks like: two small pairs collated, every tensor written out.

Pair 0: prompt [11, 12], chosen [21, 22], rejected [31].  Pair 1: prompt [13], chosen [23], rejected [32, 33].
Pad id 0. The prediction lists are what the loss reads whatever the layout: position j of the flat input predicts
`pred_target` (the next token), for sequence `pred_seq` (chosen i -> i, rejected i -> 2 + i, -1: a prompt target),
counted in the NLL (`pred_nll`: chosen sequences, prompt included by default as TRL) and in the mean-logit metrics
(`pred_in_logits_chosen`, `pred_in_logits_rejected`). The same eight (seven with prefix sharing) predictions appear
in every layout, only at other positions.
"""

from __future__ import annotations

import torch

from orpo_plugin.collators import PreferenceCollator, pair_cost
from orpo_plugin.packing import pack_groups

PAIRS = [
    {"prompt_input_ids": [11, 12], "chosen_input_ids": [21, 22], "rejected_input_ids": [31]},
    {"prompt_input_ids": [13], "chosen_input_ids": [23], "rejected_input_ids": [32, 33]},
]
T, F = True, False


def _check(batch: dict, expected: dict) -> None:
    assert set(batch) == set(expected), sorted(set(batch) ^ set(expected))
    for key, want in expected.items():
        got = batch[key]
        if isinstance(got, torch.Tensor):
            assert got.tolist() == want, f"{key}: {got.tolist()} != {want}"
        else:
            assert got == want, f"{key}: {got} != {want}"


# the predictions of the two pairs laid out one sequence after another (padding-free and packing)
END_TO_END_PREDICTIONS = {
    "pred_pos": [0, 1, 2, 4, 6, 7, 9, 10],
    "pred_target": [12, 21, 22, 23, 12, 31, 32, 33],
    "pred_seq": [-1, 0, 0, 1, -1, 2, 3, 3],
    "pred_nll": [T, T, T, T, F, F, F, F],
    "pred_in_logits_chosen": [T, T, T, T, F, F, F, F],
    "pred_in_logits_rejected": [F, F, F, F, T, T, T, T],
    # the masks' counts as Python ints: the loss reads them without waiting for the device
    "nll_tokens": 4,
    "in_logits_chosen_count": 4,
    "in_logits_rejected_count": 4,
}


def test_padded():
    """TRL's layout: chosen rows, then rejected rows, right-padded to the longest ([2 pairs x 2, 4])."""
    _check(
        PreferenceCollator(0, "padded")(PAIRS),
        {
            "input_ids": [
                [11, 12, 21, 22],  # chosen 0
                [13, 23, 0, 0],  # chosen 1
                [11, 12, 31, 0],  # rejected 0
                [13, 32, 33, 0],
            ],  # rejected 1
            "attention_mask": [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]],
            "pred_pos": [0, 1, 2, 4, 8, 9, 12, 13],  # flat index row * 4 + column
            "pred_target": [12, 21, 22, 23, 12, 31, 32, 33],
            "pred_seq": [-1, 0, 0, 1, -1, 2, 3, 3],
            "pred_nll": [T, T, T, T, F, F, F, F],
            "pred_in_logits_chosen": [T, T, T, T, F, F, F, F],
            "pred_in_logits_rejected": [F, F, F, F, T, T, T, T],
            "nll_tokens": 4,
            "in_logits_chosen_count": 4,
            "in_logits_rejected_count": 4,
            "num_pairs": 2,
            "real_tokens": 12,
            "total_tokens": 16,  # 4 of them padding
        },
    )


def test_padding_free():
    """Every sequence end to end in one row; positions restart at each sequence, cu_seq_lens marks the boundaries."""
    _check(
        PreferenceCollator(0, "padding_free")(PAIRS),
        {
            "input_ids": [[11, 12, 21, 22, 13, 23, 11, 12, 31, 13, 32, 33]],
            "position_ids": [[0, 1, 2, 3, 0, 1, 0, 1, 2, 0, 1, 2]],
            "cu_seq_lens_q": [0, 4, 6, 9, 12],
            "cu_seq_lens_k": [0, 4, 6, 9, 12],
            "cu_seq_lens_host": [0, 4, 6, 9, 12],  # the same boundaries as a host list, for the attention plans
            "max_length_q": 4,
            "max_length_k": 4,
            **END_TO_END_PREDICTIONS,
            "num_pairs": 2,
            "real_tokens": 12,
            "total_tokens": 12,  # no padding
        },
    )


def test_packing():
    """Packing picks which pairs share a row under a token budget (first-fit decreasing over `pair_cost`), and each
    group is collated padding-free; `pad_to_multiple_of` adds one filler sequence of pad tokens, never predicted."""
    third = {"prompt_input_ids": [14, 15, 16], "chosen_input_ids": [24], "rejected_input_ids": [34]}
    pairs = PAIRS + [third]
    costs = [pair_cost(p, "padding_free") for p in pairs]
    assert costs == [7, 5, 8]  # the prompt counts twice
    groups = pack_groups(costs, 12, shuffle=False)
    assert groups == [[2], [0, 1]]  # 8 alone (8 + 7 > 12); 7 + 5 = 12 fit together
    collate = PreferenceCollator(0, "padding_free", pad_to_multiple_of=8)
    _check(
        collate([pairs[i] for i in groups[1]]),
        {
            "input_ids": [[11, 12, 21, 22, 13, 23, 11, 12, 31, 13, 32, 33, 0, 0, 0, 0]],
            "position_ids": [[0, 1, 2, 3, 0, 1, 0, 1, 2, 0, 1, 2, 0, 1, 2, 3]],
            "cu_seq_lens_q": [0, 4, 6, 9, 12, 16],  # the filler is a sequence of its own
            "cu_seq_lens_k": [0, 4, 6, 9, 12, 16],
            "cu_seq_lens_host": [0, 4, 6, 9, 12, 16],
            "max_length_q": 4,
            "max_length_k": 4,
            **END_TO_END_PREDICTIONS,
            "num_pairs": 2,
            "real_tokens": 12,
            "total_tokens": 16,
        },
    )
    _check(
        collate([pairs[i] for i in groups[0]]),
        {
            "input_ids": [[14, 15, 16, 24, 14, 15, 16, 34]],
            "position_ids": [[0, 1, 2, 3, 0, 1, 2, 3]],
            "cu_seq_lens_q": [0, 4, 8],
            "cu_seq_lens_k": [0, 4, 8],
            "cu_seq_lens_host": [0, 4, 8],
            "max_length_q": 4,
            "max_length_k": 4,
            "pred_pos": [0, 1, 2, 4, 5, 6],
            "pred_target": [15, 16, 24, 15, 16, 34],
            "pred_seq": [-1, -1, 0, -1, -1, 1],
            "pred_nll": [T, T, T, F, F, F],
            "pred_in_logits_chosen": [T, T, T, F, F, F],
            "pred_in_logits_rejected": [F, F, F, T, T, T],
            "nll_tokens": 3,
            "in_logits_chosen_count": 3,
            "in_logits_rejected_count": 3,
            "num_pairs": 1,
            "real_tokens": 8,
            "total_tokens": 8,
        },
    )


def test_prefix_sharing():
    """Each pair once as [prompt][chosen][rejected]: rejected positions continue from the end of the prompt, and
    `prefix_segments` (start, prompt, chosen, rejected lengths) tells the attention which keys each branch sees.
    The prompt's predictions are computed once and count for both branches' mean logits."""
    _check(
        PreferenceCollator(0, "prefix_sharing")(PAIRS),
        {
            "input_ids": [[11, 12, 21, 22, 31, 13, 23, 32, 33]],
            "position_ids": [[0, 1, 2, 3, 2, 0, 1, 1, 2]],
            "prefix_segments": [[0, 2, 2, 1], [5, 1, 1, 2]],
            "prefix_segments_host": [[0, 2, 2, 1], [5, 1, 1, 2]],  # the same as a host list
            # rejected 0's first target (31) is predicted from the prompt's last token (position 1), as chosen 0's
            # first target (21) is; likewise position 5 predicts 23 (chosen 1) and 32 (rejected 1)
            "pred_pos": [0, 1, 2, 1, 5, 5, 7],
            "pred_target": [12, 21, 22, 31, 23, 32, 33],
            "pred_seq": [-1, 0, 0, 2, 1, 3, 3],
            "pred_nll": [T, T, T, F, T, F, F],
            "pred_in_logits_chosen": [T, T, T, F, T, F, F],
            "pred_in_logits_rejected": [T, F, F, T, F, T, T],
            "nll_tokens": 4,
            "in_logits_chosen_count": 4,
            "in_logits_rejected_count": 4,
            "num_pairs": 2,
            "real_tokens": 9,
            "total_tokens": 9,
            "unshared_tokens": 12,  # what the padded and padding-free layouts compute: the prompts twice
        },
    )


def test_nll_on_prompt_off_leaves_prompt_targets_out_of_the_nll():
    batch = PreferenceCollator(0, "padded", nll_on_prompt=False)(PAIRS)
    assert batch["pred_nll"].tolist() == [F, T, T, T, F, F, F, F]  # the first prediction's target is prompt token 12
