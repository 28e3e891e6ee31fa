"""What the real demo writes: `report.md`, the PNG figures, and the terminal summary, from its result dict."""

from __future__ import annotations

import os

from . import instructions

NAMES = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma 3 270M"}


def model_name(result: dict) -> str:
    """The model's name for titles: the pretrained model's, or the checkpoint folder's."""
    name = result["settings"]["model"]
    return NAMES.get(name) or os.path.basename(os.path.normpath(result["model_path"]))


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def headline_rows(result: dict) -> list[tuple[str, str, str]]:
    """(measure, before, after) rows of the before/after table."""
    b, a = result["before"], result["after"]
    rows = [
        ("held-out preference accuracy", f"{b['preference']['accuracy']:.3f}", f"{a['preference']['accuracy']:.3f}"),
        (
            "held-out log-odds margin (chosen - rejected)",
            f"{b['preference']['log_odds_margin']:+.3f}",
            f"{a['preference']['log_odds_margin']:+.3f}",
        ),
        (
            "mean log-prob, chosen / rejected",
            f"{b['preference']['logps_chosen']:.2f} / {b['preference']['logps_rejected']:.2f}",
            f"{a['preference']['logps_chosen']:.2f} / {a['preference']['logps_rejected']:.2f}",
        ),
        (
            "greedy answers that obey the instruction (checker)",
            _pct(b["checker"]["pass_rate"]),
            _pct(a["checker"]["pass_rate"]),
        ),
        (
            "greedy answers that end their turn (" + result.get("turn_end", "end of turn") + ")",
            _pct(b["ended_turn"]),
            _pct(a["ended_turn"]),
        ),
        (
            "greedy answers that contain the right answer",
            _pct(b["checker"]["answer_mentioned"]),
            _pct(a["checker"]["answer_mentioned"]),
        ),
    ]
    if "diversity" in b and "diversity" in a:
        rows += [
            (
                "PID (same-prompt similarity of samples, lower = more diverse)",
                f"{b['diversity']['pid']:.3f}",
                f"{a['diversity']['pid']:.3f}",
            ),
            (
                "AID (cross-prompt similarity of samples)",
                f"{b['diversity']['aid']:.3f}",
                f"{a['diversity']['aid']:.3f}",
            ),
        ]
    return rows


def side_by_side(result: dict, per_kind: int = 1, width: int | None = None) -> list[tuple[str, str, str, str]]:
    """A few held-out prompts (one per instruction kind by default) with the answer before and after training."""
    shown, rows = {}, []
    for i, item in enumerate(result["held_out"]):
        if shown.get(item["kind"], 0) >= per_kind:
            continue
        shown[item["kind"]] = shown.get(item["kind"], 0) + 1
        before, after = result["before"]["answers"][i], result["after"]["answers"][i]

        def mark(text: str, kind: str = item["kind"]) -> str:
            ok = "ok" if instructions.check(kind, text) else "x"
            text = " ".join(text.split())
            if width and len(text) > width:
                text = text[: width - 1] + "…"
            return f"[{ok}] {text}"

        rows.append((item["kind"], item["prompt"], mark(before), mark(after)))
    return rows


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def compare_lines(result: dict) -> list[str]:
    """What the SFT-vs-ORPO comparison measured, in sentences (whatever it shows).

    The training-batch log-probs change batch to batch (each step sees other prompts), so the held-out pairs, the
    same before and after, carry the cleaner before/after comparison.
    """
    lines = _sft_lines(result)
    pr = result.get("prob_ratio")
    if pr:
        before, p, o = result["before"], pr["after"], result["after"]
        lines.append(
            f"Probability ratio in place of the odds ratio (the ORPO paper's ablation, same beta): held-out rejected "
            f"log-prob {before['preference']['logps_rejected']:.2f} -> {p['preference']['logps_rejected']:.2f} "
            f"(ORPO: {o['preference']['logps_rejected']:.2f}), chosen {p['preference']['logps_chosen']:.2f} (ORPO: "
            f"{o['preference']['logps_chosen']:.2f}), checker pass rate {_pct(p['checker']['pass_rate'])} (ORPO: "
            f"{_pct(o['checker']['pass_rate'])}), answers ending their turn {_pct(p['ended_turn'])} (ORPO: "
            f"{_pct(o['ended_turn'])})."
        )
    return lines


