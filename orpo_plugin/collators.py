"""Tokenized pairs -> model inputs plus the list of predictions the ORPO loss needs.

Three layouts, one class:
- "padded": chosen rows then rejected rows, right-padded to the longest ([2P, T]), as TRL does; for an
  encoder-decoder model (`decoder_start_token_id` given) the prompts go to the encoder ([2P, T_enc]) and the
  responses, shifted right behind the decoder start token, to the decoder ([2P, T_dec]), as TRL does;
- "padding_free": every sequence end to end in one row ([1, N]), `position_ids` restarting at 0, plus the
  flash-attention varlen keywords (`cu_seq_lens_q/k`, `max_length_q/k`);
- "prefix_sharing": each pair once as [prompt][chosen][rejected] in one row; rejected positions continue from the
  end of the prompt, and `prefix_segments` tells the attention which keys each branch may see.

Whatever the layout, the loss reads the same flat "prediction" lists: for each predicted token its flat position
in `input_ids`, the target id, the sequence it belongs to (chosen i -> i, rejected i -> P + i, -1 for prompt
targets), whether it counts in the NLL, and whether its logits count in the chosen/rejected mean-logit metrics
(`logits/chosen`, `logits/rejected`). `Predictions` builds those lists, one `add` per predicted token.
"""

from __future__ import annotations

from typing import Any

import torch

LAYOUTS = ("padded", "padding_free", "prefix_sharing")


class Predictions:
    """The flat prediction lists of a batch, one `add` per predicted token; `to_batch` writes them as tensors
    (`pred_pos`, `pred_target`, `pred_seq`, `pred_nll`, `pred_in_logits_chosen`, `pred_in_logits_rejected`)."""

    def __init__(self):
        self.pos, self.target, self.seq, self.nll = [], [], [], []
        self.in_logits_chosen, self.in_logits_rejected = [], []

    def add(self, pos: int, target: int, seq: int, nll: bool, in_logits_chosen: bool, in_logits_rejected: bool):
        """Position `pos` of the flat input predicts `target`, for sequence `seq` (-1: a prompt target)."""
        self.pos.append(pos)
        self.target.append(target)
        self.seq.append(seq)
        self.nll.append(nll)
        self.in_logits_chosen.append(in_logits_chosen)
        self.in_logits_rejected.append(in_logits_rejected)

    def to_batch(self, batch: dict) -> dict:
        batch["pred_pos"] = torch.tensor(self.pos, dtype=torch.long)
        batch["pred_target"] = torch.tensor(self.target, dtype=torch.long)
        batch["pred_seq"] = torch.tensor(self.seq, dtype=torch.long)
        batch["pred_nll"] = torch.tensor(self.nll, dtype=torch.bool)
        batch["pred_in_logits_chosen"] = torch.tensor(self.in_logits_chosen, dtype=torch.bool)
        batch["pred_in_logits_rejected"] = torch.tensor(self.in_logits_rejected, dtype=torch.bool)
        return batch


