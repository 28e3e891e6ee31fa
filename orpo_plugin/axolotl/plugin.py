"""`plugins: [orpo_plugin.axolotl.ORPOPlugin]` + `rl: orpo`: Axolotl's ORPO run trains with orpo_plugin's trainer.

How Axolotl 0.19's `rl:` path meets our trainer (see core/builders/rl.py there):
- a plugin's trainer class is built without the model positional, so the plugin keeps the model it is handed in
  `post_model_load` (after any LoRA/QLoRA adapter) and the trainer takes it from there;
- the training arguments arrive as `AxolotlORPOConfig` (TRL's ORPOConfig + Axolotl's mixins, beta already set from
  `orpo_alpha`/`rl_beta`/`trl.beta`, max_length from `sequence_len`); they are copied into our ORPOConfig with the
  same Axolotl mixins, so Axolotl's optimizer and scheduler extensions keep working;
- our YAML keys reach those arguments through a dataclass mixin (`args.ORPOTrainingArgsMixin`);
- the collator Axolotl may pass (only when `pad_to_multiple_of` is set) is a DPO one: ours replaces it;
- datasets load through the plugin's `load_datasets` hook: Axolotl's own loading, with the dataset types of
  `rl: dpo` as well as ORPO's, and bad rows named (see dataset_types.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

from axolotl.integrations.base import BasePlugin

from .args import KEY_TO_FIELD

ORPO_ARG_KEYS = (*KEY_TO_FIELD, "orpo_pad_to_multiple_of")  # the fields of args.ORPOTrainingArgsMixin
LOG = logging.getLogger("orpo_plugin.axolotl")


def _is_orpo(cfg) -> bool:
    rl = cfg.get("rl") if hasattr(cfg, "get") else getattr(cfg, "rl", None)
    return getattr(rl, "value", rl) == "orpo"


class ORPOPlugin(BasePlugin):
    """Replace Axolotl's `rl: orpo` trainer with orpo_plugin's ORPOTrainer (packing, prefix sharing, chunked loss)."""

    def __init__(self):
        super().__init__()
        self.model = None
        self.orpo_args: dict = {}  # our keys' values, also for a trainer whose arguments lack the mixin
        self.written_datasets: list | None = None
        self.schedule: dict = {}  # the YAML's max_steps, warmup_steps, warmup_ratio (None: not set)

    def get_input_args(self) -> str:
        return "orpo_plugin.axolotl.args.ORPOPluginArgs"

    def get_training_args_mixin(self) -> str:
        return "orpo_plugin.axolotl.args.ORPOTrainingArgsMixin"

    def register(self, cfg):
        from .telemetry import stop_telemetry_when_offline

        stop_telemetry_when_offline()  # see telemetry.py: an offline run would otherwise not exit
        if not _is_orpo(cfg):
            LOG.warning(
                "orpo_plugin.axolotl.ORPOPlugin is listed but rl is %r: it acts only with `rl: orpo`", cfg.get("rl")
            )
        # the dataset entries as written, before Axolotl's schema reads them (see dataset_types.dataset_entries)
        self.written_datasets = [dict(d) if hasattr(d, "keys") else d for d in (cfg.get("datasets") or [])]

    def load_datasets(self, cfg, preprocess=False):
        """`rl: orpo`: Axolotl's preference-dataset loading with every DPO dataset type too (see dataset_types)."""
        if not _is_orpo(cfg):
            return None
        from .dataset_types import load_preference_datasets

        return load_preference_datasets(cfg, getattr(self, "written_datasets", None))

    def post_model_load(self, cfg, model):
        self.model = model  # the trainer below is built without it (see the module docstring)

    def get_training_args(self, cfg):
        if not _is_orpo(cfg):
            return None
        self.orpo_args = {key: cfg.get(key) for key in KEY_TO_FIELD}
        self.orpo_args["orpo_pad_to_multiple_of"] = cfg.get("pad_to_multiple_of")
        # what Axolotl derived from rows / micro-batch size (max_steps, warm-up) is recomputed from the packed
        # loader when the user set neither (see AxolotlORPOPluginTrainer)
        self.schedule = {k: cfg.get(k) for k in ("max_steps", "warmup_steps", "warmup_ratio")}
        # Axolotl merges plugin mixins into its training arguments when axolotl.core.training_args is first
        # imported; if that happened before this plugin was registered, the keys cannot go through the arguments.
        from axolotl.core.training_args import AxolotlTrainingMixins

        from .args import ORPOTrainingArgsMixin

        return self.orpo_args if issubclass(AxolotlTrainingMixins, ORPOTrainingArgsMixin) else None

    def get_trainer_cls(self, cfg):
        if not _is_orpo(cfg):
            return None
        base = axolotl_trainer_class()
        # a subclass per plugin instance, so the trainer finds the model this plugin was handed
        return type(base.__name__, (base,), {"orpo_plugin": self, "__module__": base.__module__})


