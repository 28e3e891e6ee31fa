"""Axolotl's preference dataset types under `rl: orpo`, and row errors that name the row and the field.

Axolotl 0.19 looks a dataset's `type:` up, under `rl: orpo`, only among its ORPO strategies (`chat_template.argilla`
alone), so a DPO config switched to ORPO stops at its first dataset. With the plugin, the plugin's `load_datasets`
hook runs Axolotl's own preference-dataset loading, the very code `rl: dpo` runs (loading, prepared-dataset cache,
length filters, validation split, deduplication), with each `type:` looked up first among Axolotl's ORPO strategies,
then among its DPO strategies (`chat_template.default`, `chatml.*`, `llama3.*`, `zephyr.nectar`, `user_defined`,
`passthrough`), then as Axolotl's own dotted path to a custom function (its loader imports the second-to-last part
as a top-level module: `my_module.my_function` works, `package.module.function` does not), and with each DPO-type
entry read as `rl: dpo` reads it (`dataset_entries`). The trainer therefore receives exactly the prompt/chosen/rejected
that `rl: dpo` produces for the same YAML; orpo_plugin's data module tokenizes them.

Each row transform is wrapped (`RowTransform`): a transform that fails on a row, reads a field that is null in it,
or returns no usable prompt/chosen/rejected stops with a ValueError naming the dataset, the row and the field,
instead of Axolotl's bare KeyError/AssertionError or a "None" rendered into the text. `chat_template.argilla` rows are
checked before Axolotl's transform reads them (it asserts on an odd number of messages and reads turns by position).
A type that resolves nowhere stops before any data is loaded, with the list of types that work.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import pkgutil
from typing import Any

LOG = logging.getLogger("orpo_plugin.axolotl")

ORPO_PACKAGE = "axolotl.prompt_strategies.orpo"
DPO_PACKAGE = "axolotl.prompt_strategies.dpo"
OUTPUT_FIELDS = ("prompt", "chosen", "rejected")
# Axolotl DPO types that read `chosen[1]`/`rejected[1]` only (one user/assistant exchange), and the types that read
# a whole conversation
ONE_EXCHANGE = frozenset({"chatml.argilla_chat", "llama3.argilla_chat", "chatml.ultra", "llama3.ultra"})
# types whose transform reads a `system` field, filled with `default_system_message` where a row has none
SYSTEM_FIELD_TYPES = frozenset(
    {"chat_template.argilla"}
    | {f"{m}.{f}" for m in ("chatml", "llama3") for f in ("default", "icr", "intel", "prompt_pairs", "ultra")}
)
MULTI_TURN_TYPES = "chat_template.argilla_chat, chat_template.default (rl: dpo types) or chat_template.argilla"


# ------------------------------------------------------------------------------------------------ type table
def _strategies(package: str) -> dict[str, Any]:
    """`module.function` -> the transform factory, for every row-transform factory in one of Axolotl's packages.

    A factory is a public function defined in the module whose first parameter is `cfg` (the ORPO package's
    `load(tokenizer, cfg, ...)` builds a tokenizing strategy for the SFT path, not a row transform).
    """
    pkg = importlib.import_module(package)
    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{package}.{info.name}")
        for name, fn in vars(module).items():
            if name.startswith("_") or not inspect.isfunction(fn) or fn.__module__ != module.__name__:
                continue
            params = list(inspect.signature(fn).parameters)
            if params and params[0] == "cfg":
                found[f"{info.name}.{name}"] = fn
    return found


def preference_types() -> dict[str, tuple[str, Any]]:
    """Every type name the plugin trains with `rl: orpo` -> ("orpo" | "dpo", factory); ORPO's own first."""
    table = {name: ("dpo", fn) for name, fn in _strategies(DPO_PACKAGE).items()}
    table.update({name: ("orpo", fn) for name, fn in _strategies(ORPO_PACKAGE).items()})
    return dict(sorted(table.items(), key=lambda kv: (kv[1][0] != "orpo", kv[0])))


def type_name(value) -> str:
    """A dataset's `type:` as Axolotl names it: a mapping is `user_defined.default`, `module` is `module.default`;
    "untyped" for an entry without one (its rows are already prompt/chosen/rejected)."""
    if value is None:
        return "untyped"
    if not isinstance(value, str):
        return "user_defined.default"
    return value if "." in value else f"{value}.default"


