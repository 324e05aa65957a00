"""The stages of ``python -m rlhf_core run``: each builds (or loads) its model through ``rlhf_core.stages``, then
measures it, the same way for every policy, with ``evaluation.measure_policy`` on the profile's held-out prompts.

``PipelineRun`` holds what the stages of one run share (profile, device, held-out prompts, the SFT model and the
reward model, loaded once) and the results; ``stage_file`` is where a stage's measurement is cached, under a key
made of the content hashes of the weights it measured and of the measurement settings (``PipelineRun.key``).
``STAGE_FUNCTIONS`` maps a stage name to its function; the graph (``STAGES``, ``DEPENDS_ON``) and the run itself are
in ``rlhf_core.pipeline``, which imports this module (never the other way round).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import best_of_n, distributed, stages
from .demonstrations import EVAL_DEMONSTRATION_SEED, DemonstratorConfig, mean_gold, write_demonstrations
from .dpo import DPOConfig
from .evaluation import gold_summary
from .grpo import CriticFreeConfig
from .iteration_loop import seconds_per_iteration
from .models import count_parameters
from .pipeline_run import PipelineRun, cached_or_measure, series, stage_file  # noqa: F401 (stage_file: the API)
from .preferences import PreferenceConfig, gold_agreement, labeler_accuracy_cap, load_preferences
from .prompts import load_prompts
from .reward_model import score_texts
from .rlhf import PPOConfig

if TYPE_CHECKING:  # a type hint only: ``pipeline`` imports this module
    pass

# ----- the stages: each builds (or loads) its model, then measures it; returns the files measured --


def stage_base(run: PipelineRun) -> list[Path]:
    model = stages.load_base_model(run.profile, run.device)
    folder = Path(run.profile.base_model)
    files = [folder / "model.safetensors"] if (folder / "model.safetensors").exists() else []

    def measure() -> dict:
        # No reward model or pi_ref exists yet: gold only (the reward-model stage scores these responses).
        metrics, responses = run.measure(model, with_reference=False, with_reward=False)
        metrics.update(
            parameters=count_parameters(model),
            train_prompts=len(load_prompts(run.profile, "train")),
            eval_prompts=len(run.eval_prompts),
        )
        summary = folder / "pretrain_summary.json"
        if summary.exists():
            metrics["validation_loss"] = json.loads(summary.read_text()).get("final_validation_loss")
        return {"metrics": metrics, "responses": responses, "examples": run.examples(responses)}

    cached_or_measure(run, "base", files, (), measure, extra=run.profile.base_model)
    return files


def stage_demonstrations(run: PipelineRun) -> list[Path]:
    entry = stages.ensure_demonstrations(run.profile, rebuild="demonstrations" in run.rebuild)
    records = stages.load_or_write_demonstrations(run.profile)
    files = [entry.folder / stages.DEMONSTRATIONS_FILE]
    n = run.config.best_of_n

    def measure() -> dict:
        # The same demonstrators writing for the held-out prompts: the imitation ceiling, on the
        # prompts every other row is measured on (as many per prompt as SFT gets: equal precision).
        held_out = write_demonstrations(run.repeated_prompts(n), DemonstratorConfig(), seed=EVAL_DEMONSTRATION_SEED)
        texts = [record["response"] for record in held_out]
        golds = [record["gold"] for record in held_out]
        responses = {"responses": texts, "ended": [True] * len(held_out), "golds": [round(g, 4) for g in golds]}
        metrics = {
            **gold_summary(golds, texts, responses["ended"], len(run.eval_prompts)),
            "reward": None,
            "kl": None,
            "samples_per_prompt": n,
            "train_records": len(records),
            "train_gold": round(mean_gold(records), 4),
        }
        return {"metrics": metrics, "responses": responses, "examples": run.examples(responses)}

    cached_or_measure(
        run, "demonstrations", files, (), measure, extra=[asdict(DemonstratorConfig()), EVAL_DEMONSTRATION_SEED, n]
    )
    return files


def stage_sft(run: PipelineRun) -> list[Path]:
    policy, _, _ = run.sft()
    files = [stages.sft_dir(run.profile) / "model.safetensors"]

    def measure() -> dict:
        # best_of_n samples per prompt: a precise SFT gold, and best-of-n's candidates. No reward model yet (its
        # stage scores these responses); pi_ref is the frozen copy of this very model: the KL is 0 by definition.
        metrics, responses = run.measure(
            policy, with_reference=False, with_reward=False, samples_per_prompt=run.config.best_of_n
        )
        metrics["kl"] = 0.0
        summary = stages.sft_summary(run.profile)
        metrics.update(
            steps=summary.get("steps"),
            heldout_loss_before=summary.get("heldout_loss_before"),
            heldout_loss_after=summary.get("heldout_loss_after"),
        )
        return {
            "metrics": metrics,
            "responses": responses,
            "examples": run.examples(responses),
            "curves": series(summary.get("history", []), ("step", "heldout_loss"), where="heldout_loss"),
        }

    cached_or_measure(run, "sft", files, (), measure, extra=run.config.best_of_n)
    return files


def stage_preferences(run: PipelineRun) -> list[Path]:
    entry = stages.ensure_preferences(run.profile, run.device, run.progress, rebuild="preferences" in run.rebuild)
    files = [entry.folder / stages.PREFERENCES_FILE]
    records = load_preferences(files[0])

    def measure() -> dict:
        temperature = PreferenceConfig.for_profile(run.profile).labeler_temperature
        gaps = np.array([abs(r["chosen_gold"] - r["rejected_gold"]) for r in records if "chosen_gold" in r])
        metrics = {
            "pairs": len(records),
            "prompts": len({r["prompt"] for r in records}),
            "labels_agree_with_gold": round(gold_agreement(records), 4),
            "labeler_accuracy_cap": round(labeler_accuracy_cap(records, temperature), 4),
            "mean_gold_gap": round(float(gaps.mean()), 4) if len(gaps) else None,
        }
        return {"metrics": metrics}

    cached_or_measure(run, "preferences", files, (), measure)
    return files


def stage_reward_model(run: PipelineRun) -> list[Path]:
    reward_model, tokenizer, trained = run.reward_model()
    folder = stages.reward_model_path(run.profile)
    files = [folder / "model.safetensors", folder / "config.json"]  # the normalisation is in config.json

    def measure() -> dict:
        history = trained.get("history", [])
        train_losses = [row["loss"] for row in history if "loss" in row]  # the training steps' rows
        sources = {
            "accuracy_labels": "heldout_accuracy_labels",
            "accuracy_gold": "heldout_accuracy_gold",
            "labeler_accuracy_cap": "labeler_accuracy_cap",
            "labels_agree_with_gold": "labels_agree_with_gold",
        }
        metrics = {name: round(trained[source], 4) for name, source in sources.items()}
        metrics.update(
            heldout_pairs=trained["heldout_pairs"],
            train_pairs=trained["train_pairs"],
            accuracy_before_training=round(history[0]["heldout_accuracy_labels"], 4) if history else None,
            train_loss_last=round(train_losses[-1], 4) if train_losses else None,
        )
        # The reward model's view of what came before it, on the very held-out responses measured there.
        for stage in ("base", "demonstrations", "sft"):
            responses = run.results[stage]["responses"]
            prompts = run.repeated_prompts(len(responses["responses"]) // len(run.eval_prompts))
            scores = score_texts(
                reward_model,
                tokenizer,
                prompts,
                responses["responses"],
                batch_size=run.profile.generation_batch_size,
                ended=responses["ended"],
            )
            metrics[f"{stage}_reward"] = round(float(scores.mean()), 4)
            if stage == "sft":
                metrics["reward_gold_correlation"] = round(float(np.corrcoef(scores, responses["golds"])[0, 1]), 4)
        curves = series(
            history,
            ("step", "heldout_accuracy_labels", "heldout_accuracy_gold", "heldout_loss"),
            where="heldout_accuracy_labels",
        )
        train = series(history, ("step", "loss"), where="loss")
        curves.update(train_step=train["step"], train_loss=train["loss"])
        return {"metrics": metrics, "curves": curves}

    cached_or_measure(run, "reward_model", files, ("base", "demonstrations", "sft"), measure)
    return files


def stage_ppo(run: PipelineRun) -> list[Path]:
    config = PPOConfig.for_profile(run.profile)
    policy, history, samples = stages.load_or_train_ppo(
        run.profile, config, device=run.device, progress=run.progress, rebuild="ppo" in run.rebuild
    )
    files = [stages.ppo_dir(run.profile, config) / "policy" / "model.safetensors"]

    def measure() -> dict:
        metrics, responses = run.measure(policy)
        last = history[-1] if history else {}
        metrics.update(
            iterations=len(history),
            kl_coef=config.kl_coef,
            adaptive_kl=config.adaptive_kl,
            training_reward_last=last.get("reward_model_score"),
            training_gold_last=last.get("gold"),
            training_kl_last=last.get("kl"),
        )
        keys = (
            "iteration",
            "reward_model_score",
            "penalised_score",
            "gold",
            "kl",
            "kl_coef",
            "entropy",
            "length",
            "eos_fraction",
        )
        return {
            "metrics": metrics,
            "responses": responses,
            "examples": run.examples(responses),
            "curves": series(history, keys, where="iteration"),
            "training_samples": samples[-3:],
        }

    cached_or_measure(run, "ppo", files + run.files_of("sft", "reward_model"), (), measure, extra=asdict(config))
    return files


def stage_dpo(run: PipelineRun) -> list[Path]:
    config = DPOConfig.for_profile(run.profile)
    policy, history = stages.load_or_train_dpo(
        run.profile, config.beta, device=run.device, progress=run.progress, config=config, rebuild="dpo" in run.rebuild
    )
    files = [stages.dpo_dir(run.profile, config.beta, config) / "model.safetensors"]

    def measure() -> dict:
        metrics, responses = run.measure(policy)
        curves = series(
            history, ("step", "heldout_accuracy", "heldout_reward_margin", "heldout_loss"), where="heldout_accuracy"
        )
        metrics.update(
            beta=config.beta,
            loss_type=config.loss_type,
            steps=max((row["step"] for row in history), default=0),
            heldout_accuracy=curves["heldout_accuracy"][-1] if curves["step"] else None,
            heldout_reward_margin=curves["heldout_reward_margin"][-1] if curves["step"] else None,
        )
        return {"metrics": metrics, "responses": responses, "examples": run.examples(responses), "curves": curves}

    cached_or_measure(run, "dpo", files + run.files_of("sft", "reward_model"), (), measure, extra=asdict(config))
    return files


def stage_best_of_n(run: PipelineRun) -> list[Path]:
    policy, _, tokenizer = run.sft()
    reward_model = run.reward_model()[0]
    n = run.config.best_of_n

    def measure() -> dict:
        # The candidates are the SFT stage's n samples per prompt (rows j * P + i, what ``sample_candidates`` draws
        # with the same seed and batch size); the reward model scores them all and keeps each prompt's best.
        sft = run.results["sft"]["responses"]
        count = len(run.eval_prompts)
        candidates, candidates_ended = best_of_n.candidates_from_rows(sft["responses"], sft["ended"], count)
        all_golds = np.array(sft["golds"], dtype=float).reshape(n, count).T  # (P, n)
        score_fn = best_of_n.reward_model_score_fn(reward_model, tokenizer, run.profile.generation_batch_size)
        best = best_of_n.choose_best(run.eval_prompts, candidates, candidates_ended, score_fn)
        golds = all_golds[np.arange(count), best.chosen_index]  # (P,) the gold of each chosen response
        metrics = {
            "n": n,
            **gold_summary(golds, best.responses, best.ended, count),
            "reward": round(float(best.scores.mean()), 4),
            "kl": round(float(best_of_n.analytic_kl(n)), 4),
            "kl_measured": None,
            "candidates_reward": round(float(best.all_scores.mean()), 4),
            "oracle_gold": round(float(all_golds.max(axis=1).mean()), 4),
        }
        if run.config.measured_kl_prompts > 0:
            measured = distributed.on_main(  # several processes: one seeded stream, sampled by the main one
                lambda: best_of_n.measure_kl(
                    policy,
                    tokenizer,
                    run.eval_prompts[: run.config.measured_kl_prompts],
                    n,
                    score_fn,
                    run.profile.max_new_tokens,
                    samples_per_prompt=run.config.measured_kl_samples,
                    seed=run.config.seed + 1,
                    batch_size=run.profile.generation_batch_size,
                    progress=run.progress,
                )
            )
            metrics.update(kl_measured=round(measured["kl"], 4), tied_fraction=round(measured["tied_fraction"], 4))
        chosen = {"responses": best.responses, "ended": best.ended, "golds": [round(float(g), 4) for g in golds]}
        # best-of-k for every k <= n from the same candidates (Gao et al.'s unbiased estimator); k = 1 is SFT
        return {
            "metrics": metrics,
            "responses": chosen,
            "examples": run.examples(chosen),
            "curves": best_of_n.best_of_k_curve(best.all_scores, all_golds, n),
        }

    cached_or_measure(
        run,
        "best_of_n",
        run.files_of("reward_model"),
        ("sft",),
        measure,
        extra=[n, run.config.measured_kl_prompts, run.config.measured_kl_samples],
    )
    return []


def critic_free_stage(run: PipelineRun, method: str) -> list[Path]:
    """A critic-free run (``rlhf_core.grpo``, chapter 08) with ``method``'s default config: trained against the same
    SFT model and reward model as PPO, on as many responses per iteration, and measured like PPO (its stage is named
    after the method: ``grpo`` or ``rloo``)."""
    config = CriticFreeConfig.for_profile(run.profile, method=method)
    policy, history, samples = stages.load_or_train_critic_free(
        run.profile, config, device=run.device, progress=run.progress, rebuild=method in run.rebuild
    )
    files = [
        stages.critic_free_entry(run.profile, config, run.device, run.progress).folder / "policy" / "model.safetensors"
    ]

    def measure() -> dict:
        metrics, responses = run.measure(policy)
        last = history[-1] if history else {}
        metrics.update(
            method=config.method,
            iterations=len(history),
            group_size=config.group_size,
            kl_coef=config.kl_coef,
            kl_in=config.kl_in,
            loss_aggregation=config.loss_aggregation,
            training_reward_last=last.get("reward_model_score"),
            training_gold_last=last.get("gold"),
            training_kl_last=last.get("kl"),
        )
        keys = (
            "iteration",
            "reward_model_score",
            "penalised_score",
            "gold",
            "kl",
            "entropy",
            "length",
            "eos_fraction",
            "advantage_std",
        )
        return {
            "metrics": metrics,
            "responses": responses,
            "examples": run.examples(responses),
            "curves": series(history, keys, where="iteration"),
            "training_samples": samples[-3:],
        }

    cached_or_measure(run, method, files + run.files_of("sft", "reward_model"), (), measure, extra=asdict(config))
    # The wall time of one iteration (sampling P * k responses, scoring them, the update epochs), from the run whose
    # policy was just loaded, not from the stored measurement: a retrained run with the same weights (training is
    # seeded) reuses the measurement, but its timings are its own.
    seconds = seconds_per_iteration(history)
    run.results[method]["metrics"]["seconds_per_iteration"] = None if seconds is None else round(seconds, 3)
    return files


def stage_grpo(run: PipelineRun) -> list[Path]:
    return critic_free_stage(run, "grpo")


def stage_rloo(run: PipelineRun) -> list[Path]:
    return critic_free_stage(run, "rloo")


STAGE_FUNCTIONS: dict[str, Callable[[PipelineRun], list[Path]]] = {
    "base": stage_base,
    "demonstrations": stage_demonstrations,
    "sft": stage_sft,
    "preferences": stage_preferences,
    "reward_model": stage_reward_model,
    "ppo": stage_ppo,
    "dpo": stage_dpo,
    "best_of_n": stage_best_of_n,
    "grpo": stage_grpo,
    "rloo": stage_rloo,
}
