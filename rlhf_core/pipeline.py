"""The whole course in one command: ``python -m rlhf_core run``. The stages, in the order the chapters teach them:

    base            the pretrained model the course starts from (shipped in ``data/`` for tiny)
    demonstrations  what the simulated writers produce: the imitation ceiling
    sft             supervised fine-tuning on the demonstrations; its frozen copy is pi_ref
    preferences     pairs of SFT samples, compared by simulated labelers
    reward_model    r_phi(x, y) trained on those pairs (Bradley-Terry)
    ppo             the four-model RLHF loop: maximise r_phi with a KL penalty to pi_ref
    dpo             the same preference pairs, without a reward model or sampling
    best_of_n       no training: sample n responses from SFT, keep the one r_phi likes best

Every stage builds its model through ``rlhf_core.stages``, which caches it in ``cache_dir()/<profile>/``. Then the
pipeline *measures* it, the same way for every stage: the same held-out prompts (the profile's ``n_eval_prompts``), the
same sampling seed, scored by the hidden human (gold), by the reward model and by the KL to pi_ref (the SFT model) with
``evaluation.measure_policy``; so the gold means of the rows compare.

The measurements are cached in ``cache_dir()/<profile>/pipeline/<stage>.json`` under a key made of the content hashes of
the weights they measured and of the measurement settings: a rerun skips every stage whose models have not changed and
finishes in seconds. ``fresh`` rebuilds stages (models and measurements) of the selected profile only: never ``data/``,
other configurations' checkpoints (a chapter's PPO run with another beta) or preference labels a person made.
``run_pipeline`` returns the metrics and writes them, the report and the figures (``rlhf_core.report``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from datasets.utils.logging import disable_progress_bar as no_dataset_bars
from transformers.utils.logging import disable_progress_bar as no_loading_bars

from . import best_of_n, report, stages
from .cache import cached_json, file_digest, stable_hash
from .config import Profile, cache_dir, get_profile, seed_everything, select_device, with_overrides
from .demonstrations import EVAL_DEMONSTRATION_SEED, DemonstratorConfig, mean_gold, write_demonstrations
from .dpo import DPOConfig
from .evaluation import gold_summary, measure_policy
from .models import count_parameters
from .preferences import PreferenceConfig, gold_agreement, labeler_accuracy_cap, load_preferences
from .prompts import load_prompts
from .reward_model import score_texts
from .rlhf import PPOConfig
from .tokenizer import load_tokenizer

STAGES = ("base", "demonstrations", "sft", "preferences", "reward_model", "ppo", "dpo", "best_of_n")
# What each stage is built from: rebuilding a stage rebuilds (with ``fresh``) what depends on it.
DEPENDS_ON = {"base": (), "demonstrations": (), "sft": ("base", "demonstrations"), "preferences": ("sft",),
              "reward_model": ("preferences", "sft"), "ppo": ("sft", "reward_model"), "dpo": ("sft", "preferences"),
              "best_of_n": ("sft", "reward_model")}
FORMAT = 2  # version of the stage files; bump it when what a stage measures changes (2: gold's ending rule)


@dataclass(frozen=True)
class PipelineConfig:
    seed: int = 0  # sampling seed of every measurement (same prompts, same seed: rows compare)
    best_of_n: int = 8  # candidates per prompt for best-of-n (KL log n - (n-1)/n: 1.20 nats at 8);
    #                     SFT and the demonstrators are measured on as many samples per prompt (the candidates)
    measured_kl_prompts: int = 0  # held-out prompts on which best-of-n's KL is also measured (0: analytic only)
    measured_kl_samples: int = 128  # SFT samples per such prompt for the measured KL (should be >> best_of_n)
    examples: int = 3  # held-out prompts whose responses report.md shows for every stage

    @classmethod
    def for_profile(cls, profile: Profile | str | None = None, **overrides) -> PipelineConfig:
        """The tiny and small profiles run on a CPU in minutes; on a GPU, best-of-16 with a measured KL."""
        profile = profile if isinstance(profile, Profile) else get_profile(profile)
        gpu = {"best_of_n": 16, "measured_kl_prompts": 32, "measured_kl_samples": 256} if profile.name == "gpt2" else {}
        return with_overrides(cls(**gpu), overrides)


# ----------------------------------------------------------------------------------------------
# The stage graph, the measurement files and --fresh


def stage_file(profile: Profile, stage: str) -> Path:
    """Where a stage's measurement is cached."""
    return cache_dir() / profile.name / "pipeline" / f"{stage}.json"