def types_that_work() -> str:
    return (
        ", ".join(preference_types())
        + " (user_defined: a mapping of field_prompt/field_system/field_chosen/field_rejected and *_format keys "
        "under `type:`), or a dotted path to your own transform function"
    )


def _custom(name: str, cfg, dataset_idx: int, **kwargs):
    """Axolotl's own lookup of a dotted path to a custom transform (None when it finds nothing)."""
    from axolotl.prompt_strategies.base import load

    return load(name, cfg, module_base=DPO_PACKAGE, dataset_idx=dataset_idx, **kwargs)


def check_types(cfg) -> None:
    """Stop before any data is loaded when a dataset's type resolves nowhere; the message lists the types that do."""
    table = preference_types()
    for key in ("datasets", "test_datasets"):
        for i, ds in enumerate(cfg.get(key) or []):
            raw = ds.get("type")
            if raw is None:  # Axolotl's "already prompt/chosen/rejected": no transform
                continue
            name = type_name(raw)
            if name in table:
                continue
            module = name.rsplit(".", 1)[0]
            builtin = module in {n.rsplit(".", 1)[0] for n in table}
            if builtin or not _importable(name):
                raise ValueError(
                    f"{key}[{i}].type {raw!r}: not a preference dataset type orpo_plugin can train with rl: orpo "
                    f"(Axolotl {_axolotl_version()}). Types that work: {types_that_work()}"
                )


def check_default_system(cfg) -> None:
    """`default_system_message` is honoured for the types that read a `system` field (rows without one get it, see
    `RowTransform`); for any other type it stops here, before any data is loaded, instead of being ignored."""
    default = cfg.get("default_system_message")
    if not default:
        return
    for key in ("datasets", "test_datasets"):
        for i, ds in enumerate(cfg.get(key) or []):
            name = type_name(ds.get("type"))
            if name not in SYSTEM_FIELD_TYPES:
                raise ValueError(
                    f"default_system_message is set, but {key}[{i}] ({ds.get('path')}, type: {name}) has no system "
                    f"field orpo_plugin can fill, and Axolotl {_axolotl_version()} ignores the key under rl: orpo. "
                    f"Types that honour it: {', '.join(sorted(SYSTEM_FIELD_TYPES))}; otherwise give each row its "
                    "system message, or remove default_system_message"
                )


def dataset_entries(written: list | None, cfg) -> list:
    """`cfg.datasets` as the loader should see them: a DPO-type entry read the way `rl: dpo` reads it.

    Axolotl 0.19's `validate_config` reads every `datasets:` entry of an `rl: dpo` config as its DPO dataset model
    (field_messages, field_chosen, field_rejected, a user_defined mapping under `type:`) and of any other config,
    `rl: orpo` included, as its SFT dataset model (no field_chosen/field_rejected, the user_defined mapping read as
    an SFT prompter's). So the entries as written (kept by the plugin's `register`) are read again here, for DPO
    types, with the DPO model. `test_datasets` are read alike under both and need nothing.
    """
    from axolotl.utils.dict import DictDefault
    from axolotl.utils.schemas.datasets import DPODataset

    validated = list(cfg.get("datasets") or [])
    if not written:
        return validated
    orpo = {name for name, (kind, _) in preference_types().items() if kind == "orpo"}
    entries = []
    for raw, kept in zip(written, validated):
        # no `type:`: rows already prompt/chosen/rejected, read by either model; any other non-ORPO type as rl: dpo
        if hasattr(raw, "keys") and raw.get("type") is not None and type_name(raw["type"]) not in orpo:
            kept = DictDefault(DPODataset(**raw).model_dump(exclude_none=True))
        entries.append(kept)
    return entries + validated[len(entries) :]


