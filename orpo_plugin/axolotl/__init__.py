"""Axolotl integration: `plugins: [orpo_plugin.axolotl.ORPOPlugin]` with `rl: orpo`.

`ORPOPlugin` needs Axolotl and is imported on first use; `orpo_plugin.axolotl.args` (the YAML keys) needs only
pydantic.
"""

__all__ = ["ORPOPlugin", "ORPOPluginArgs"]


def __getattr__(name):
    if name == "ORPOPlugin":
        from .plugin import ORPOPlugin

        return ORPOPlugin
    if name == "ORPOPluginArgs":
        from .args import ORPOPluginArgs

        return ORPOPluginArgs
    raise AttributeError(f"module 'orpo_plugin.axolotl' has no attribute {name!r}")
