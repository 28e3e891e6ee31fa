"""The demo app (`orpo-plugin demo`), built on the library and never imported by it.

- `cli`: the `orpo-plugin demo` options;
- `real`: ORPO teaches SmolLM2-135M-Instruct (or the Gemma 3 270M base model, or a local chat checkpoint) to follow
  format instructions on a CPU;
- `toy`: `--model tiny`, a random-init tiny Llama learns a content preference in a minute;
- `instructions`: the real demo's data (questions with a format instruction) and the checker that grades answers;
- `report`: the real demo's report.md, figures and terminal summary.
"""

from __future__ import annotations

from .real import DEFAULT_MODEL

__all__ = ["DEFAULT_MODEL", "main"]


def main(args) -> int:
    """Run the demo described by parsed `orpo-plugin demo` options: the toy demo for `--model tiny`, else the real one."""
    if getattr(args, "model", DEFAULT_MODEL) == "tiny":
        from . import toy

        return toy.main(args)
    from . import real

    return real.main(args)