def check_dropped_keys(written: list | None, entries: list, cfg) -> None:
    """Say which keys of a dataset entry as written the loader will not see (Axolotl's dataset schema lacks them).

    `rl: dpo` drops them too (ds_type, message_property_mappings, roles ... are not DPO dataset keys), so they are
    logged; a dropped per-dataset chat template that differs from the config's would silently change the rendering,
    so that one stops here.
    """
    for i, (raw, kept) in enumerate(zip(written or [], entries)):
        if not hasattr(raw, "keys"):
            continue
        dropped = sorted(k for k, v in raw.items() if v is not None and kept.get(k) is None)
        written_type, kept_type = raw.get("type"), kept.get("type")
        if hasattr(written_type, "keys") and hasattr(kept_type, "get"):  # user_defined's mapping
            dropped += [f"type.{k}" for k, v in written_type.items() if v is not None and kept_type.get(k) is None]
        for key in ("chat_template", "chat_template_jinja"):
            config_value = getattr(cfg.get(key), "value", cfg.get(key))  # an enum after validation
            if key in dropped and getattr(raw[key], "value", raw[key]) != config_value:
                raise ValueError(
                    f"datasets[{i}] ({raw.get('path')}): `{key}` is set for this dataset, but Axolotl "
                    f"{_axolotl_version()} reads no per-dataset chat template for a {type_name(written_type)} "
                    f"dataset (rl: dpo ignores it too) and would render it with the config's {key} "
                    f"({config_value!r}); set the config's {key} instead"
                )
        suffix = str(raw.get("path") or "").rsplit(".", 1)[-1].lower()
        if raw.get("ds_type") == {"jsonl": "json"}.get(suffix, suffix):  # the loader infers it from the file name
            dropped = [k for k in dropped if k != "ds_type"]
        if dropped:
            LOG.warning(
                "datasets[%d] (%s): Axolotl's %s dataset schema has no %s; these keys are ignored, as under rl: dpo",
                i,
                raw.get("path"),
                type_name(written_type),
                ", ".join(dropped),
            )