def stages_from(stage: str | None) -> list[str]:
    """``stage`` and every stage built on it, in pipeline order; all stages for None or "all"."""
    if stage in (None, "all"):
        return list(STAGES)
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}")
    chosen = {stage}
    for name in STAGES:  # DEPENDS_ON only points backwards, so one pass in order suffices
        if any(dependency in chosen for dependency in DEPENDS_ON[name]):
            chosen.add(name)
    return [name for name in STAGES if name in chosen]


def clear_measurements(profile: Profile, names: Sequence[str]) -> list[Path]:
    """Delete the stored measurements of the stages ``names``; returns what was deleted (their models
    are rebuilt by ``rlhf_core.stages`` with ``rebuild=True``). Refuses paths outside ``cache_dir()/<profile>``."""
    root = (cache_dir() / profile.name).resolve()
    deleted = []
    for stage in names:
        path = stage_file(profile, stage)
        if root not in path.resolve().parents:
            raise RuntimeError(f"refusing to delete {path}: it is not inside {root}")
        if path.exists() or path.is_symlink():
            path.unlink()
            deleted.append(path)
    return deleted


# ----------------------------------------------------------------------------------------------
# The run


class PipelineRun:
    """The state shared by the stages of one run: profile, device, held-out prompts, loaded models."""

    def __init__(self, profile: Profile, device, config: PipelineConfig, progress: bool = True,
                 rebuild: Sequence[str] = ()):
        self.profile = profile
        self.device = device
        self.config = config
        self.progress = progress
        self.rebuild = set(rebuild)  # stages whose models are rebuilt rather than reused (``fresh``)
        self.eval_prompts = load_prompts(profile, "eval", profile.n_eval_prompts)
        self.results: dict[str, dict] = {}  # stage -> {"key", "metrics", "curves", "responses", ...}
        self.reused: dict[str, bool] = {}  # stage -> its stored measurement was reused
        self.started = time.time()  # a stage file written after this was built by this run: not "cached"
        self._models: dict[str, tuple] = {}

    # ----- models, loaded once per run (trained by ``rlhf_core.stages`` when missing) -----
    def sft(self):
        """(policy, reference, tokenizer): the SFT model and its frozen copy pi_ref."""
        if "sft" not in self._models:
            self._models["sft"] = stages.load_or_train_sft(self.profile, device=self.device, progress=self.progress,
                                                           rebuild="sft" in self.rebuild)
        return self._models["sft"]

    def reward_model(self):
        """(reward_model, tokenizer, metrics) of the profile."""
        if "reward_model" not in self._models:
            self._models["reward_model"] = stages.load_or_train_reward_model(
                self.profile, device=self.device, progress=self.progress, rebuild="reward_model" in self.rebuild)
        return self._models["reward_model"]

    # ----- cache keys -----
    def key(self, stage: str, files: Sequence[Path], upstream: Sequence[str] = (), extra=None) -> str:
        """What a stage's measurement depends on: the files it measured, the keys of the stages
        whose results it reads, the measurement settings and the held-out prompts."""
        identity = {"format": FORMAT, "stage": stage, "profile": self.profile.name, "seed": self.config.seed,
                    "examples": self.config.examples, "max_new_tokens": self.profile.max_new_tokens,
                    "prompts": stable_hash(self.eval_prompts, 64), "files": [file_digest(path) for path in files],
                    "upstream": [self.results[name]["key"] for name in upstream], "extra": extra}
        return stable_hash(identity, 16)

    # ----- measuring -----
    def repeated_prompts(self, samples_per_prompt: int) -> list[str]:
        """The held-out prompts, ``samples_per_prompt`` times over: row j * P + i is the j-th sample of
        prompt i (the layout of ``best_of_n.sample_candidates``: the first P rows are one sample each)."""
        return list(self.eval_prompts) * samples_per_prompt

    def measure(self, policy, with_reference: bool = True, with_reward: bool = True,
                samples_per_prompt: int = 1) -> tuple[dict, dict]:
        """``measure_policy`` on the held-out prompts: (metrics, responses) of one stage."""
        _, reference, tokenizer = self.sft() if with_reference else (None, None, None)
        tokenizer = tokenizer or load_tokenizer(self.profile.tokenizer)
        reward_model = self.reward_model()[0] if with_reward else None
        result = measure_policy(policy, reference, reward_model, tokenizer, self.repeated_prompts(samples_per_prompt),
                                self.profile.max_new_tokens, seed=self.config.seed,
                                batch_size=self.profile.generation_batch_size, progress=self.progress)
        metrics = {**gold_summary(result.golds, result.responses, result.ended, len(self.eval_prompts)),
                   "reward": round(result.reward, 4) if with_reward else None,
                   "kl": round(result.kl, 4) if with_reference else None, "samples_per_prompt": samples_per_prompt}
        return metrics, {"responses": result.responses, "ended": result.ended,
                         "golds": [round(float(g), 4) for g in result.golds]}

    def files_of(self, *names: str) -> list[Path]:
        """The files the stages ``names`` measured (their results' ``files``)."""
        return [Path(path) for name in names for path in self.results[name]["files"]]

    def examples(self, responses: dict) -> list[dict]:
        """The first ``config.examples`` held-out prompts with this stage's response and its gold."""
        count = min(self.config.examples, len(responses["responses"]))
        return [{"prompt": self.eval_prompts[i], "response": responses["responses"][i],
                 "gold": responses["golds"][i]} for i in range(count)]


