"""What a pipeline run leaves behind: the results table, the claims checked, ``metrics.json``,
``curves.json``, ``report.md`` and the figures.

``rlhf_core.pipeline_stages`` builds and measures the stages; this module only reads what they measured:
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

from .cache import write_json_atomically
from .errors import CourseError
from .report_figures import BEATS_SFT, FIGURES, POLICY_ROWS, STAGE_TITLES, make_figures, row_title

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
        return f"held-out accuracy {metrics['accuracy_labels']:.1%} (labels), {metrics['accuracy_gold']:.1%} (gold)"
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
    for stage in BEATS_SFT:
        if stage in metrics and "sft" in metrics:  # above SFT by more than two standard errors
            checks[f"{stage}_beats_sft"] = metrics[stage]["gold"] - metrics["sft"]["gold"] > 2 * _difference_se(
                metrics, stage, "sft"
            )
    return checks


# ----------------------------------------------------------------------------------------------
# Outputs: table, figures, report


def _number(value, form: str) -> str:
    return "-" if value is None else format(value, form)


def policy_rows(metrics: dict) -> list[list[str]]:
    """Header and one row per policy stage that ran: gold (+- standard error), reward, KL, EOS, words."""
    rows = [["stage", "gold", "+-", "reward", "KL (nats)", "ends with EOS", "words", "seconds", "cached"]]
    for stage in POLICY_ROWS:
        if stage not in metrics:
            continue
        m = metrics[stage]
        rows.append(
            [
                row_title(stage, metrics),
                _number(m["gold"], "+.3f"),
                _number(m["gold_se"], ".3f"),
                _number(m.get("reward"), "+.2f"),
                _number(m.get("kl"), ".2f"),
                _number(m.get("eos_fraction"), ".0%"),
                _number(m.get("mean_words"), ".1f"),
                _number(metrics["seconds"].get(stage), ".1f"),
                "yes" if metrics["cached"].get(stage) else "no",
            ]
        )
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
        notes.append(
            f"reward model: held-out accuracy {r['accuracy_labels']:.1%} against the labels "
            f"(a judge that knows the gold expects {r['labeler_accuracy_cap']:.1%}), "
            f"{r['accuracy_gold']:.1%} against the gold order; chance is 50%"
        )
    for stage in ("grpo", "rloo"):
        if stage in metrics and metrics[stage].get("iterations"):
            m = metrics[stage]
            notes.append(
                f"{STAGE_TITLES[stage]}: {m['iterations']} iterations, groups of {m['group_size']} responses "
                f"per prompt, no value model; {_number(m.get('seconds_per_iteration'), '.1f')} s per "
                f"iteration (sampling, scoring, update)"
            )
    return notes


def _samples_note(metrics: dict) -> str:
    many = [
        row_title(stage, metrics) for stage in POLICY_ROWS if metrics.get(stage, {}).get("samples_per_prompt", 1) > 1
    ]
    if not many:
        return "one response each"
    count = max(metrics[stage].get("samples_per_prompt", 1) for stage in POLICY_ROWS if stage in metrics)
    return f"{' and '.join(many)}: {count} responses per prompt (best-of-n's candidates), the others one"


def results_table(metrics: dict) -> str:
    """The terminal table: one row per policy, then the preference and reward-model lines."""
    lines = [
        f"profile {metrics['profile']}: gold on {metrics['eval_prompts']} held-out prompts, {_samples_note(metrics)}",
        text_table(policy_rows(metrics)),
    ]
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
                raise CourseError(
                    f"--out {out}: {path} is a file, not a folder; name a folder "
                    f"(it is created when missing) or move the file away"
                )
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


def _lora_note(metrics: dict) -> str:
    rank = metrics.get("lora_rank")
    return f", LoRA rank {rank} (SFT, PPO, DPO, GRPO and RLOO train adapters; pi_ref is SFT)" if rank else ""


def report(metrics: dict, results: dict[str, dict], figures: Sequence[str]) -> str:
    """report.md: the table, the claims checked, the figures and a few held-out responses per stage."""
    lines = [
        f"# RLHF pipeline: {metrics['profile']} profile{_lora_note(metrics)}",
        "",
        f"Device {metrics['device']}; every policy answers the same {metrics['eval_prompts']} held-out "
        f"prompts ({_samples_note(metrics)}; sampling seed {metrics['config']['seed']}, at most "
        f"{metrics['max_new_tokens']} tokens). *+-* is the standard error of the mean gold. *gold* is the hidden "
        f"human's score (never seen by training); *reward* is the reward "
        f"model's score, normalised so SFT samples score 0 +- 1 (base, demonstrators and SFT: their "
        f"responses scored once the reward model exists); *KL* is the summed log-ratio to pi_ref (the "
        f"SFT model) per response, measured on the sampled tokens (best-of-n: the analytic "
        f"log n - (n-1)/n).",
        "",
        markdown_table(policy_rows(metrics)),
        "",
    ]
    lines += [f"- {note}" for note in _notes(metrics)]
    if metrics["checks"]:
        lines += ["", "## Claims", ""]
        descriptions = {
            "sft_matches_demonstrators": "SFT reaches the demonstrators (gold within 0.1)",
            "reward_model_beats_chance": "the reward model ranks held-out pairs well above chance (> 60%)",
            "ppo_beats_sft": "PPO beats SFT in gold (by more than two standard errors)",
            "dpo_beats_sft": "DPO beats SFT in gold (by more than two standard errors)",
            "best_of_n_beats_sft": "best-of-n beats SFT in gold (by more than two standard errors)",
            "grpo_beats_sft": "GRPO beats SFT in gold (by more than two standard errors)",
            "rloo_beats_sft": "RLOO beats SFT in gold (by more than two standard errors)",
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
                    lines.append(f"- {row_title(stage, metrics)} (gold {rows[index]['gold']:+.2f}): {text}")
            lines.append("")
    lines += [
        "## Time",
        "",
        markdown_table(
            [["stage", "seconds", "cached"]]
            + [
                [STAGE_TITLES[stage], f"{seconds:.1f}", "yes" if metrics["cached"].get(stage) else "no"]
                for stage, seconds in metrics["seconds"].items()
                if stage != "total"
            ]
        ),
        "",
        f"Total: {metrics['seconds']['total']:.1f} s.",
        "",
    ]
    return "\n".join(lines)
