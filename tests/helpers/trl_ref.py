"""TRL's ORPOTrainer on token ids prepared by orpo_plugin, for parity where the two tokenize differently.

TRL appends EOS after a chat turn that already ends with the template's end-of-turn token (`<|im_end|>\\n</s>`);
orpo_plugin does not (docs/differences-from-trl.md). To compare the training computation itself, TRL is handed our
ids: its `tokenize_row` is replaced by one that lays out rows carrying `prompt_input_ids`, `chosen_input_ids` and
`rejected_input_ids` (ours: responses only) in TRL's own format (prompt + response, labels -100 on the prompt).
"""

from __future__ import annotations


def pretokenized_trl_trainer():
    from trl.experimental.orpo import ORPOTrainer

    class PretokenizedORPOTrainer(ORPOTrainer):
        def tokenize_row(self, feature, model=None):
            prompt = list(feature["prompt_input_ids"])
            out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for name in ("chosen", "rejected"):
                response = list(feature[f"{name}_input_ids"])
                out[f"{name}_input_ids"] = prompt + response
                out[f"{name}_attention_mask"] = [1] * (len(prompt) + len(response))
                out[f"{name}_labels"] = [-100] * len(prompt) + response
            return out

    return PretokenizedORPOTrainer


def trl_rows(prepared) -> list[dict]:
    """Rows of a dataset prepared by orpo_plugin, with the text fields TRL's pipeline reads before tokenizing."""
    cols = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
    return [{"prompt": "", "chosen": "c", "rejected": "r", **{k: list(row[k]) for k in cols}} for row in prepared]
