"""The pipeline's figures (``python -m rlhf_core run``): gold per stage, the RL training curves, gold against
KL (the frontier), the reward model's and DPO's learning curves; and the names and colours every table and
figure of the report shares."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

STAGE_TITLES = {
    "base": "base model",
    "demonstrations": "demonstrations",
    "sft": "SFT",
    "preferences": "preference pairs",
    "reward_model": "reward model",
    "ppo": "PPO",
    "dpo": "DPO",
    "best_of_n": "best-of-n",
    "grpo": "GRPO",
    "rloo": "RLOO",
}
POLICY_ROWS = ("base", "demonstrations", "sft", "ppo", "dpo", "best_of_n", "grpo", "rloo")  # they answer prompts
ONLINE_RL = ("ppo", "grpo", "rloo")  # sample, score with the reward model, update: one loop, three baselines
BEATS_SFT = ("ppo", "dpo", "best_of_n", "grpo", "rloo")  # each claims a gold above SFT's
COLORS = {"sft": "C0", "ppo": "C1", "dpo": "C2", "best_of_n": "C3", "grpo": "C4", "rloo": "C5"}  # one per figure
FIGURES = ("gold_per_stage.png", "ppo_training.png", "gold_vs_kl.png", "reward_model.png", "dpo_training.png")


def row_title(stage: str, metrics: dict) -> str:
    if stage == "best_of_n":
        return f"best-of-{metrics['best_of_n']['n']}"
    return {"demonstrations": "demonstrators"}.get(stage, STAGE_TITLES[stage])


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
        names = [row_title(stage, metrics) for stage in stages]
        golds = [metrics[stage]["gold"] for stage in stages]
        errors = [metrics[stage]["gold_se"] for stage in stages]
        colors = ["#999999" if stage in ("base", "demonstrations") else "#4c72b0" for stage in stages]
        axis.bar(names, golds, yerr=errors, color=colors, capsize=4)
        if "demonstrations" in metrics:
            axis.axhline(
                metrics["demonstrations"]["gold"],
                color="black",
                linestyle="--",
                linewidth=1,
                label="demonstrators (imitation ceiling)",
            )
            axis.legend(loc="upper left")
        axis.set_ylabel("mean gold score (held-out prompts)")
        axis.set_title(f"What each stage reaches ({metrics['profile']} profile)")
        save(figure, "gold_per_stage.png")

    online = [stage for stage in ONLINE_RL if stage in curves and curves[stage]["iteration"]]
    if online:  # PPO and the critic-free runs spend the same responses per iteration: one x axis
        figure = Figure(figsize=(11, 3.4))
        for column, (key, label) in enumerate(
            [
                ("reward_model_score", "reward-model score"),
                ("gold", "gold score"),
                ("kl", "KL(pi || pi_ref), nats per response"),
            ]
        ):
            axis = figure.add_subplot(1, 3, column + 1)
            for stage in online:
                axis.plot(
                    curves[stage]["iteration"],
                    curves[stage][key],
                    marker=".",
                    color=COLORS[stage],
                    label=STAGE_TITLES[stage],
                )
            if key == "gold" and "sft" in metrics:
                axis.axhline(metrics["sft"]["gold"], color="gray", linestyle="--", linewidth=1, label="SFT (held out)")
            if key == "gold":
                axis.legend(fontsize=8)
            axis.set_xlabel("iteration")
            axis.set_ylabel(label)
        figure.suptitle(f"{', '.join(STAGE_TITLES[stage] for stage in online)} training (rollouts on training prompts)")
        save(figure, "ppo_training.png")

    points = [stage for stage in ("sft", "ppo", "dpo", "best_of_n", "grpo", "rloo") if stage in metrics]
    if points:
        figure = Figure(figsize=(6.5, 4.5))
        axis = figure.add_subplot()
        if "best_of_n" in curves:
            bon = curves["best_of_n"]
            axis.plot(
                bon["kl"],
                bon["gold"],
                color="#55a868",
                linestyle=":",
                marker="o",
                markersize=3,
                label="best-of-k, k = " + ", ".join(str(k) for k in bon["n"]),
            )
        markers = {"sft": "s", "ppo": "o", "dpo": "^", "best_of_n": "D", "grpo": "v", "rloo": "P"}
        for stage in points:
            m = metrics[stage]
            axis.errorbar(
                [m["kl"]],
                [m["gold"]],
                yerr=[m["gold_se"]],
                marker=markers[stage],
                markersize=8,
                capsize=3,
                linestyle="none",
                color=COLORS[stage],
                label=row_title(stage, metrics),
            )
        if "demonstrations" in metrics:
            axis.axhline(
                metrics["demonstrations"]["gold"], color="black", linestyle="--", linewidth=1, label="demonstrators"
            )
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
        axis.axhline(
            metrics["reward_model"]["labeler_accuracy_cap"],
            color="black",
            linestyle="--",
            linewidth=1,
            label="a judge that knows the gold",
        )
        axis.set_xlabel("training step")
        axis.set_ylabel("held-out pairwise accuracy")
        axis.legend(fontsize=8, loc="lower right")
        axis = figure.add_subplot(1, 2, 2)
        if rm["train_step"]:
            window = max(1, len(rm["train_loss"]) // 20)
            smooth = np.convolve(rm["train_loss"], np.ones(window) / window, mode="valid")
            axis.plot(rm["train_step"][window - 1 :], smooth, label=f"train (mean of {window} steps)")
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