def _importable(name: str) -> bool:
    """Whether Axolotl's dotted-path lookup could find `name` (some leading part must import; its loader decides)."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        try:
            importlib.import_module(".".join(parts[:depth]))
            return True
        except ImportError:
            continue
    return False


def _axolotl_version() -> str:
    try:
        import axolotl

        return axolotl.__version__
    except Exception:  # noqa: BLE001 - only for the message
        return "?"


# ------------------------------------------------------------------------------------------------ resolution
def _where(cfg, dataset_idx: int, name: str) -> str:
    """`datasets[i] (path, type: ...)` for messages; the test split when only its entry has this type."""
    for key in ("datasets", "test_datasets"):
        entries = cfg.get(key) or []
        if dataset_idx < len(entries) and type_name(entries[dataset_idx].get("type")) == name:
            ds = entries[dataset_idx]
            return f"{key}[{dataset_idx}] ({ds.get('path')}, type: {name})"
    return f"dataset {dataset_idx} (type: {name})"


def resolve(type_, cfg, dataset_idx: int = 0, **kwargs):
    """Stands in for Axolotl's ORPO type loader during the plugin's `load_datasets`: returns (transform, map kwargs).

    Looks `type_` up among Axolotl's ORPO strategies, then its DPO strategies, then as a dotted path; calls the
    factory as Axolotl would (its errors, e.g. a user_defined type that is not a mapping, propagate as they are) and
    wraps the transform it returns in `RowTransform`.
    """
    name = type_name(type_)
    where = _where(cfg, dataset_idx, name)
    entry = preference_types().get(name)
    if entry is not None:
        kind, factory = entry
        made = factory(cfg, dataset_idx=dataset_idx, **kwargs)
    else:
        kind, made = "custom", _custom(name, cfg, dataset_idx, **kwargs)
        if made is None:
            raise ValueError(
                f"{where}: not a preference dataset type orpo_plugin can train with rl: orpo. Types that work: "
                f"{types_that_work()}"
            )
    transform, map_kwargs = made if isinstance(made, tuple) else (made, {})
    optional = {"system"}
    entries = cfg.get("datasets") or []
    ds_type = entries[dataset_idx].get("type") if dataset_idx < len(entries) else None
    if name == "user_defined.default" and hasattr(ds_type, "get"):
        optional.add(ds_type.get("field_system") or "system")  # its transform reads it with `or ""`
    check = None
    if (kind, name) == ("orpo", "chat_template.argilla"):
        check = check_argilla_row
    elif kind == "dpo" and name in ONE_EXCHANGE:
        check = functools.partial(check_one_exchange, type_=name)
    default_system = cfg.get("default_system_message") if name in SYSTEM_FIELD_TYPES else None
    wrapped = RowTransform(transform, name, where, frozenset(optional), check, default_system or None)
    LOG.info("%s: Axolotl's %s strategy %s", where, kind.upper() if kind != "custom" else "custom", name)
    return wrapped, {**map_kwargs, "with_indices": True}


def load_preference_datasets(cfg, written: list | None = None):
    """Axolotl's `load_preference_datasets` with `resolve` as its `rl: orpo` type loader (the plugin's hook).

    `written`: the `datasets:` entries as written in the YAML (see `dataset_entries`).
    """
    import axolotl.utils.data.rl as rl_data
    from axolotl.common.datasets import load_preference_datasets as axolotl_load
    from axolotl.utils.dict import DictDefault

    entries = dataset_entries(written, cfg)
    check_dropped_keys(written, entries, cfg)
    cfg = DictDefault({**cfg, "datasets": entries})
    check_types(cfg)
    check_default_system(cfg)
    # Axolotl 0.19's rl data module calls the ORPO loader it imported as `load_orpo`; this is the one place that
    # depends on that name
    if not callable(getattr(rl_data, "load_orpo", None)):
        raise RuntimeError(
            f"Axolotl {_axolotl_version()}: axolotl.utils.data.rl has no `load_orpo`; orpo_plugin's dataset types "
            "support was written for Axolotl 0.19"
        )
    original = rl_data.load_orpo
    rl_data.load_orpo = resolve
    try:
        return axolotl_load(cfg=cfg)
    finally:
        rl_data.load_orpo = original


# ------------------------------------------------------------------------------------------------ rows
class _ReadFields(dict):
    """A row that remembers which fields a transform read (`row[k]`, `row.get(k)`) and the last one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: dict[str, None] = {}
        self.got: set[str] = set()
        self.last: str | None = None

    def __getitem__(self, key):
        self.last = key
        self.read.setdefault(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.last = key
        self.got.add(key)
        return super().get(key, default)


class RowTransform:
    """An Axolotl row transform that stops on a bad row with the dataset, the row index and the field."""

    def __init__(self, transform, name: str, where: str, optional: frozenset[str], check=None, default_system=None):
        self.transform = transform
        self.name, self.where, self.optional, self.check = name, where, optional, check
        self.default_system = default_system  # `default_system_message`, for rows without a `system`
        self._template_checked = False
        self.takes_tokenizer = "tokenizer" in inspect.signature(transform).parameters

    def error(self, index: int, field: str | None, problem: str) -> ValueError:
        place = f"field '{field}'" if field is not None else "the row"
        return ValueError(f"{self.where}: row {index}: {place} {problem}")

    def _check_system_turn(self, tokenizer) -> None:
        """The chat template must render a system message, or `default_system_message` would vanish."""
        self._template_checked = True
        messages = [{"role": "system", "content": self.default_system}, {"role": "user", "content": "Hi"}]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as err:  # noqa: BLE001 - a template without a system role
            text = f"({type(err).__name__}: {err})"
        if self.default_system not in text:
            raise ValueError(
                f"{self.where}: default_system_message is set but the chat template renders no system turn "
                f"(it gave {text[:120]!r}); use a chat template with a system role, or remove default_system_message"
            )

    def __call__(self, sample, index, tokenizer=None):
        if self.check is not None:
            sample = self.check(sample, index, self.error) or sample
        if self.default_system is not None and not sample.get("system"):
            if tokenizer is not None and not self._template_checked:
                self._check_system_turn(tokenizer)
            sample = {**sample, "system": self.default_system}
        row = _ReadFields(sample)
        try:
            out = self.transform(row, tokenizer=tokenizer) if self.takes_tokenizer else self.transform(row)
        except Exception as err:  # noqa: BLE001 - any failure inside Axolotl's transform is this row's
            if isinstance(err, KeyError) and err.args and err.args[0] == row.last and row.last not in sample:
                raise self.error(index, row.last, f"is missing (the row has {sorted(sample)})") from None
            raise self.error(
                index, row.last, f"could not be read by Axolotl's {self.name} transform: {type(err).__name__}: {err}"
            ) from err
        for field in row.read:
            if field in sample and sample[field] is None and field not in self.optional and field not in row.got:
                raise self.error(index, field, f"is null (the {self.name} transform needs it)")
        if not hasattr(out, "keys"):
            raise self.error(index, None, f"gave {type(out).__name__} from the {self.name} transform, not a row")
        for field in OUTPUT_FIELDS:
            value = out.get(field)
            if isinstance(value, list) and value:
                continue
            if not isinstance(value, str) or (field != "prompt" and not value.strip()):
                shown = "missing" if value is None else f"{type(value).__name__} {value!r:.60}"
                raise self.error(
                    index, field, f"after the {self.name} transform is {shown}; a pair needs text (or messages) here"
                )
        return dict(out)


def check_argilla_row(sample, index: int, error) -> dict | None:
    """What Axolotl's `chat_template.argilla` transform assumes of a row, checked before it runs.

    `chosen`: the conversation ending with the chosen answer, user and assistant turns alternating from a user turn
    (Axolotl reads the turns by position and asserts on an odd count); `rejected`: the same conversation ending with
    the rejected answer, or that answer alone (Axolotl uses its last turn with chosen's earlier turns);
    `system`, `prompt`: a string when present; a `prompt` must say what the conversation's user turns say (then the
    row is returned without it, so the turns are read as they are).
    """
    chosen = _messages(sample.get("chosen"), index, "chosen", error)
    roles = [m["role"] for m in chosen]
    want = ["user", "assistant"] * (len(chosen) // 2)
    if len(chosen) < 2 or len(chosen) % 2 or roles != want:
        raise error(
            index,
            "chosen",
            f"has the turns {roles}; chat_template.argilla needs user and assistant turns in turn, ending with the "
            "chosen answer (e.g. [user, assistant])",
        )
    rejected = _messages(sample.get("rejected"), index, "rejected", error)
    if rejected[-1]["role"] != "assistant":
        raise error(index, "rejected", f"ends with a {rejected[-1]['role']!r} turn; it must end with the rejected one")
    earlier = rejected[:-1]
    if earlier and [(m["role"], m["content"]) for m in earlier] != [(m["role"], m["content"]) for m in chosen[:-1]]:
        raise error(
            index,
            "rejected",
            "has turns before its answer that differ from chosen's; the pair shares one conversation (give the same "
            "turns, or the rejected answer alone)",
        )
    for field in ("system", "prompt"):
        if field in sample and sample[field] is not None and not isinstance(sample[field], str):
            raise error(index, field, f"must be a string, got {type(sample[field]).__name__}")
    if "prompt" in sample and sample["prompt"] is None:
        raise error(
            index,
            "prompt",
            "is null in this row while the dataset has a prompt column (Axolotl's argilla transform would use it as "
            "the user's turn); give every row a prompt or none",
        )
    if isinstance(sample.get("prompt"), str):
        # Axolotl's transform writes the `prompt` text in place of EVERY user turn of the conversation: a prompt
        # that says what the conversation's user turns say is dropped (the turns are used as they are); any other is
        # refused, as orpo_plugin refuses a prompt string beside message lists that disagrees with them
        users = [m["content"] for m in chosen if m["role"] == "user"]
        said = sample["prompt"].strip()
        if all(u.strip() == said for u in users):
            return None
        if said in {users[-1].strip(), "\n".join(users).strip(), " ".join(users).strip()}:
            return {k: v for k, v in sample.items() if k != "prompt"}
        raise error(
            index,
            "prompt",
            f"is {sample['prompt'][:60]!r} but the conversation's user turns say {[u[:40] for u in users]}; Axolotl's "
            "chat_template.argilla transform would put the prompt text in place of every user turn. Give the prompt "
            "as the last user turn (or all of them), or drop the prompt column",
        )
    return None


def check_one_exchange(sample, index: int, error, type_: str) -> None:
    """A type that reads only `chosen[1]` and `rejected[1]` (messages 0 and 1: one user turn and its answer) refuses a
    longer conversation instead of comparing its first answers (the later turns would be lost; two conversations
    that share their first exchange would give chosen identical to rejected)."""
    for field in ("chosen", "rejected"):
        value = sample.get(field)
        if isinstance(value, list) and len(value) > 2:
            roles = [m.get("role") if hasattr(m, "get") else type(m).__name__ for m in value]
            raise error(
                index,
                field,
                f"is a conversation of {len(value)} messages ({roles}); Axolotl's {type_} reads only its first "
                f"exchange (messages 0 and 1), so the later turns would be lost. Use a type that takes multi-turn "
                f"rows: {MULTI_TURN_TYPES}",
            )


def _messages(value, index: int, field: str, error) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise error(index, field, f"must be a non-empty list of messages, got {type(value).__name__}")
    for k, message in enumerate(value):
        if not hasattr(message, "get"):
            got = type(message).__name__
            raise error(index, f"{field}[{k}]", f"must be a message with role and content, got {got}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                got = message.get(key)
                raise error(
                    index,
                    f"{field}[{k}].{key}",
                    "is missing" if got is None else f"must be a string, got {type(got).__name__}",
                )
    return value