def _cached_or_measure(run: PipelineRun, stage: str, files: Sequence[Path], upstream: Sequence[str],
                       measure: Callable[[], dict], extra=None) -> None:
    """Reuse the stage's stored measurement when its key matches, else ``measure()`` and store it.
    Sets ``run.results[stage]`` and ``run.reused[stage]`` (True when the stored measurement was reused)."""
    key = run.key(stage, files, upstream, extra)
    # plain JSON data (numpy numbers as Python's, NaN as None): a fresh result reads as a cached one will
    result, run.reused[stage] = cached_json(stage_file(run.profile, stage), key, lambda: report.plain_json(measure()))
    run.results[stage] = {"key": key, **result}


def _series(history: Sequence[dict], keys: Sequence[str], where: str) -> dict[str, list]:
    """Training curves: ``keys`` of the history rows that hold ``where`` (e.g. the evaluation rows)."""
    rows = [row for row in history if row.get(where) is not None]
    return {key: [row.get(key) for row in rows] for key in keys}


# ----- the stages: each builds (or loads) its model, then measures it; returns the files measured --


def stage_base(run: PipelineRun) -> list[Path]:
    model = stages.load_base_model(run.profile, run.device)
    folder = Path(run.profile.base_model)
    files = [folder / "model.safetensors"] if (folder / "model.safetensors").exists() else []

    def measure() -> dict:
        # No reward model or pi_ref exists yet: gold only (the reward-model stage scores these responses).
        metrics, responses = run.measure(model, with_reference=False, with_reward=False)
        metrics.update(parameters=count_parameters(model), train_prompts=len(load_prompts(run.profile, "train")),
                       eval_prompts=len(run.eval_prompts))
        summary = folder / "pretrain_summary.json"
        if summary.exists():
            metrics["validation_loss"] = json.loads(summary.read_text()).get("final_validation_loss")
        return {"metrics": metrics, "responses": responses, "examples": run.examples(responses)}

    _cached_or_measure(run, "base", files, (), measure, extra=run.profile.base_model)
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
        metrics = {**gold_summary(golds, texts, responses["ended"], len(run.eval_prompts)), "reward": None, "kl": None,
                   "samples_per_prompt": n, "train_records": len(records), "train_gold": round(mean_gold(records), 4)}
        return {"metrics": metrics, "responses": responses, "examples": run.examples(responses)}

    _cached_or_measure(run, "demonstrations", files, (), measure,
                       extra=[asdict(DemonstratorConfig()), EVAL_DEMONSTRATION_SEED, n])
    return files