class PreferenceCollator:
    """Collate pairs {prompt_input_ids, chosen_input_ids, rejected_input_ids} into one of the LAYOUTS."""

    def __init__(
        self,
        pad_token_id: int,
        layout: str = "padded",
        nll_on_prompt: bool = True,
        pad_to_multiple_of: int | None = None,
        decoder_start_token_id: int | None = None,
    ):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if decoder_start_token_id is not None and layout != "padded":
            raise ValueError(f"encoder-decoder pairs are collated in the padded layout only, got {layout!r}")
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: set tokenizer.pad_token (the trainer falls back to eos)")
        self.pad_token_id = pad_token_id
        self.layout = layout
        self.nll_on_prompt = nll_on_prompt
        self.pad_to_multiple_of = pad_to_multiple_of
        self.decoder_start_token_id = decoder_start_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not features:
            raise ValueError("cannot collate an empty list of pairs")
        for i, f in enumerate(features):
            for key in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
                if key not in f:
                    raise ValueError(f"pair {i} of the batch lacks '{key}'; was the dataset prepared?")
            if not f["chosen_input_ids"] or not f["rejected_input_ids"]:
                raise ValueError(f"pair {i} of the batch has an empty response")
        prompts = [list(f["prompt_input_ids"]) for f in features]
        chosen = [list(f["chosen_input_ids"]) for f in features]
        rejected = [list(f["rejected_input_ids"]) for f in features]
        if self.decoder_start_token_id is not None:
            return self._encoder_decoder(prompts, chosen, rejected)
        if self.layout == "prefix_sharing":
            return self._prefix_sharing(prompts, chosen, rejected)
        sequences = [p + c for p, c in zip(prompts, chosen)] + [p + r for p, r in zip(prompts, rejected)]
        prompt_lens = [len(p) for p in prompts] * 2
        if self.layout == "padded":
            return self._padded(sequences, prompt_lens, len(features))
        return self._padding_free(sequences, prompt_lens, len(features))

    # -- shared bookkeeping ------------------------------------------------------------------------------
    def _add_sequence(
        self,
        preds: Predictions,
        positions,
        ids,
        prompt_len,
        seq,
        chosen,
        prompt_in_logits_rejected=False,
        skip_prompt=False,
    ):
        """Add the predictions of one sequence (`positions[j]` is where ids[j] sits in the flat input): a chosen
        sequence's count in the NLL and in `logits/chosen`, a rejected one's in `logits/rejected`.
        `prompt_in_logits_rejected`: a shared prompt's predictions count in `logits/rejected` too (prefix sharing);
        `skip_prompt`: the prompt's predictions were added with the chosen branch (prefix sharing)."""
        first = prompt_len - 1 if skip_prompt else 0
        for j in range(max(first, 0), len(ids) - 1):
            in_response = j + 1 >= prompt_len
            nll = chosen and (self.nll_on_prompt or in_response)
            in_rejected = not chosen or (prompt_in_logits_rejected and not in_response)
            preds.add(positions[j], ids[j + 1], seq if in_response else -1, nll, chosen, in_rejected)

    @staticmethod
    def _finish(batch, preds: Predictions, num_pairs, real_tokens):
        preds.to_batch(batch)
        # Counts the loss and its metrics need, as Python ints: they stay on the host when the batch moves to the
        # device, so reading them never waits for the device (no synchronisation per micro-batch).
        batch["num_pairs"] = num_pairs
        batch["real_tokens"] = real_tokens
        batch["total_tokens"] = batch["input_ids"].numel()
        batch["nll_tokens"] = sum(preds.nll)
        batch["in_logits_chosen_count"] = sum(preds.in_logits_chosen)
        batch["in_logits_rejected_count"] = sum(preds.in_logits_rejected)
        return batch

    def _round_up(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if not m else ((n + m - 1) // m) * m

    # -- layouts -----------------------------------------------------------------------------------------
    def _padded(self, sequences, prompt_lens, num_pairs):
        width = self._round_up(max(len(s) for s in sequences))
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        preds = Predictions()
        for row, (ids, plen) in enumerate(zip(sequences, prompt_lens)):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            positions = range(row * width, row * width + len(ids))
            self._add_sequence(preds, positions, ids, plen, row, chosen=row < num_pairs)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        return self._finish(batch, preds, num_pairs, sum(len(s) for s in sequences))

    def _encoder_decoder(self, prompts, chosen, rejected):
        num_pairs = len(prompts)
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(
                    f"pair {i} of the batch has an empty prompt (an encoder-decoder model needs encoder input)"
                )
        encoder = prompts + prompts
        responses = chosen + rejected
        enc_width = self._round_up(max(len(p) for p in encoder))
        dec_width = self._round_up(max(len(r) for r in responses))
        rows = len(encoder)
        input_ids = torch.full((rows, enc_width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((rows, enc_width), dtype=torch.long)
        decoder_input_ids = torch.full((rows, dec_width), self.pad_token_id, dtype=torch.long)
        preds = Predictions()
        for row, (p, r) in enumerate(zip(encoder, responses)):
            input_ids[row, : len(p)] = torch.tensor(p)
            attention_mask[row, : len(p)] = 1
            decoder_input_ids[row, : len(r)] = torch.tensor([self.decoder_start_token_id] + r[:-1])
            is_chosen = row < num_pairs
            # decoder position j predicts response token j; every one is a response token (no prompt in the decoder)
            for j, target in enumerate(r):
                preds.add(row * dec_width + j, target, row, is_chosen, is_chosen, not is_chosen)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids}
        real = sum(len(p) for p in encoder) + sum(len(r) for r in responses)
        batch = self._finish(batch, preds, num_pairs, real)
        batch["total_tokens"] = input_ids.numel() + decoder_input_ids.numel()
        return batch

    def _padding_free(self, sequences, prompt_lens, num_pairs):
        flat, position_ids, cu = [], [], [0]
        preds = Predictions()
        for row, (ids, plen) in enumerate(zip(sequences, prompt_lens)):
            start = len(flat)
            flat.extend(ids)
            position_ids.extend(range(len(ids)))
            cu.append(len(flat))
            self._add_sequence(preds, range(start, start + len(ids)), ids, plen, row, chosen=row < num_pairs)
        real = len(flat)
        pad = self._round_up(real) - real
        if pad:  # one trailing filler sequence of pad tokens, never predicted
            flat.extend([self.pad_token_id] * pad)
            position_ids.extend(range(pad))
            cu.append(len(flat))
        lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
        cu_t = torch.tensor(cu, dtype=torch.int32)
        batch = {
            "input_ids": torch.tensor([flat], dtype=torch.long),
            "position_ids": torch.tensor([position_ids], dtype=torch.long),
            "cu_seq_lens_q": cu_t,
            "cu_seq_lens_k": cu_t.clone(),
            "max_length_q": max(lengths),
            "max_length_k": max(lengths),
            "cu_seq_lens_host": cu,  # the same boundaries as a host list, for attention plans (no device read)
        }
        return self._finish(batch, preds, num_pairs, real)

    def _prefix_sharing(self, prompts, chosen, rejected):
        num_pairs = len(prompts)
        flat, position_ids, segments = [], [], []
        preds = Predictions()
        for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected)):
            start = len(flat)
            prompt_len, chosen_len, rejected_len = len(p), len(c), len(r)
            flat.extend(p + c + r)
            position_ids.extend(
                list(range(prompt_len + chosen_len)) + list(range(prompt_len, prompt_len + rejected_len))
            )
            segments.append((start, prompt_len, chosen_len, rejected_len))
            prompt_pos = list(range(start, start + prompt_len))
            chosen_pos = prompt_pos + list(range(start + prompt_len, start + prompt_len + chosen_len))
            rejected_start = start + prompt_len + chosen_len
            rejected_pos = prompt_pos + list(range(rejected_start, rejected_start + rejected_len))
            # the prompt's predictions, computed once, also stand for the rejected branch's in `logits/rejected`
            self._add_sequence(preds, chosen_pos, p + c, prompt_len, i, chosen=True, prompt_in_logits_rejected=True)
            self._add_sequence(preds, rejected_pos, p + r, prompt_len, num_pairs + i, chosen=False, skip_prompt=True)
        real = len(flat)
        pad = self._round_up(real) - real
        if pad:
            segments.append((real, 0, pad, 0))  # filler: a "prompt-less pair" whose chosen branch is padding
            flat.extend([self.pad_token_id] * pad)
            position_ids.extend(range(pad))
        batch = {
            "input_ids": torch.tensor([flat], dtype=torch.long),
            "position_ids": torch.tensor([position_ids], dtype=torch.long),
            "prefix_segments": torch.tensor(segments, dtype=torch.long),
            "prefix_segments_host": [list(seg) for seg in segments],  # the same, as a host list (attention plans)
        }
        # tokens the model would have computed without sharing: the prompt twice
        batch = self._finish(batch, preds, num_pairs, real)
        batch["unshared_tokens"] = real + sum(len(p) for p in prompts)
        return batch


def pair_cost(feature: dict[str, Any], layout: str) -> int:
    """Tokens a pair occupies in a layout (what packing budgets)."""
    prompt_len = len(feature["prompt_input_ids"])
    responses_len = len(feature["chosen_input_ids"]) + len(feature["rejected_input_ids"])
    if layout == "prefix_sharing":
        return prompt_len + responses_len
    return 2 * prompt_len + responses_len
