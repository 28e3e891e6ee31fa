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


def plot_logps(
    runs: list[tuple[str, list[dict], str | None]], path: str, title: str = "ORPO: mean log-prob per step"
) -> str | None:
    """Chosen (solid) and rejected (dashed) mean log-prob per step of each run, their margins below; a PNG at `path`.

    `runs`: (label, logged rows, matplotlib colour or None) per run; the rows with `logps/chosen` and
    `logps/rejected` (and a `step`) are plotted. Returns `path`, or None when no run logged log-probs.
    """
    runs = [
        (name, [h for h in hist if "logps/chosen" in h and "logps/rejected" in h], color) for name, hist, color in runs
    ]
    runs = [run for run in runs if run[1]]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7.5, 5.6), sharex=True, height_ratios=[2, 1])
    for name, hist, color in runs:
        steps = [h["step"] for h in hist]
        chosen = [h["logps/chosen"] for h in hist]
        rejected = [h["logps/rejected"] for h in hist]
        ax.plot(steps, chosen, color=color, label=f"{name}: chosen")
        ax.plot(steps, rejected, color=color, ls="--", label=f"{name}: rejected")
        ax2.plot(steps, [c - r for c, r in zip(chosen, rejected)], color=color, label=name)
    ax.set_title(title)
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean log-prob per response token")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    ax2.axhline(0, color="grey", lw=0.8)
    ax2.set_ylabel("chosen - rejected")
    ax2.set_xlabel("training step")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
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
            plot_logps([("train", history, "tab:blue")], os.path.join(args.output_dir, self.filename))

    def on_save(self, args, state, control, **kwargs):
        self._write(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._write(args, state)