def stage_sft(run: PipelineRun) -> list[Path]:
    policy, _, _ = run.sft()
    files = [stages.sft_dir(run.profile) / "model.safetensors"]

    def measure() -> dict:
        # best_of_n samples per prompt: a precise SFT gold, and best-of-n's candidates. No reward model yet (its
        # stage scores these responses); pi_ref is the frozen copy of this very model: the KL is 0 by definition.
        metrics, responses = run.measure(policy, with_reference=False, with_reward=False,
                                         samples_per_prompt=run.config.best_of_n)
        metrics["kl"] = 0.0
        summary = stages.sft_summary(run.profile)
        metrics.update(steps=summary.get("steps"), heldout_loss_before=summary.get("heldout_loss_before"),
                       heldout_loss_after=summary.get("heldout_loss_after"))
        return {"metrics": metrics, "responses": responses, "examples": run.examples(responses),
                "curves": _series(summary.get("history", []), ("step", "heldout_loss"), where="heldout_loss")}

    _cached_or_measure(run, "sft", files, (), measure, extra=run.config.best_of_n)
    return files


def stage_preferences(run: PipelineRun) -> list[Path]:
    entry = stages.ensure_preferences(run.profile, run.device, run.progress, rebuild="preferences" in run.rebuild)
    files = [entry.folder / stages.PREFERENCES_FILE]
    records = load_preferences(files[0])

    def measure() -> dict:
        temperature = PreferenceConfig.for_profile(run.profile).labeler_temperature
        gaps = np.array([abs(r["chosen_gold"] - r["rejected_gold"]) for r in records if "chosen_gold" in r])
        metrics = {"pairs": len(records), "prompts": len({r["prompt"] for r in records}),
                   "labels_agree_with_gold": round(gold_agreement(records), 4),
                   "labeler_accuracy_cap": round(labeler_accuracy_cap(records, temperature), 4),
                   "mean_gold_gap": round(float(gaps.mean()), 4) if len(gaps) else None}
        return {"metrics": metrics}

    _cached_or_measure(run, "preferences", files, (), measure)
    return files


