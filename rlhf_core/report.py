"""What a pipeline run leaves behind: the results table, the claims checked, ``metrics.json``,
``curves.json``, ``report.md`` and the figures.

``rlhf_core.pipeline`` builds and measures the stages; this module only reads what they measured:
``results`` maps a stage name to its stored result, ``{"metrics": {...}, "curves": {...},
"examples": [...], ...}`` (the JSON a stage file holds), and ``metrics`` is the dict of
``metrics.json`` (``collect_metrics``): the run's settings, one dict per stage, the claims checked,
the seconds each stage took and whether it was cached.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .cache import write_json_atomically
from .errors import CourseError

STAGE_TITLES = {"base": "base model", "demonstrations": "demonstrations", "sft": "SFT",
                "preferences": "preference pairs", "reward_model": "reward model", "ppo": "PPO",
                "dpo": "DPO", "best_of_n": "best-of-n"}
POLICY_ROWS = ("base", "demonstrations", "sft", "ppo", "dpo", "best_of_n")  # the stages that answer prompts
FIGURES = ("gold_per_stage.png", "ppo_training.png", "gold_vs_kl.png", "reward_model.png", "dpo_training.png")


# ----------------------------------------------------------------------------------------------
# JSON


def write_json(path: Path, data) -> None:
    """``data`` as strict JSON (see ``plain_json``), atomically: a half-written file never replaces a good one."""
    write_json_atomically(path, plain_json(data))


def plain_json(value):
    """JSON-ready: numpy numbers become Python numbers, NaN and infinities become None."""
    if isinstance(value, dict):
        return {str(key): plain_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(item) for item in value]
    if isinstance(value, np.ndarray):
        return plain_json(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    return value


# ----------------------------------------------------------------------------------------------
# What the run prints as it goes


def stage_line(stage: str, metrics: dict) -> str:
    """One line of what a stage measured, printed as it finishes."""
    if stage == "preferences":
        return f"{metrics['pairs']} pairs, labels agree with gold {metrics['labels_agree_with_gold']:.1%}"
    if stage == "reward_model":
        return (f"held-out accuracy {metrics['accuracy_labels']:.1%} (labels), "
                f"{metrics['accuracy_gold']:.1%} (gold)")
    parts = [f"gold {metrics['gold']:+.3f}"]
    if metrics.get("reward") is not None:
        parts.append(f"reward {metrics['reward']:+.2f}")
    if metrics.get("kl") is not None:
        parts.append(f"KL {metrics['kl']:.2f}")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# metrics.json and the claims


def collect_metrics(settings: dict, results: dict[str, dict], seconds: dict, cached: dict) -> dict:
    """metrics.json: the run's ``settings`` (profile, device, config, eval_prompts, max_new_tokens), one
    dict per stage, the claims checked, and each stage's seconds and cache hit."""
    metrics = dict(settings)
    for stage, result in results.items():
        metrics[stage] = dict(result["metrics"])
    if "reward_model" in metrics:  # the reward model scored the earlier stages' held-out responses
        for stage in ("base", "demonstrations", "sft"):
            metrics[stage]["reward"] = metrics["reward_model"][f"{stage}_reward"]
    metrics["checks"] = claims(metrics)
    metrics["seconds"] = seconds
    metrics["cached"] = cached
    return metrics


def _difference_se(metrics: dict, first: str, second: str) -> float:
    return math.sqrt(metrics[first]["gold_se"] ** 2 + metrics[second]["gold_se"] ** 2)


def claims(metrics: dict) -> dict[str, bool]:
    """What the course claims, checked on this run's numbers (stages that ran only)."""
    checks = {}
    if "sft" in metrics and "demonstrations" in metrics:
        # imitation reaches the demonstrators: within 0.1 gold (about two standard errors)
        checks["sft_matches_demonstrators"] = abs(metrics["sft"]["gold"] - metrics["demonstrations"]["gold"]) <= 0.1
    if "reward_model" in metrics:
        checks["reward_model_beats_chance"] = metrics["reward_model"]["accuracy_labels"] > 0.6
    for stage in ("ppo", "dpo", "best_of_n"):
        if stage in metrics and "sft" in metrics:  # above SFT by more than two standard errors
            checks[f"{stage}_beats_sft"] = (metrics[stage]["gold"] - metrics["sft"]["gold"]
                                            > 2 * _difference_se(metrics, stage, "sft"))
    return checks