@functools.cache
def axolotl_config_class():
    """Our ORPOConfig with Axolotl's training-argument mixins (as merged with every registered plugin's)."""
    from axolotl.core.training_args import AxolotlTrainingMixins

    from ..config import ORPOConfig
    from .args import ORPOTrainingArgsMixin

    bases = (AxolotlTrainingMixins,)
    if not issubclass(AxolotlTrainingMixins, ORPOTrainingArgsMixin):  # imported before the plugin was registered
        bases += (ORPOTrainingArgsMixin,)

    @dataclasses.dataclass
    class AxolotlORPOPluginConfig(*bases, ORPOConfig):
        """orpo_plugin's ORPOConfig plus Axolotl's training-argument fields."""

    # Trainer checkpoints pickle the arguments: give the class a module-level name (see __getattr__ below)
    AxolotlORPOPluginConfig.__qualname__ = "AxolotlORPOPluginConfig"
    return AxolotlORPOPluginConfig


def to_plugin_config(args, orpo_args: dict | None = None):
    """Copy Axolotl's training arguments (an `AxolotlORPOConfig`) into `axolotl_config_class()`, mapping our keys.

    `orpo_args` (the plugin's copy of our YAML values) fills in keys the arguments do not carry.
    """
    cls = axolotl_config_class()
    if isinstance(args, cls):
        return args
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    ours = {k: v for k, v in (orpo_args or {}).items() if v is not None}
    ours.update({k: getattr(args, k) for k in ORPO_ARG_KEYS if getattr(args, k, None) is not None})
    values.update(ours)  # the orpo_* fields themselves, kept for the record
    values.update({KEY_TO_FIELD[k]: v for k, v in ours.items() if k in KEY_TO_FIELD})
    if "orpo_pad_to_multiple_of" in ours:
        values["pad_to_multiple_of"] = ours["orpo_pad_to_multiple_of"]
    return cls(**values)


@functools.cache
def axolotl_trainer_class():
    """ORPOTrainer with Axolotl's trainer mixins (the same ones Axolotl's own ORPO trainer carries)."""
    from axolotl.core.trainers.mixins import DistributedParallelMixin, OptimizerMixin, RngLoaderMixin, SchedulerMixin
    from axolotl.core.trainers.mixins.optimizer import OptimizerInitMixin

    from ..trainer import ORPOTrainer

    class AxolotlORPOPluginTrainer(
        RngLoaderMixin,
        SchedulerMixin,
        OptimizerMixin,
        OptimizerInitMixin,  # takes Axolotl's `optimizer_cls_and_kwargs`
        DistributedParallelMixin,
        ORPOTrainer,
    ):
        """orpo_plugin's ORPOTrainer as Axolotl builds it: no model positional, Axolotl's ORPO arguments."""

        tag_names = ["axolotl", "orpo", "orpo-plugin"]
        _tag_names = ["trl", "orpo", "orpo-plugin", "axolotl"]
        orpo_plugin: ORPOPlugin | None = None

        def __init__(self, model=None, args=None, data_collator=None, **kwargs):
            if model is None and self.orpo_plugin is not None:
                model = self.orpo_plugin.model
            if model is None:
                raise ValueError(
                    "ORPOPlugin was not handed the model (its post_model_load hook did not run); "
                    "list orpo_plugin.axolotl.ORPOPlugin under `plugins:`"
                )
            if data_collator is not None:
                LOG.info("replacing Axolotl's %s with orpo_plugin's PreferenceCollator", type(data_collator).__name__)
            orpo_args = self.orpo_plugin.orpo_args if self.orpo_plugin is not None else None
            args = to_plugin_config(args, orpo_args)
            schedule = getattr(self.orpo_plugin, "schedule", None) or {}
            # Axolotl sets max_steps to rows / micro-batch size x epochs; a packed micro-batch holds a varying number
            # of pairs, so the steps of an epoch are the packed loader's (Trainer counts them when max_steps is -1)
            self._packed_epochs = bool(args.packing and schedule and not schedule.get("max_steps"))
            if self._packed_epochs:
                args.max_steps = -1
            super().__init__(model=model, args=args, data_collator=None, **kwargs)

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            """Axolotl's warm-up rule (warmup_ratio x total, else min(3 % of the total, 100), 1 read as 2), applied
            to the true total of a packed run instead of the row count's."""
            schedule = getattr(self.orpo_plugin, "schedule", None) or {}
            if self._packed_epochs and schedule.get("warmup_steps") is None and self.lr_scheduler is None:
                ratio = schedule.get("warmup_ratio")
                steps = (
                    max(int(ratio * num_training_steps), 0)
                    if ratio is not None
                    else min(int(0.03 * num_training_steps), 100)
                )
                self.args.warmup_steps = 2 if steps == 1 else steps
            return super().create_scheduler(num_training_steps, optimizer)

    return AxolotlORPOPluginTrainer


def __getattr__(name):  # unpickling a checkpoint's training_args.bin looks the config class up by name
    if name == "AxolotlORPOPluginConfig":
        return axolotl_config_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