def _sft_lines(result: dict) -> list[str]:
    sft = result.get("sft")
    if not sft or not sft["history"] or not result["orpo_history"]:
        return []
    lines = []
    before = result["before"]["preference"]
    for name, hist, after in (("SFT", sft["history"], sft["after"]), ("ORPO", result["orpo_history"], result["after"])):
        first, last = hist[0], hist[-1]
        p = after["preference"]
        dr = p["logps_rejected"] - before["logps_rejected"]
        lines.append(
            f"{name}: held-out mean log-prob of chosen {before['logps_chosen']:.2f} -> {p['logps_chosen']:.2f}, "
            f"of rejected {before['logps_rejected']:.2f} -> {p['logps_rejected']:.2f} (the rejected log-prob "
            f"{'rose' if dr > 0 else 'fell'} by {abs(dr):.2f}); on the training batches, chosen "
            f"{first['logps/chosen']:.2f} -> {last['logps/chosen']:.2f} and rejected {first['logps/rejected']:.2f} -> "
            f"{last['logps/rejected']:.2f} from step {first['step']} to step {last['step']}."
        )
    s_after, o_after = sft["after"], result["after"]
    lines.append(
        f"Held-out after SFT: preference accuracy {s_after['preference']['accuracy']:.3f}, log-odds margin "
        f"{s_after['preference']['log_odds_margin']:+.3f}, checker pass rate {_pct(s_after['checker']['pass_rate'])}; "
        f"after ORPO: {o_after['preference']['accuracy']:.3f}, {o_after['preference']['log_odds_margin']:+.3f}, "
        f"{_pct(o_after['checker']['pass_rate'])}."
    )
    s_rej, o_rej = s_after["preference"]["logps_rejected"], o_after["preference"]["logps_rejected"]
    raised = s_rej > before["logps_rejected"]
    lines.append(
        "The seed's claim, measured: SFT "
        + ("raised" if raised else "did not raise")
        + f" the held-out rejected log-prob ({before['logps_rejected']:.2f} -> {s_rej:.2f}); ORPO "
        + (
            "separated chosen from rejected more than SFT"
            if o_after["preference"]["log_odds_margin"] > s_after["preference"]["log_odds_margin"]
            else "did not separate them more than SFT"
        )
        + f" (rejected {o_rej:.2f} after ORPO)."
    )
    return lines


def runs_rows(result: dict) -> list[tuple[str, ...]]:
    """One row per trained run on the held-out prompts (before, ORPO, and SFT / probability ratio when they ran):
    (run, accuracy, log-odds margin, chosen log-prob, rejected log-prob, checker pass rate, turns ended)."""
    runs = [("before training", result["before"]), ("ORPO (odds ratio)", result["after"])]
    if result.get("sft"):
        runs.append(("SFT on chosen", result["sft"]["after"]))
    if result.get("prob_ratio"):
        runs.append(("probability ratio", result["prob_ratio"]["after"]))
    return [
        (
            name,
            f"{m['preference']['accuracy']:.3f}",
            f"{m['preference']['log_odds_margin']:+.2f}",
            f"{m['preference']['logps_chosen']:.2f}",
            f"{m['preference']['logps_rejected']:.2f}",
            _pct(m["checker"]["pass_rate"]),
            _pct(m["ended_turn"]),
        )
        for name, m in runs
    ]


RUNS_HEADER = (
    "run",
    "accuracy",
    "log-odds margin",
    "log-prob chosen",
    "log-prob rejected",
    "obeys (checker)",
    "ends its turn",
)


# ----------------------------------------------------------------------------------------------- figures
def plot_pass_rates(result: dict, path: str) -> str:
    """Per-instruction-kind share of greedy answers that obey the instruction, before and after (and after SFT)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in instructions.KINDS if k in result["before"]["checker"]["pass_rate_by_kind"]]
    series = [("before", result["before"], "tab:grey"), ("after ORPO", result["after"], "tab:blue")]
    if result.get("sft"):
        series.insert(1, ("after SFT", result["sft"]["after"], "tab:orange"))
    if result.get("prob_ratio"):
        series.append(("after prob. ratio", result["prob_ratio"]["after"], "tab:green"))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for j, (name, measured, color) in enumerate(series):
        by_kind = measured["checker"]["pass_rate_by_kind"]
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(kinds))]
        ax.bar(
            xs,
            [100 * by_kind.get(k, 0) for k in kinds],
            width,
            label=f"{name} ({_pct(measured['checker']['pass_rate'])})",
            color=color,
        )
    ax.set_xticks(range(len(kinds)))
    ax.set_xticklabels(kinds, rotation=20, ha="right")
    ax.set_ylabel("% greedy answers obeying")
    ax.set_ylim(0, 125)
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(
        f"{model_name(result)}, held-out prompts: greedy answers that follow the format instruction", fontsize=10
    )
    ax.legend(loc="upper center", ncol=len(series), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_training(result: dict, path: str) -> str | None:
    """The real demo's runs: ORPO, and SFT on chosen when it ran (None when nothing was logged)."""
    runs = []
    if result.get("sft") and result["sft"]["history"]:
        runs.append(("SFT on chosen", result["sft"]["history"], "tab:orange"))
    if result["orpo_history"]:
        runs.append(("ORPO", result["orpo_history"], "tab:blue"))
    if result.get("prob_ratio") and result["prob_ratio"]["history"]:
        runs.append(("probability ratio", result["prob_ratio"]["history"], "tab:green"))
    if not runs:
        return None
    from ..callbacks import plot_logps

    title = f"{model_name(result)}: mean log-prob per answer token of each training batch"
    return plot_logps(runs, path, title)