# ----------------------------------------------------------------------------------------------
# Outputs: table, figures, report


def _row_title(stage: str, metrics: dict) -> str:
    if stage == "best_of_n":
        return f"best-of-{metrics['best_of_n']['n']}"
    return {"demonstrations": "demonstrators"}.get(stage, STAGE_TITLES[stage])


def _number(value, form: str) -> str:
    return "-" if value is None else format(value, form)


def policy_rows(metrics: dict) -> list[list[str]]:
    """Header and one row per policy stage that ran: gold (+- standard error), reward, KL, EOS, words."""
    rows = [["stage", "gold", "+-", "reward", "KL (nats)", "ends with EOS", "words", "seconds", "cached"]]
    for stage in POLICY_ROWS:
        if stage not in metrics:
            continue
        m = metrics[stage]
        rows.append([_row_title(stage, metrics), _number(m["gold"], "+.3f"), _number(m["gold_se"], ".3f"),
                     _number(m.get("reward"), "+.2f"), _number(m.get("kl"), ".2f"),
                     _number(m.get("eos_fraction"), ".0%"), _number(m.get("mean_words"), ".1f"),
                     _number(metrics["seconds"].get(stage), ".1f"), "yes" if metrics["cached"].get(stage) else "no"])
    return rows


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("---" for _ in rows[0]) + "|")
    return "\n".join(lines)


def _notes(metrics: dict) -> list[str]:
    notes = []
    if "preferences" in metrics:
        p = metrics["preferences"]
        notes.append(f"preference pairs: {p['pairs']}, labels agree with the gold on {p['labels_agree_with_gold']:.1%}")
    if "reward_model" in metrics:
        r = metrics["reward_model"]
        notes.append(f"reward model: held-out accuracy {r['accuracy_labels']:.1%} against the labels "
                     f"(a judge that knows the gold expects {r['labeler_accuracy_cap']:.1%}), "
                     f"{r['accuracy_gold']:.1%} against the gold order; chance is 50%")
    return notes


def _samples_note(metrics: dict) -> str:
    many = [_row_title(stage, metrics) for stage in POLICY_ROWS
            if metrics.get(stage, {}).get("samples_per_prompt", 1) > 1]
    if not many:
        return "one response each"
    count = max(metrics[stage].get("samples_per_prompt", 1) for stage in POLICY_ROWS if stage in metrics)
    return f"{' and '.join(many)}: {count} responses per prompt (best-of-n's candidates), the others one"


def results_table(metrics: dict) -> str:
    """The terminal table: one row per policy, then the preference and reward-model lines."""
    lines = [f"profile {metrics['profile']}: gold on {metrics['eval_prompts']} held-out prompts, "
             f"{_samples_note(metrics)}", text_table(policy_rows(metrics))]
    lines += _notes(metrics)
    failed = [name for name, ok in metrics["checks"].items() if not ok]
    if failed:
        lines.append("claims not met this run: " + ", ".join(failed))
    return "\n".join(lines)


def check_output_folder(out: str | Path) -> Path:
    """``out`` as a folder the outputs can go to (made when missing); a file in its way is a
    ``CourseError``, raised before any stage runs rather than after all of them."""
    out = Path(out)
    for path in (out, *out.parents):  # the first that exists must be a folder
        if path.exists():
            if not path.is_dir():
                raise CourseError(f"--out {out}: {path} is a file, not a folder; name a folder "
                                  f"(it is created when missing) or move the file away")
            break
    return out


def stage_curves(results: dict[str, dict]) -> dict:
    """curves.json: the training curves of the stages that have them."""
    return {stage: result["curves"] for stage, result in results.items() if "curves" in result}


