"""What Axolotl's own loaders make of a config's preference datasets, and what the plugin's loader says of bad ones.

    python integration/axolotl/preference_data.py SPEC.json      (in the Axolotl venv; one process for all)

SPEC.json: {"types": true, "reference": [CFG.yml, ...], "errors": [CFG.yml, ...], "sys_path": [DIR, ...]} (sys_path:
folders holding custom transform modules). Prints one JSON line per item, with its "mode".

`types`: the dataset types orpo_plugin's plugin trains with `rl: orpo` ({"types": {name: "orpo" | "dpo"}}),
discovered in the installed Axolotl.

`reference`: for an `rl: orpo` config with orpo_plugin's plugin, the rows `rl: dpo` gives the trainer for the same
YAML, without the plugin: each dataset entry is loaded alone by Axolotl's `load_preference_datasets` under the `rl:`
its type belongs to (`rl: dpo`; `rl: orpo` without the plugin for `chat_template.argilla`, the only ORPO type), and
the results are concatenated in the order of the entries (the configs set `shuffle_merged_datasets: false`). The
prompt/chosen/rejected texts are then tokenized by orpo_plugin's `prepare_dataset` with the tokenizer Axolotl loads
for the config. Prints one JSON line per config: {"path", "texts", "ids", "per_dataset", "stats"}.

`errors`: loads each config as `axolotl train` does (Axolotl's `load_cfg`, plugins registered) and calls the plugin
manager's `load_datasets` hook, as `axolotl train` does first; prints {"path", "ok", "error", "error_type", "rows"}.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import yaml

ORPO_TYPES = {"chat_template.argilla"}
OURS = "orpo_plugin.axolotl.ORPOPlugin"


def _type_name(value) -> str:
    if not isinstance(value, str):
        return "user_defined.default"
    return value if "." in value else f"{value}.default"


def _load_cfg(raw: dict, folder: Path, name: str):
    from axolotl.cli.config import load_cfg

    path = folder / f"{name}.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_cfg(str(path))


def reference(path: str) -> dict:
    from axolotl.common.datasets import load_preference_datasets
    from axolotl.loaders import load_tokenizer
    from datasets import Dataset

    from orpo_plugin.data import prepare_dataset

    written = yaml.safe_load(Path(path).read_text())
    texts, per_dataset, tokenizer, seq_len = [], [], None, None
    with tempfile.TemporaryDirectory() as tmp:
        for i, entry in enumerate(written["datasets"]):
            rl = "orpo" if _type_name(entry.get("type")) in ORPO_TYPES else "dpo"
            raw = {k: v for k, v in written.items() if not (k.startswith("orpo_") or k in ("plugins", "rl"))}
            raw.update(rl=rl, datasets=[entry], dataset_prepared_path=str(Path(tmp) / f"prepared-{i}"))
            cfg = _load_cfg(raw, Path(tmp), f"dataset-{i}")
            rows = load_preference_datasets(cfg=cfg).train_dataset
            per_dataset.append(len(rows))
            texts += [[row["prompt"], row["chosen"], row["rejected"]] for row in rows]
            if tokenizer is None:
                tokenizer, seq_len = load_tokenizer(cfg), cfg.sequence_len
    data = Dataset.from_list([dict(zip(("prompt", "chosen", "rejected"), t)) for t in texts])
    tokenized, stats = prepare_dataset(data, tokenizer, max_length=seq_len)
    ids = [[row[c] for c in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")] for row in tokenized]
    return {
        "path": path,
        "texts": texts,
        "ids": ids,
        "per_dataset": per_dataset,
        "stats": {
            "kept": stats.kept,
            "rows": stats.rows,
            "dropped": dict(stats.dropped),
            "truncated": stats.truncated_responses + stats.truncated_prompts,
        },
    }


def errors(path: str) -> dict:
    from axolotl.cli.config import load_cfg
    from axolotl.integrations.base import PluginManager

    try:
        cfg = load_cfg(path)
        meta = PluginManager.get_instance().load_datasets(cfg, preprocess=False)
    except Exception as err:  # the message is what the test checks
        return {"path": path, "ok": False, "error": str(err), "error_type": type(err).__name__}
    rows = None if meta is None else len(meta.train_dataset)
    return {"path": path, "ok": True, "rows": rows}


def types() -> dict:
    from orpo_plugin.axolotl.dataset_types import preference_types

    return {"types": {name: kind for name, (kind, _) in preference_types().items()}}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    sys.path[:0] = spec.get("sys_path", [])
    if spec.get("types"):
        print(json.dumps({"mode": "types", **types()}), flush=True)
    for mode, run in (("reference", reference), ("errors", errors)):
        for path in spec.get(mode, []):
            print(json.dumps({"mode": mode, **run(path)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