# ----------------------------------------------------------------------------------------------- report
def markdown(result: dict, figures: dict[str, str]) -> str:
    s = result["settings"]
    t = result["timings"]
    lines = [
        "# orpo-plugin demo report",
        "",
        f"Model: {model_name(result)} (`{result['model_path']}`). Data: {result['train_prompts']} training prompts, "
        f"{result['held_out_prompts']} held-out prompts whose questions never appear in training "
        f"(`orpo_plugin/demo/instructions.py`, seed {s['seed']}): each prompt is a question plus a format instruction; "
        "chosen = the right answer in the requested form, rejected = the same answer as a plain sentence.",
        "",
        f"Training: ORPO, {s['steps']} steps of about {s['pairs_per_step']} pairs, learning rate {result['learning_rate']}, "
        f"beta {s['beta']}, {'LoRA' if s['lora'] or s['load_in_4bit'] else 'full fine-tuning'}"
        f"{', 4-bit' if s['load_in_4bit'] else ''}, packing {'on' if s['packing'] else 'off'}, prefix sharing "
        f"{'on' if s['prefix_sharing'] else 'off'}, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}"
        f", NLL on the answer tokens only.",
        "",
        "## Before and after",
        "",
        "| measure | before | after |",
        "|---|---|---|",
    ]
    lines += [f"| {m} | {b} | {a} |" for m, b, a in headline_rows(result)]
    sft = result.get("sft")
    lines += [
        "",
        "Per instruction kind: held-out preference accuracy, and the share of greedy answers that obey the "
        "instruction" + (" (last column: after SFT on chosen instead)" if sft else "") + ":",
        "",
        "| instruction | accuracy before | accuracy after | obeys before | obeys after |"
        + (" obeys after SFT |" if sft else ""),
        "|---|---|---|---|---|" + ("---|" if sft else ""),
    ]
    for kind in instructions.KINDS:
        if kind not in result["before"]["checker"]["pass_rate_by_kind"]:
            continue
        acc_b = result["before"]["preference"]["accuracy_by_kind"][kind]
        acc_a = result["after"]["preference"]["accuracy_by_kind"][kind]
        b = result["before"]["checker"]["pass_rate_by_kind"][kind]
        a = result["after"]["checker"]["pass_rate_by_kind"][kind]
        row = f"| {kind} | {acc_b:.2f} | {acc_a:.2f} | {_pct(b)} | {_pct(a)} |"
        if sft:
            row += f" {_pct(sft['after']['checker']['pass_rate_by_kind'][kind])} |"
        lines.append(row)
    if "pass_rates" in figures:
        lines += ["", f"![pass rates]({os.path.basename(figures['pass_rates'])})"]
    lines += [
        "",
        "## Answers side by side (held-out prompts, greedy; [ok] = obeys the instruction)",
        "",
        "| instruction | prompt | before | after |",
        "|---|---|---|---|",
    ]
    for kind, prompt, before, after in side_by_side(result, per_kind=2, width=110):
        lines.append(f"| {kind} | {_md_cell(prompt)} | {_md_cell(before)} | {_md_cell(after)} |")
    if "diversity" in result["before"]:
        d = result["before"]["diversity"]
        lines += [
            "",
            f"PID/AID: {d['num_samples']} samples (temperature 1) for each of {d['num_prompts']} held-out "
            "prompts, embedded by the packaged all-MiniLM-L6-v2; cosine similarity, lower is more diverse.",
        ]
    lines += ["", "## Training curves", ""]
    comp = compare_lines(result)
    if comp:
        lines += [
            ("SFT on the chosen answers only vs ORPO" if result.get("sft") else "The probability ratio vs ORPO")
            + ", same data, same steps, same start. The seed's claims: SFT raises the rejected log-prob along "
            "with the chosen one, while ORPO separates them; the probability ratio (the ORPO paper's ablation) "
            "pushes the rejected answers down too hard. Measured here:",
            "",
        ]
        lines += [f"- {c}" for c in comp]
        lines.append("")
    if len(runs_rows(result)) > 2:
        lines += [
            "Every run on the held-out prompts (same data, steps, learning rate and beta; SFT: beta 0; "
            "probability ratio: -log sigmoid(log P(chosen) - log P(rejected)) in place of the odds ratio, the "
            "ORPO paper's ablation):",
            "",
            "| " + " | ".join(RUNS_HEADER) + " |",
            "|" + "---|" * len(RUNS_HEADER),
        ]
        lines += ["| " + " | ".join(r) + " |" for r in runs_rows(result)]
        lines.append("")
    if "training" in figures:
        lines.append(f"![training curves]({os.path.basename(figures['training'])})")
    lines += ["", "## Time", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {v:.0f} |" for k, v in t.items()]
    lines += [
        "",
        f"Process CPU time {result['cpu_seconds']:.0f} s on {result['torch_threads']} torch thread(s), peak "
        f"memory (RSS) {result.get('peak_rss_gib', float('nan')):.1f} GiB; other processes kept "
        f"{result['busy_cores_at_start']:.1f} cores busy at the start (sharing the cores makes the wall times "
        "longer).",
        "",
        f"Settings: `{_settings_line(s)}`.",
    ]
    return "\n".join(lines) + "\n"


def _settings_line(s: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("quiet",))


def write(result: dict, output_dir: str) -> dict[str, str]:
    """Write the figures and report.md into `output_dir`; return their paths by name.

    `logps.png` (ORPO's training curves) is written by the trainer's LogpsPlotCallback; with --compare-sft,
    `compare_sft.png` holds both runs.
    """
    figures = {"pass_rates": plot_pass_rates(result, os.path.join(output_dir, "pass_rates.png"))}
    if result.get("sft") or result.get("prob_ratio"):
        name = "compare_sft.png" if result.get("sft") else "compare_prob_ratio.png"
        figures["training"] = plot_training(result, os.path.join(output_dir, name))
    elif os.path.exists(os.path.join(output_dir, "logps.png")):
        figures["training"] = os.path.join(output_dir, "logps.png")
    figures = {k: v for k, v in figures.items() if v}
    report = os.path.join(output_dir, "report.md")
    with open(report, "w", encoding="utf-8") as f:
        f.write(markdown(result, figures))
    return {**figures, "report": report}


def terminal(result: dict) -> str:
    """The summary printed at the end of the demo."""
    rows = headline_rows(result)
    w = max(len(r[0]) for r in rows)
    out = ["", f"{'':{w}}  {'before':>12}  {'after':>12}"]
    out += [f"{m:{w}}  {b:>12}  {a:>12}" for m, b, a in rows]
    out += ["", "Held-out answers, before -> after ([ok] obeys the instruction):"]
    for _kind, prompt, before, after in side_by_side(result, per_kind=1, width=70):
        out += [f"  {prompt}", f"    before: {before}", f"    after:  {after}"]
    comp = compare_lines(result)
    if comp:
        title = "SFT on chosen vs ORPO (training batches):" if result.get("sft") else "Probability ratio vs ORPO:"
        out += ["", title] + [f"  {c}" for c in comp]
    if len(runs_rows(result)) > 2:
        widths = [max(len(r[i]) for r in [RUNS_HEADER, *runs_rows(result)]) for i in range(len(RUNS_HEADER))]
        out += ["", "Held-out, every run:"]
        out += [
            "  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in [RUNS_HEADER, *runs_rows(result)]
        ]
    t = result["timings"]
    out += [
        "",
        f"total {t['total']:.0f} s (training {t['train_orpo']:.0f} s"
        + (f", SFT training {t['train_sft']:.0f} s" if "train_sft" in t else "")
        + (f", probability-ratio training {t['train_prob_ratio']:.0f} s" if "train_prob_ratio" in t else "")
        + ")",
    ]
    out.append(
        "wrote "
        + ", ".join(os.path.basename(p) for p in result["files"].values())
        + f", metrics.jsonl and demo_result.json to {result['settings']['output_dir']}"
    )
    return "\n".join(out)