def write_outputs(metrics: dict, results: dict[str, dict], out: Path) -> list[Path]:
    """metrics.json, curves.json, the figures and report.md in ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:  # a figure of a stage that did not run this time must not linger
        (out / name).unlink(missing_ok=True)
    curves = stage_curves(results)
    write_json(out / "metrics.json", metrics)
    write_json(out / "curves.json", curves)
    written = [out / "metrics.json", out / "curves.json"] + make_figures(metrics, curves, out)
    figures = [path.name for path in written if path.suffix == ".png"]
    (out / "report.md").write_text(report(metrics, results, figures))
    return written + [out / "report.md"]


def make_figures(metrics: dict, curves: dict, out: Path) -> list[Path]:
    """PNG figures of the stages that ran (matplotlib's object API: no global backend is touched)."""
    written = []

    def save(figure, name: str) -> None:
        figure.tight_layout()
        figure.savefig(out / name, dpi=110)
        written.append(out / name)

    stages = [stage for stage in POLICY_ROWS if stage in metrics]
    if stages:
        figure = Figure(figsize=(7, 4))
        axis = figure.add_subplot()
        names = [_row_title(stage, metrics) for stage in stages]
        golds = [metrics[stage]["gold"] for stage in stages]
        errors = [metrics[stage]["gold_se"] for stage in stages]
        colors = ["#999999" if stage in ("base", "demonstrations") else "#4c72b0" for stage in stages]
        axis.bar(names, golds, yerr=errors, color=colors, capsize=4)
        if "demonstrations" in metrics:
            axis.axhline(metrics["demonstrations"]["gold"], color="black", linestyle="--", linewidth=1,
                         label="demonstrators (imitation ceiling)")
            axis.legend(loc="upper left")
        axis.set_ylabel("mean gold score (held-out prompts)")
        axis.set_title(f"What each stage reaches ({metrics['profile']} profile)")
        save(figure, "gold_per_stage.png")

    if "ppo" in curves and curves["ppo"]["iteration"]:
        ppo = curves["ppo"]
        figure = Figure(figsize=(11, 3.4))
        for column, (key, label) in enumerate([("reward_model_score", "reward-model score"), ("gold", "gold score"),
                                               ("kl", "KL(pi || pi_ref), nats per response")]):
            axis = figure.add_subplot(1, 3, column + 1)
            axis.plot(ppo["iteration"], ppo[key], marker=".")
            if key == "gold" and "sft" in metrics:
                axis.axhline(metrics["sft"]["gold"], color="gray", linestyle="--", linewidth=1, label="SFT (held out)")
                axis.legend()
            axis.set_xlabel("PPO iteration")
            axis.set_ylabel(label)
        figure.suptitle("PPO training (rollouts on training prompts)")
        save(figure, "ppo_training.png")

    points = [stage for stage in ("sft", "ppo", "dpo", "best_of_n") if stage in metrics]
    if points:
        figure = Figure(figsize=(6.5, 4.5))
        axis = figure.add_subplot()
        if "best_of_n" in curves:
            bon = curves["best_of_n"]
            axis.plot(bon["kl"], bon["gold"], color="#55a868", linestyle=":", marker="o", markersize=3,
                      label="best-of-k, k = " + ", ".join(str(k) for k in bon["n"]))
        for stage, marker in zip(points, ("s", "o", "^", "D")):
            m = metrics[stage]
            axis.errorbar([m["kl"]], [m["gold"]], yerr=[m["gold_se"]], marker=marker, markersize=8, capsize=3,
                          linestyle="none", label=_row_title(stage, metrics))
        if "demonstrations" in metrics:
            axis.axhline(metrics["demonstrations"]["gold"], color="black", linestyle="--", linewidth=1,
                         label="demonstrators")
        axis.set_xlabel("KL(pi || pi_ref), nats per response (best-of-n: log n - (n-1)/n)")
        axis.set_ylabel("mean gold score (held-out prompts)")
        axis.set_title("Gold bought per nat of KL from the SFT model")
        axis.legend(fontsize=8)
        save(figure, "gold_vs_kl.png")

    if "reward_model" in curves and curves["reward_model"]["step"]:
        rm = curves["reward_model"]
        figure = Figure(figsize=(10, 3.6))
        axis = figure.add_subplot(1, 2, 1)
        axis.plot(rm["step"], rm["heldout_accuracy_labels"], marker=".", label="against the labels")
        axis.plot(rm["step"], rm["heldout_accuracy_gold"], marker=".", label="against the gold order")
        axis.axhline(0.5, color="gray", linestyle=":", linewidth=1, label="chance")
        axis.axhline(metrics["reward_model"]["labeler_accuracy_cap"], color="black", linestyle="--", linewidth=1,
                     label="a judge that knows the gold")
        axis.set_xlabel("training step")
        axis.set_ylabel("held-out pairwise accuracy")
        axis.legend(fontsize=8, loc="lower right")
        axis = figure.add_subplot(1, 2, 2)
        if rm["train_step"]:
            window = max(1, len(rm["train_loss"]) // 20)
            smooth = np.convolve(rm["train_loss"], np.ones(window) / window, mode="valid")
            axis.plot(rm["train_step"][window - 1:], smooth, label=f"train (mean of {window} steps)")
        axis.plot(rm["step"], rm["heldout_loss"], marker=".", label="held out")
        axis.set_xlabel("training step")
        axis.set_ylabel("Bradley-Terry loss")
        axis.legend(fontsize=8)
        figure.suptitle("Reward model learning curve")
        save(figure, "reward_model.png")

    if "dpo" in curves and curves["dpo"]["step"]:
        dpo = curves["dpo"]
        figure = Figure(figsize=(10, 3.4))
        axis = figure.add_subplot(1, 2, 1)
        # step 0 is pi = pi_ref: every margin is exactly 0, a tie that ``dpo`` counts as wrong; left out
        trained = [i for i, step in enumerate(dpo["step"]) if step > 0]
        axis.plot([dpo["step"][i] for i in trained], [dpo["heldout_accuracy"][i] for i in trained], marker=".")
        axis.axhline(0.5, color="gray", linestyle=":", linewidth=1, label="chance")
        axis.legend(fontsize=8)
        axis.set_xlabel("DPO step")
        axis.set_ylabel("held-out implicit-reward accuracy")
        axis = figure.add_subplot(1, 2, 2)
        axis.plot(dpo["step"], dpo["heldout_reward_margin"], marker=".")
        axis.set_xlabel("DPO step")
        axis.set_ylabel("held-out margin, beta * log-ratio")
        figure.suptitle(f"DPO training (beta {metrics['dpo']['beta']:g})")
        save(figure, "dpo_training.png")
    return written


def report(metrics: dict, results: dict[str, dict], figures: Sequence[str]) -> str:
    """report.md: the table, the claims checked, the figures and a few held-out responses per stage."""
    lines = [f"# RLHF pipeline: {metrics['profile']} profile", "",
             f"Device {metrics['device']}; every policy answers the same {metrics['eval_prompts']} held-out "
             f"prompts ({_samples_note(metrics)}; sampling seed {metrics['config']['seed']}, at most "
             f"{metrics['max_new_tokens']} tokens). *+-* is the standard error of the mean gold. *gold* is the hidden "
             f"human's score (never seen by training); *reward* is the reward "
             f"model's score, normalised so SFT samples score 0 +- 1 (base, demonstrators and SFT: their "
             f"responses scored once the reward model exists); *KL* is the summed log-ratio to pi_ref (the "
             f"SFT model) per response, measured on the sampled tokens (best-of-n: the analytic "
             f"log n - (n-1)/n).", "", markdown_table(policy_rows(metrics)), ""]
    lines += [f"- {note}" for note in _notes(metrics)]
    if metrics["checks"]:
        lines += ["", "## Claims", ""]
        descriptions = {
            "sft_matches_demonstrators": "SFT reaches the demonstrators (gold within 0.1)",
            "reward_model_beats_chance": "the reward model ranks held-out pairs well above chance (> 60%)",
            "ppo_beats_sft": "PPO beats SFT in gold (by more than two standard errors)",
            "dpo_beats_sft": "DPO beats SFT in gold (by more than two standard errors)",
            "best_of_n_beats_sft": "best-of-n beats SFT in gold (by more than two standard errors)",
        }
        lines += [f"- [{'x' if ok else ' '}] {descriptions.get(name, name)}" for name, ok in metrics["checks"].items()]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{name[:-4]}]({name})" for name in figures]
    examples = {stage: results[stage].get("examples", []) for stage in POLICY_ROWS if stage in results}
    count = max((len(rows) for rows in examples.values()), default=0)
    if count:
        lines += ["", "## Held-out responses", ""]
        for index in range(count):
            prompt = next(rows[index]["prompt"] for rows in examples.values() if len(rows) > index)
            lines += [f"**{prompt}**", ""]
            for stage, rows in examples.items():
                if len(rows) > index:
                    text = rows[index]["response"].strip().replace("\n", " ").replace("|", "/")
                    lines.append(f"- {_row_title(stage, metrics)} (gold {rows[index]['gold']:+.2f}): {text}")
            lines.append("")
    lines += ["## Time", "", markdown_table([["stage", "seconds", "cached"]] + [
        [STAGE_TITLES[stage], f"{seconds:.1f}", "yes" if metrics["cached"].get(stage) else "no"]
        for stage, seconds in metrics["seconds"].items() if stage != "total"]),
        "", f"Total: {metrics['seconds']['total']:.1f} s.", ""]
    return "\n".join(lines)
