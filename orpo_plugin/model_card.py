"""The model card: TRL's card (base model, ORPO citation, tags incl. `orpo-plugin`) plus a table of the ORPO
options used and the orpo-plugin version, written with every checkpoint and with `save_model`."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import textwrap
from pathlib import Path


def _package_version() -> str:
    try:
        return importlib.metadata.version("orpo-plugin")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class ModelCardMixin:
    """ORPOTrainer's model card: what TRL's `create_model_card` reads (name, paper, tags) and the ORPO section."""

    _tag_names = ["trl", "orpo", "orpo-plugin"]
    _name = "ORPO"
    _paper = {
        "title": "ORPO: Monolithic Preference Optimization without Reference Model",
        "id": "2403.07691",
        "citation": textwrap.dedent("""\
            @article{hong2024orpo,
                title        = {{ORPO: Monolithic Preference Optimization without Reference Model}},
                author       = {Jiwoo Hong and Noah Lee and James Thorne},
                year         = 2024,
                eprint       = {arXiv:2403.07691}
            }"""),
    }

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card (base model, ORPO citation, tags incl. `orpo-plugin`) plus the ORPO options used."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        path = os.path.join(self.args.output_dir, "README.md")
        if not self.is_world_process_zero() or not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as f:
            text = f.read()
        text = self._name_local_models(text)
        marker = "### Framework versions"
        section = self._model_card_options()
        text = text.replace(marker, section + marker, 1) if marker in text else text + "\n" + section
        text = text.replace(f"{marker}\n\n", f"{marker}\n\n- orpo-plugin: {_package_version()}\n", 1)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    def _name_local_models(self, text: str) -> str:
        """TRL's card links a base model on the Hub and loads the result by hub id; for a base model from a local
        folder (or an object with no name) and a model not pushed, it would print `[None](https://huggingface.co/None)`
        and `model="None"`. Name the folder instead, and load from the output directory."""
        config = getattr(self.model, "config", None)  # as TRL reads it (a PEFT model forwards it)
        source = str(getattr(config, "_name_or_path", "") or "")
        if source:
            local = f"a model from the local folder `{Path(source).name}`"
        else:
            local = "a model given as an object (no name or path recorded)"
        text = text.replace("[None](https://huggingface.co/None)", local)
        return text.replace('model="None"', f'model="{self.args.output_dir}"')

    def _model_card_options(self) -> str:
        args = self.args
        options = {
            "layout": args.layout,
            "packing": args.packing,
            "packing_max_tokens": args.packing_budget() if args.packing else None,
            "prefix_sharing": args.prefix_sharing,
            "chunked_loss": self.chunk_size is not None,
            "beta": args.beta,
            "nll_on_prompt": args.nll_on_prompt,
            "max_length": args.max_length,
            "max_prompt_length": args.max_prompt_length,
            "truncation_mode": args.truncation_mode,
            "max_completion_length": self.max_completion_length,
            "encoder_decoder": self.is_encoder_decoder,
        }
        rows = "".join(f"| `{k}` | `{v}` |\n" for k, v in options.items() if v is not None)
        return (
            "### ORPO options\n\n"
            "Trained with the `ORPOTrainer` of `orpo-plugin` (a drop-in for TRL's `trl.experimental.orpo`) and these "
            "options:\n\n| option | value |\n|---|---|\n" + rows + "\n"
        )

    def _save_checkpoint(self, model, trial):
        # as TRL's trainers: the model card is refreshed with every checkpoint
        name = self.args.hub_model_id.split("/")[-1] if self.args.hub_model_id else Path(self.args.output_dir).name
        self.create_model_card(model_name=name)
        super()._save_checkpoint(model, trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if _internal_call:  # checkpoints and push_to_hub write the card themselves
            return
        output_dir = output_dir or self.args.output_dir
        name = self.args.hub_model_id.split("/")[-1] if self.args.hub_model_id else Path(output_dir).name
        self.create_model_card(model_name=name)
        card = os.path.join(self.args.output_dir, "README.md")
        if (
            self.is_world_process_zero()
            and os.path.exists(card)
            and os.path.abspath(output_dir) != os.path.abspath(self.args.output_dir)
        ):
            shutil.copyfile(card, os.path.join(output_dir, "README.md"))