def stage_reward_model(run: PipelineRun) -> list[Path]:
    reward_model, tokenizer, trained = run.reward_model()
    folder = stages.reward_model_path(run.profile)
    files = [folder / "model.safetensors", folder / "config.json"]  # the normalisation is in config.json

    def measure() -> dict:
        history = trained.get("history", [])
        train_losses = [row["loss"] for row in history if "loss" in row]  # the training steps' rows
        metrics = {
            "accuracy_labels": round(trained["heldout_accuracy_labels"], 4),
            "accuracy_gold": round(trained["heldout_accuracy_gold"], 4),
            "labeler_accuracy_cap": round(trained["labeler_accuracy_cap"], 4),
            "labels_agree_with_gold": round(trained["labels_agree_with_gold"], 4),
            "heldout_pairs": trained["heldout_pairs"], "train_pairs": trained["train_pairs"],
            "accuracy_before_training": round(history[0]["heldout_accuracy_labels"], 4) if history else None,
            "train_loss_last": round(train_losses[-1], 4) if train_losses else None,
        }
        # The reward model's view of what came before it, on the very held-out responses measured there.
        for stage in ("base", "demonstrations", "sft"):
            responses = run.results[stage]["responses"]
            prompts = run.repeated_prompts(len(responses["responses"]) // len(run.eval_prompts))
            scores = score_texts(reward_model, tokenizer, prompts, responses["responses"],
                                 batch_size=run.profile.generation_batch_size, ended=responses["ended"])
            metrics[f"{stage}_reward"] = round(float(scores.mean()), 4)
            if stage == "sft":
                metrics["reward_gold_correlation"] = round(float(np.corrcoef(scores, responses["golds"])[0, 1]), 4)
        curves = _series(history, ("step", "heldout_accuracy_labels", "heldout_accuracy_gold", "heldout_loss"),
                         where="heldout_accuracy_labels")
        train = _series(history, ("step", "loss"), where="loss")
        curves.update(train_step=train["step"], train_loss=train["loss"])
        return {"metrics": metrics, "curves": curves}

    _cached_or_measure(run, "reward_model", files, ("base", "demonstrations", "sft"), measure)
    return files


def stage_ppo(run: PipelineRun) -> list[Path]:
    config = PPOConfig.for_profile(run.profile)
    policy, history, samples = stages.load_or_train_ppo(run.profile, config, device=run.device,
                                                        progress=run.progress, rebuild="ppo" in run.rebuild)
    files = [stages.ppo_dir(run.profile, config) / "policy" / "model.safetensors"]

    def measure() -> dict:
        metrics, responses = run.measure(policy)
        last = history[-1] if history else {}
        metrics.update(iterations=len(history), kl_coef=config.kl_coef, adaptive_kl=config.adaptive_kl,
                       training_reward_last=last.get("reward_model_score"), training_gold_last=last.get("gold"),
                       training_kl_last=last.get("kl"))
        keys = ("iteration", "reward_model_score", "penalised_score", "gold", "kl", "kl_coef", "entropy", "length",
                "eos_fraction")
        return {"metrics": metrics, "responses": responses, "examples": run.examples(responses),
                "curves": _series(history, keys, where="iteration"), "training_samples": samples[-3:]}

    _cached_or_measure(run, "ppo", files + run.files_of("sft", "reward_model"), (), measure, extra=asdict(config))
    return files


def stage_dpo(run: PipelineRun) -> list[Path]:
    config = DPOConfig.for_profile(run.profile)
    policy, history = stages.load_or_train_dpo(run.profile, config.beta, device=run.device, progress=run.progress,
                                               config=config, rebuild="dpo" in run.rebuild)
    files = [stages.dpo_dir(run.profile, config.beta, config) / "model.safetensors"]

    def measure() -> dict:
        metrics, responses = run.measure(policy)
        curves = _series(history, ("step", "heldout_accuracy", "heldout_reward_margin", "heldout_loss"),
                         where="heldout_accuracy")
        metrics.update(beta=config.beta, loss_type=config.loss_type,
                       steps=max((row["step"] for row in history), default=0),
                       heldout_accuracy=curves["heldout_accuracy"][-1] if curves["step"] else None,
                       heldout_reward_margin=curves["heldout_reward_margin"][-1] if curves["step"] else None)
        return {"metrics": metrics, "responses": responses, "examples": run.examples(responses), "curves": curves}

    _cached_or_measure(run, "dpo", files + run.files_of("sft", "reward_model"), (), measure, extra=asdict(config))
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
        metrics = {"n": n, **gold_summary(golds, best.responses, best.ended, count),
                   "reward": round(float(best.scores.mean()), 4), "kl": round(float(best_of_n.analytic_kl(n)), 4),
                   "kl_measured": None, "candidates_reward": round(float(best.all_scores.mean()), 4),
                   "oracle_gold": round(float(all_golds.max(axis=1).mean()), 4)}
        if run.config.measured_kl_prompts > 0:
            measured = best_of_n.measure_kl(
                policy, tokenizer, run.eval_prompts[:run.config.measured_kl_prompts], n, score_fn,
                run.profile.max_new_tokens, samples_per_prompt=run.config.measured_kl_samples, seed=run.config.seed + 1,
                batch_size=run.profile.generation_batch_size, progress=run.progress)
            metrics.update(kl_measured=round(measured["kl"], 4), tied_fraction=round(measured["tied_fraction"], 4))
        chosen = {"responses": best.responses, "ended": best.ended, "golds": [round(float(g), 4) for g in golds]}
        # best-of-k for every k <= n from the same candidates (Gao et al.'s unbiased estimator); k = 1 is SFT
        return {"metrics": metrics, "responses": chosen, "examples": run.examples(chosen),
                "curves": best_of_n.best_of_k_curve(best.all_scores, all_golds, n)}

    _cached_or_measure(run, "best_of_n", run.files_of("reward_model"), ("sft",), measure,
                       extra=[n, run.config.measured_kl_prompts, run.config.measured_kl_samples])
    return []


STAGE_FUNCTIONS: dict[str, Callable[[PipelineRun], list[Path]]] = {
    "base": stage_base, "demonstrations": stage_demonstrations, "sft": stage_sft, "preferences": stage_preferences,
    "reward_model": stage_reward_model, "ppo": stage_ppo, "dpo": stage_dpo, "best_of_n": stage_best_of_n}


def run_pipeline(profile: Profile, out: str | Path, device=None, config: PipelineConfig | None = None,
                 fresh: str | None = None, until: str | None = None, progress: bool = True,
                 echo: Callable[[str], None] | None = print) -> dict:
    """Run the stages in order (up to ``until``), print a line per stage, write the outputs to
    ``out`` (``metrics.json``, ``curves.json``, ``report.md``, figures) and return the metrics.

    ``fresh``: None (reuse every cache), "all" (rebuild every stage) or a stage name (rebuild it and
    every stage built on it). Models are built on ``device`` (default: ``select_device()``)."""
    out = report.check_output_folder(out)
    config = config or PipelineConfig.for_profile(profile)
    device = device if device is not None else select_device()
    echo = echo or (lambda line: None)
    stop = STAGES.index(until) + 1 if until else len(STAGES)
    no_dataset_bars()  # loading a tiny checkpoint or a JSON file is instant: no bars for it among the stages'
    no_loading_bars()
    rebuild = stages_from(fresh) if fresh is not None else []
    if rebuild:
        deleted = clear_measurements(profile, rebuild)
        echo(f"--fresh: rebuilding {', '.join(rebuild)} (profile {profile.name}; "
             f"{len(deleted)} stored measurement(s) deleted)")
    seed_everything(config.seed)
    run = PipelineRun(profile, device, config, progress, rebuild)
    seconds, cached = {}, {}
    total_started = time.perf_counter()
    for number, stage in enumerate(STAGES[:stop], start=1):
        echo(f"[{number}/{stop}] {report.STAGE_TITLES[stage]}")
        started = time.perf_counter()
        files = STAGE_FUNCTIONS[stage](run)
        run.results[stage]["files"] = [str(path) for path in files]
        seconds[stage] = round(time.perf_counter() - started, 2)
        cached[stage] = run.reused[stage] and not any(path.stat().st_mtime >= run.started for path in files)
        echo(f"      {'cached' if cached[stage] else 'done'} in {seconds[stage]:.1f} s: "
             f"{report.stage_line(stage, run.results[stage]['metrics'])}")
    seconds["total"] = round(time.perf_counter() - total_started, 2)

    settings = {"profile": profile.name, "device": str(device), "config": asdict(config),
                "eval_prompts": len(run.eval_prompts), "max_new_tokens": profile.max_new_tokens}
    metrics = report.collect_metrics(settings, run.results, seconds, cached)
    report.write_outputs(metrics, run.results, out)
    echo("")
    echo(report.results_table(metrics))
    echo(f"\nmetrics, report and figures written to {out} ({seconds['total']:.0f} s"
         f"{', every stage cached' if all(cached.values()) else ''})")
    return metrics
