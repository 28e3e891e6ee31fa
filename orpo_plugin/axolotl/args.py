"""The YAML keys of the Axolotl plugin: a pydantic model merged into Axolotl's config schema, and the dataclass
that carries their values into Axolotl's training arguments.

Only pydantic is needed to import this module, so the keys can be documented and checked without Axolotl.
Every key defaults to None: "leave orpo_plugin's ORPOConfig default" (chunked loss on, NLL over prompt + chosen as
TRL does, the padded layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

# YAML key -> ORPOConfig field
KEY_TO_FIELD = {
    "orpo_padding_free": "padding_free",
    "orpo_packing": "packing",
    "orpo_packing_max_tokens": "packing_max_tokens",
    "orpo_prefix_sharing": "prefix_sharing",
    "orpo_chunked_loss": "chunked_loss",
    "orpo_nll_on_prompt": "nll_on_prompt",
    "orpo_max_prompt_length": "max_prompt_length",
    "orpo_truncation_mode": "truncation_mode",
}


class ORPOPluginArgs(BaseModel):
    """orpo_plugin's keys in an Axolotl config (used with `rl: orpo`; beta comes from `orpo_alpha` or `rl_beta`)."""

    orpo_padding_free: bool | None = Field(
        default=None,
        json_schema_extra={
            "description": "Lay the chosen and rejected sequences of a micro-batch end to end in one row with no "
            "padding (position_ids restart per sequence)."
        },
    )
    orpo_packing: bool | None = Field(
        default=None,
        json_schema_extra={
            "description": "Pack whole preference pairs into micro-batches of at most orpo_packing_max_tokens tokens "
            "(implies orpo_padding_free). Use this instead of sample_packing, which Axolotl refuses for RLHF."
        },
    )
    orpo_packing_max_tokens: int | None = Field(
        default=None,
        ge=2,
        json_schema_extra={
            "description": "Token budget of one packed micro-batch. Default: sequence_len * micro_batch_size, "
            "and at least 2 * sequence_len."
        },
    )
    orpo_prefix_sharing: bool | None = Field(
        default=None,
        json_schema_extra={
            "description": "Lay each pair out once as [prompt][chosen][rejected] so the prompt is computed once "
            "(sdpa/eager attention)."
        },
    )
    orpo_chunked_loss: bool | None = Field(
        default=None,
        json_schema_extra={
            "description": "Compute log-probs from hidden states in chunks so [tokens x vocab] logits never exist at "
            "once (default true)."
        },
    )
    orpo_nll_on_prompt: bool | None = Field(
        default=None,
        json_schema_extra={
            "description": "NLL over prompt + chosen tokens (true, the default, as TRL and Axolotl's built-in ORPO) "
            "or over the chosen completion only (false)."
        },
    )

    orpo_max_prompt_length: int | None = Field(
        default=None,
        ge=1,
        json_schema_extra={
            "description": "Prompt tokens kept when a pair is longer than sequence_len (the prompt is cut first, "
            "then the responses). Must be less than sequence_len. Unset: responses are cut, and only a prompt that "
            "alone fills sequence_len is cut (to half of it)."
        },
    )
    orpo_truncation_mode: Literal["keep_end", "keep_start"] | None = Field(
        default=None,
        json_schema_extra={
            "description": "Which part of a long prompt is kept: keep_end (default: the latest turns, BOS kept first) "
            "or keep_start."
        },
    )

    @model_validator(mode="before")
    @classmethod
    def check_orpo_plugin_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        used = sorted(k for k in KEY_TO_FIELD if data.get(k) is not None)
        rl = data.get("rl")
        rl = getattr(rl, "value", rl)
        if used and rl != "orpo":
            raise ValueError(f"{', '.join(used)}: orpo_plugin's keys need `rl: orpo` (got rl: {rl!r})")
        if rl == "orpo":
            for key in ("context_parallel_size", "sequence_parallel_degree", "tensor_parallel_size"):
                size = data.get(key)
                if isinstance(size, int) and size > 1:
                    raise ValueError(
                        f"{key}: {size}: under rl: orpo, the Axolotl plugin does not split sequences or layers "
                        f"across GPUs (its per-sequence log-probabilities would be computed on shards); set {key}: 1 "
                        "or remove it. Data parallelism (DDP, FSDP, DeepSpeed) works; for long pairs, "
                        "`orpo-plugin train` under configs/accelerate/deepspeed-ulysses.yaml splits rows "
                        "(docs/distributed.md)."
                    )
        if data.get("orpo_packing_max_tokens") is not None and data.get("orpo_packing") is False:
            raise ValueError("orpo_packing_max_tokens is set but orpo_packing is false; set orpo_packing: true")
        limit, length = data.get("orpo_max_prompt_length"), data.get("sequence_len")
        if isinstance(limit, int) and isinstance(length, int) and limit >= length:
            raise ValueError(
                f"orpo_max_prompt_length ({limit}) must be less than sequence_len ({length}) to leave room for responses"
            )
        return data


@dataclass
class ORPOTrainingArgsMixin:
    """The plugin's values on Axolotl's training arguments (merged into every Axolotl *Config dataclass)."""

    orpo_padding_free: bool | None = None
    orpo_packing: bool | None = None
    orpo_packing_max_tokens: int | None = None
    orpo_prefix_sharing: bool | None = None
    orpo_chunked_loss: bool | None = None
    orpo_nll_on_prompt: bool | None = None
    orpo_max_prompt_length: int | None = None
    orpo_truncation_mode: str | None = None
    # Axolotl's own `pad_to_multiple_of`: on the rl: path it reaches only a DPO collator we replace, so carry it here
    orpo_pad_to_multiple_of: int | None = None
