"""Training callbacks: every log line to `metrics.jsonl`, and the log-prob curves to a PNG."""

from __future__ import annotations

import json
import os

from transformers import TrainerCallback


class MetricsFileCallback(TrainerCallback):
    """Append each logged dict (with its step) to `<output_dir>/metrics.jsonl` on the main process."""

    def __init__(self, filename: str = "metrics.jsonl"):
        self.filename = filename

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, self.filename), "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def plot_logps(history: list[dict], path: str, title: str = "ORPO: mean log-prob per step") -> str | None:
    """Chosen/rejected mean log-prob (and their margin) per step from a list of logged dicts; returns the path."""
    rows = [h for h in history if "logps/chosen" in h and "logps/rejected" in h]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in rows]
    chosen = [h["logps/chosen"] for h in rows]
    rejected = [h["logps/rejected"] for h in rows]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[2, 1])
    ax.plot(steps, chosen, label="chosen", color="tab:green")
    ax.plot(steps, rejected, label="rejected", color="tab:red")
    ax.set_ylabel("mean log-prob per response token")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    ax2.plot(steps, [c - r for c, r in zip(chosen, rejected)], color="tab:blue")
    ax2.axhline(0, color="grey", lw=0.8)
    ax2.set_ylabel("margin (chosen - rejected)")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class LogpsPlotCallback(TrainerCallback):
    """Write `<output_dir>/logps.png` (chosen/rejected log-probs and margin per step) at each save and at the end."""

    def __init__(self, filename: str = "logps.png"):
        self.filename = filename

    def _write(self, args, state):
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            history = [{"step": h.get("step", 0), **h} for h in state.log_history]
            plot_logps(history, os.path.join(args.output_dir, self.filename))

    def on_save(self, args, state, control, **kwargs):
        self._write(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._write(args, state)
