"""The whole course in one command: ``python -m rlhf_core run``.

The stages, in the order the chapters teach them:

    base            the pretrained model the course starts from (shipped in ``data/`` for tiny)
    demonstrations  what the simulated writers produce: the imitation ceiling
    sft             supervised fine-tuning on the demonstrations; its frozen copy is pi_ref
    preferences     pairs of SFT samples, compared by simulated labelers
    reward_model    r_phi(x, y) trained on those pairs (Bradley-Terry)
    ppo             the four-model RLHF loop: maximise r_phi with a KL penalty to pi_ref
    dpo             the same preference pairs, without a reward model or sampling
    best_of_n       no training: sample n responses from SFT, keep the one r_phi likes best

Every stage builds its model through the module that teaches it (``load_or_train_sft``,
``load_or_train_ppo``, ...), which caches it in ``cache_dir()/<profile>/``. Then the pipeline
*measures* it, the same way for every stage: one response per held-out prompt (the profile's
``n_eval_prompts`` eval prompts, the same sampling seed), scored by the hidden human (gold), by the
reward model and by the KL to pi_ref (the SFT model), with ``rlhf_core.evaluation.measure_policy``.
So the gold means of the rows compare.

The measurements are cached too, in ``cache_dir()/<profile>/pipeline/<stage>.json``, under a key
made of the content hashes of the weights they measured (and of the measurement settings): a rerun
skips every stage whose models have not changed and finishes in seconds; a stage whose model was
rebuilt is measured again. ``fresh`` deletes stages (their models and their measurements) so that
they are built again; only files of the selected profile inside ``cache_dir()`` are touched, never
``data/``, never other configurations' checkpoints (a chapter's PPO run with another beta) and never
preference labels a person made in chapter 01.

``run_pipeline`` returns the metrics and writes ``metrics.json``, ``curves.json``, ``report.md``
and PNG figures to the output folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .config import Profile, cache_dir, seed_everything

STAGES = ("base", "demonstrations", "sft", "preferences", "reward_model", "ppo", "dpo", "best_of_n")
STAGE_TITLES = {"base": "base model", "demonstrations": "demonstrations", "sft": "SFT",
                "preferences": "preference pairs", "reward_model": "reward model", "ppo": "PPO",
                "dpo": "DPO", "best_of_n": "best-of-n"}
# What each stage is built from: rebuilding a stage rebuilds (with ``fresh``) what depends on it.
DEPENDS_ON = {
    "base": (),
    "demonstrations": (),
    "sft": ("base", "demonstrations"),
    "preferences": ("sft",),
    "reward_model": ("preferences", "sft"),
    "ppo": ("sft", "reward_model"),
    "dpo": ("sft", "preferences"),
    "best_of_n": ("sft", "reward_model"),
}
FORMAT = 1  # version of the stage files; bump it when what a stage measures changes
FIGURES = ("gold_per_stage.png", "ppo_training.png", "gold_vs_kl.png", "reward_model.png", "dpo_training.png")


@dataclass(frozen=True)
class PipelineConfig:
    seed: int = 0  # sampling seed of every measurement (same prompts, same seed: rows compare)
    best_of_n: int = 8  # candidates per prompt for best-of-n (KL log n - (n-1)/n: 1.20 nats at 8);
    #                     SFT and the demonstrators are measured on as many samples per prompt (the candidates)
    measured_kl_prompts: int = 0  # held-out prompts on which best-of-n's KL is also measured (0: analytic only)
    measured_kl_samples: int = 128  # SFT samples per such prompt for the measured KL (should be >> best_of_n)
    examples: int = 3  # held-out prompts whose responses report.md shows for every stage

    @classmethod
    def for_profile(cls, profile: Profile, **overrides) -> "PipelineConfig":
        """The tiny and small profiles run on a CPU in minutes; on a GPU, best-of-16 with a measured KL."""
        if profile.name == "gpt2":
            overrides = {"best_of_n": 16, "measured_kl_prompts": 32, "measured_kl_samples": 256, **overrides}
        return cls(**overrides)


# ----------------------------------------------------------------------------------------------
# Cache files and --fresh


def profile_cache(profile: Profile) -> Path:
    """``cache_dir()/<profile>``: everything the stages of this profile build lives below it."""
    return cache_dir() / profile.name


def stage_file(profile: Profile, stage: str) -> Path:
    """Where a stage's measurement is cached."""
    return profile_cache(profile) / "pipeline" / f"{stage}.json"


def stage_paths(profile: Profile, stage: str) -> list[Path]:
    """The cache files and folders of a stage: what ``fresh`` deletes (its measurement included).
    The base model is not among them (shipped in ``data/``, or rebuilt with ``python -m rlhf_core
    pretrain``); PPO and DPO are the runs of the profile's default configs only."""
    from .demonstrations import META_FILE, demonstrations_path
    from .dpo import DPOConfig, dpo_dir
    from .preferences import preferences_path
    from .reward_model import reward_model_path
    from .rlhf import PPOConfig, ppo_dir
    from .sft import sft_dir

    paths: list[Path] = []
    if stage == "demonstrations":
        paths = [demonstrations_path(profile), demonstrations_path(profile).with_name(META_FILE)]
    elif stage == "sft":
        paths = [sft_dir(profile)]
    elif stage == "preferences":
        paths = [preferences_path(profile), preferences_path(profile).with_suffix(".config.json")]
    elif stage == "reward_model":
        folder = reward_model_path(profile)
        paths = [folder, folder.with_name(folder.name + ".partial")]
    elif stage == "ppo":
        paths = [ppo_dir(profile, PPOConfig.for_profile(profile))]
    elif stage == "dpo":
        config = DPOConfig.for_profile(profile)
        # the policy, and pi_ref's log-probs on the pairs (``load_or_train_dpo`` shares them between betas)
        paths = [dpo_dir(profile, config.beta, config), profile_cache(profile) / "dpo-reference-logps.json"]
    elif stage not in ("base", "best_of_n"):
        raise ValueError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}")
    return paths + [stage_file(profile, stage)]


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


def clear_stages(profile: Profile, stages: Sequence[str]) -> list[Path]:
    """Delete the cache files of ``stages`` (see ``stage_paths``); returns what was deleted.
    Refuses any path outside ``cache_dir()/<profile>``."""
    root = profile_cache(profile).resolve()
    deleted = []
    for stage in stages:
        for path in stage_paths(profile, stage):
            resolved = path.resolve()
            if resolved == root or root not in resolved.parents:
                raise RuntimeError(f"refusing to delete {path}: it is not inside {root}")
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            else:
                continue
            deleted.append(path)
    return deleted


def _write_json(path: Path, data) -> None:
    """Atomically: a half-written file never replaces a good one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(_plain(data), indent=1, allow_nan=False))
    partial.replace(path)


def _plain(value):
    """JSON-ready: numpy numbers become Python numbers, NaN and infinities become None."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    return value


# ----------------------------------------------------------------------------------------------
# The run


class PipelineRun:
    """The state shared by the stages of one run: profile, device, held-out prompts, loaded models."""

    def __init__(self, profile: Profile, device, config: PipelineConfig, progress: bool = True):
        from .prompts import load_prompts

        self.profile = profile
        self.device = device
        self.config = config
        self.progress = progress
        self.eval_prompts = load_prompts(profile, "eval", profile.n_eval_prompts)
        self.results: dict[str, dict] = {}  # stage -> {"key", "metrics", "curves", "responses", ...}
        self.reused: dict[str, bool] = {}  # stage -> its stored measurement was reused
        self.started = time.time()
        self._models: dict[str, tuple] = {}
        self._digests: dict[tuple, str] = {}

    # ----- models, loaded once per run (trained by their stage's module when missing) -----
    def sft(self):
        """(policy, reference, tokenizer): the SFT model and its frozen copy pi_ref."""
        if "sft" not in self._models:
            from .sft import load_or_train_sft

            self._models["sft"] = load_or_train_sft(self.profile, device=self.device, progress=self.progress)
        return self._models["sft"]

    def reward_model(self):
        """(reward_model, tokenizer, metrics) of the profile."""
        if "reward_model" not in self._models:
            from .reward_model import load_or_train_reward_model

            self._models["reward_model"] = load_or_train_reward_model(self.profile, device=self.device,
                                                                      progress=self.progress)
        return self._models["reward_model"]

    # ----- cache keys -----
    def digest(self, path: Path) -> str:
        """sha256 of a file's bytes (remembered for the run while the file is unchanged)."""
        stat = path.stat()
        memo = (str(path), stat.st_size, stat.st_mtime_ns)
        if memo not in self._digests:
            hasher = hashlib.sha256()
            with path.open("rb") as file:
                for block in iter(lambda: file.read(1 << 20), b""):
                    hasher.update(block)
            self._digests[memo] = hasher.hexdigest()
        return self._digests[memo]

    def key(self, stage: str, files: Sequence[Path], upstream: Sequence[str] = (), extra=None) -> str:
        """What a stage's measurement depends on: the files it measured, the keys of the stages
        whose results it reads, the measurement settings and the held-out prompts."""
        identity = {
            "format": FORMAT, "stage": stage, "profile": self.profile.name, "seed": self.config.seed,
            "examples": self.config.examples,
            "max_new_tokens": self.profile.max_new_tokens, "prompts": hashlib.sha256(
                json.dumps(self.eval_prompts).encode()).hexdigest(),
            "files": [self.digest(Path(path)) for path in files],
            "upstream": [self.results[name]["key"] for name in upstream], "extra": extra,
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def written_this_run(self, files: Sequence[Path]) -> bool:
        """True when one of ``files`` was (re)written since the run started (its stage was built)."""
        return any(Path(path).stat().st_mtime >= self.started for path in files)

    # ----- measuring -----
    def repeated_prompts(self, samples_per_prompt: int) -> list[str]:
        """The held-out prompts, ``samples_per_prompt`` times over: row j * P + i is the j-th sample of
        prompt i (the layout of ``best_of_n.sample_candidates``: the first P rows are one sample each)."""
        return list(self.eval_prompts) * samples_per_prompt

    def measure(self, policy, with_reference: bool = True, with_reward: bool = True,
                samples_per_prompt: int = 1) -> tuple[dict, dict]:
        """``measure_policy`` on the held-out prompts: (metrics, responses) of one stage."""
        from .evaluation import measure_policy

        _, reference, tokenizer = self.sft() if with_reference else (None, None, None)
        tokenizer = tokenizer or self.tokenizer()
        reward_model = self.reward_model()[0] if with_reward else None
        result = measure_policy(policy, reference, reward_model, tokenizer, self.repeated_prompts(samples_per_prompt),
                                self.profile.max_new_tokens, seed=self.config.seed,
                                batch_size=self.profile.generation_batch_size, progress=self.progress)
        metrics = {**result.summary(), "gold_se": self.standard_error(result.golds),
                   "reward": round(result.reward, 4) if with_reward else None,
                   "kl": round(result.kl, 4) if with_reference else None, "samples_per_prompt": samples_per_prompt}
        return metrics, {"responses": result.responses, "ended": result.ended,
                         "golds": [round(float(g), 4) for g in result.golds]}

    def standard_error(self, golds) -> float:
        """Standard error of a mean gold over the held-out prompts: the spread of the per-prompt means
        (samples of one prompt are not independent of each other) over sqrt(number of prompts)."""
        per_prompt = np.asarray(golds, dtype=float).reshape(-1, len(self.eval_prompts)).mean(axis=0)  # (P,)
        return round(float(per_prompt.std() / math.sqrt(len(per_prompt))), 4)

    def tokenizer(self):
        from .tokenizer import load_tokenizer

        if "tokenizer" not in self._models:
            self._models["tokenizer"] = load_tokenizer(self.profile.tokenizer)
        return self._models["tokenizer"]


def _examples(run: PipelineRun, responses: dict) -> list[dict]:
    count = min(run.config.examples, len(responses["responses"]))
    return [{"prompt": run.eval_prompts[i], "response": responses["responses"][i], "gold": responses["golds"][i]}
            for i in range(count)]


def _cached_or_measure(run: PipelineRun, stage: str, files: Sequence[Path], upstream: Sequence[str],
                       measure: Callable[[], dict], extra=None) -> bool:
    """Reuse the stage's stored measurement when its key matches, else ``measure()`` and store it.
    Sets ``run.results[stage]`` and ``run.reused[stage]`` (True when the stored measurement was reused)."""
    key = run.key(stage, files, upstream, extra)
    path = stage_file(run.profile, stage)
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError:
            stored = None
        if stored is not None and stored.get("key") == key:
            run.results[stage] = stored
            run.reused[stage] = True
            return True
    result = {"key": key, **measure()}
    _write_json(path, result)
    run.results[stage] = json.loads(path.read_text())  # exactly what a cached run will read back
    run.reused[stage] = False
    return False


# ----- the stages: each builds (or loads) its model, then measures it; returns the files measured --


def stage_base(run: PipelineRun) -> list[Path]:
    from .models import count_parameters
    from .prompts import load_prompts
    from .sft import load_base_model

    model = load_base_model(run.profile, run.device)
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
        return {"metrics": metrics, "responses": responses, "examples": _examples(run, responses)}

    _cached_or_measure(run, "base", files, (), measure, extra=run.profile.base_model)
    return files


def stage_demonstrations(run: PipelineRun) -> list[Path]:
    from .demonstrations import (EVAL_DEMONSTRATION_SEED, DemonstratorConfig, demonstrations_path,
                                 load_or_write_demonstrations, mean_gold, write_demonstrations)

    records = load_or_write_demonstrations(run.profile)
    files = [demonstrations_path(run.profile)]
    n = run.config.best_of_n

    def measure() -> dict:
        # The same demonstrators writing for the held-out prompts: the imitation ceiling, on the
        # prompts every other row is measured on (as many per prompt as SFT gets: equal precision).
        held_out = write_demonstrations(run.repeated_prompts(n), DemonstratorConfig(), seed=EVAL_DEMONSTRATION_SEED)
        golds = np.array([record["gold"] for record in held_out])
        responses = {"responses": [record["response"] for record in held_out], "ended": [True] * len(held_out),
                     "golds": [round(float(g), 4) for g in golds]}
        metrics = {"gold": round(float(golds.mean()), 4), "gold_std": round(float(golds.std()), 4),
                   "gold_se": run.standard_error(golds), "eos_fraction": 1.0,
                   "mean_words": round(float(np.mean([len(r["response"].split()) for r in held_out])), 2),
                   "reward": None, "kl": None, "samples_per_prompt": n,
                   "train_records": len(records), "train_gold": round(mean_gold(records), 4)}
        return {"metrics": metrics, "responses": responses, "examples": _examples(run, responses)}

    _cached_or_measure(run, "demonstrations", files, (), measure,
                       extra=[asdict(DemonstratorConfig()), EVAL_DEMONSTRATION_SEED, n])
    return files


def stage_sft(run: PipelineRun) -> list[Path]:
    from .sft import load_sft_summary, sft_dir

    policy, _, _ = run.sft()
    files = [sft_dir(run.profile) / "model.safetensors"]

    def measure() -> dict:
        # best_of_n samples per prompt: a precise SFT gold, and the candidates best-of-n picks from.
        # No reward model exists yet (the reward-model stage scores these responses), and pi_ref is
        # the frozen copy of this very model: the KL is 0 by definition.
        metrics, responses = run.measure(policy, with_reference=False, with_reward=False,
                                         samples_per_prompt=run.config.best_of_n)
        metrics["kl"] = 0.0
        summary = load_sft_summary(sft_dir(run.profile)) or {}
        metrics.update(steps=summary.get("steps"), heldout_loss_before=summary.get("heldout_loss_before"),
                       heldout_loss_after=summary.get("heldout_loss_after"))
        curves = {"step": [], "heldout_loss": []}
        for row in summary.get("history", []):
            if row.get("heldout_loss") is not None:
                curves["step"].append(row["step"])
                curves["heldout_loss"].append(row["heldout_loss"])
        return {"metrics": metrics, "responses": responses, "examples": _examples(run, responses),
                "curves": curves}

    _cached_or_measure(run, "sft", files, (), measure, extra=run.config.best_of_n)
    return files


def stage_preferences(run: PipelineRun) -> list[Path]:
    from .preferences import (PreferenceConfig, gold_agreement, labeler_accuracy_cap, load_or_build_preferences,
                              preferences_path)

    records = load_or_build_preferences(run.profile, device=run.device, progress=run.progress)
    files = [preferences_path(run.profile)]

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
    from .reward_model import history_last, reward_model_path, score_texts

    reward_model, tokenizer, trained = run.reward_model()
    folder = reward_model_path(run.profile)
    files = [folder / "model.safetensors", folder / "config.json"]  # the normalisation is in config.json

    def measure() -> dict:
        history = trained.get("history", [])
        metrics = {
            "accuracy_labels": round(trained["held_out_accuracy_labels"], 4),
            "accuracy_gold": round(trained["held_out_accuracy_gold"], 4),
            "labeler_accuracy_cap": round(trained["labeler_accuracy_cap"], 4),
            "labels_agree_with_gold": round(trained["labels_agree_with_gold"], 4),
            "held_out_pairs": trained["held_out_pairs"], "train_pairs": trained["train_pairs"],
            "accuracy_before_training": round(history[0]["held_out_accuracy_labels"], 4) if history else None,
            "train_loss_last": round(history_last(history, "train_loss"), 4) if history else None,
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
        curves = {name: [] for name in ("step", "held_out_accuracy_labels", "held_out_accuracy_gold",
                                        "held_out_loss")}
        for row in history:
            if "held_out_accuracy_labels" in row:
                for name in curves:
                    curves[name].append(row[name])
        curves["train_step"] = [row["step"] for row in history if "train_loss" in row]
        curves["train_loss"] = [row["train_loss"] for row in history if "train_loss" in row]
        return {"metrics": metrics, "curves": curves}

    _cached_or_measure(run, "reward_model", files, ("base", "demonstrations", "sft"), measure)
    return files


def stage_ppo(run: PipelineRun) -> list[Path]:
    from .rlhf import PPOConfig, load_or_train_ppo, ppo_dir

    config = PPOConfig.for_profile(run.profile)
    policy, history, samples = load_or_train_ppo(run.profile, config, device=run.device, progress=run.progress)
    files = [ppo_dir(run.profile, config) / "policy" / "model.safetensors"]

    def measure() -> dict:
        metrics, responses = run.measure(policy)
        last = history[-1] if history else {}
        metrics.update(iterations=len(history), kl_coef=config.kl_coef, adaptive_kl=config.adaptive_kl,
                       training_reward_last=last.get("reward"), training_gold_last=last.get("gold"),
                       training_kl_last=last.get("kl"))
        keys = ("iteration", "reward", "gold", "kl", "kl_coef", "entropy", "length", "eos_fraction")
        curves = {key: [row.get(key) for row in history] for key in keys}
        return {"metrics": metrics, "responses": responses, "examples": _examples(run, responses),
                "curves": curves, "training_samples": samples[-3:]}

    sft_files = [Path(p) for p in run.results["sft"]["files"]]
    rm_files = [Path(p) for p in run.results["reward_model"]["files"]]
    _cached_or_measure(run, "ppo", files + sft_files + rm_files, (), measure, extra=asdict(config))
    return files


def stage_dpo(run: PipelineRun) -> list[Path]:
    from .dpo import DPOConfig, dpo_dir, load_or_train_dpo

    config = DPOConfig.for_profile(run.profile)
    policy, history = load_or_train_dpo(run.profile, config.beta, device=run.device, progress=run.progress,
                                        config=config)
    files = [dpo_dir(run.profile, config.beta, config) / "model.safetensors"]

    def measure() -> dict:
        metrics, responses = run.measure(policy)
        held_out = [row for row in history if "held_out_accuracy" in row]
        metrics.update(beta=config.beta, loss_type=config.loss_type,
                       steps=max((row["step"] for row in history), default=0),
                       held_out_accuracy=held_out[-1]["held_out_accuracy"] if held_out else None,
                       held_out_reward_margin=held_out[-1]["held_out_reward_margin"] if held_out else None)
        curves = {"step": [row["step"] for row in held_out],
                  "held_out_accuracy": [row["held_out_accuracy"] for row in held_out],
                  "held_out_reward_margin": [row["held_out_reward_margin"] for row in held_out],
                  "held_out_loss": [row["held_out_loss"] for row in held_out]}
        return {"metrics": metrics, "responses": responses, "examples": _examples(run, responses),
                "curves": curves}

    sft_files = [Path(p) for p in run.results["sft"]["files"]]
    rm_files = [Path(p) for p in run.results["reward_model"]["files"]]
    _cached_or_measure(run, "dpo", files + sft_files + rm_files, (), measure, extra=asdict(config))
    return files


def stage_best_of_n(run: PipelineRun) -> list[Path]:
    from .best_of_n import (analytic_kl, expected_best_of_n, measure_kl, reward_model_score_fn, score_candidates,
                            select_best)

    policy, _, tokenizer = run.sft()
    reward_model = run.reward_model()[0]
    n = run.config.best_of_n

    def measure() -> dict:
        # The candidates are the SFT stage's n samples per prompt (row j * P + i: the j-th sample of
        # prompt i, exactly what ``best_of_n.best_of_n`` would draw with the same seed); the reward
        # model scores them all and the best one of each prompt is kept.
        sft = run.results["sft"]["responses"]
        count = len(run.eval_prompts)
        candidates = [[sft["responses"][j * count + i] for j in range(n)] for i in range(count)]
        candidates_ended = [[bool(sft["ended"][j * count + i]) for j in range(n)] for i in range(count)]
        all_golds = np.array(sft["golds"], dtype=float).reshape(n, count).T  # (P, n)
        score_fn = reward_model_score_fn(reward_model, tokenizer, batch_size=run.profile.generation_batch_size)
        all_scores = score_candidates(run.eval_prompts, candidates, candidates_ended, score_fn)  # (P, n)
        chosen = select_best(all_scores)  # (P,)
        rows = np.arange(count)
        golds, scores = all_golds[rows, chosen], all_scores[rows, chosen]  # (P,)
        responses = [candidates[i][j] for i, j in zip(rows, chosen)]
        metrics = {"n": n, "gold": round(float(golds.mean()), 4), "gold_std": round(float(golds.std()), 4),
                   "gold_se": run.standard_error(golds),
                   "reward": round(float(scores.mean()), 4), "kl": round(float(analytic_kl(n)), 4),
                   "kl_measured": None,
                   "eos_fraction": round(float(np.mean([candidates_ended[i][j] for i, j in zip(rows, chosen)])), 4),
                   "mean_words": round(float(np.mean([len(r.split()) for r in responses])), 2),
                   "candidates_reward": round(float(all_scores.mean()), 4),
                   "oracle_gold": round(float(all_golds.max(axis=1).mean()), 4)}
        if run.config.measured_kl_prompts > 0:
            measured = measure_kl(policy, tokenizer, run.eval_prompts[:run.config.measured_kl_prompts], n, score_fn,
                                  run.profile.max_new_tokens, samples_per_prompt=run.config.measured_kl_samples,
                                  seed=run.config.seed + 1, batch_size=run.profile.generation_batch_size,
                                  progress=run.progress)
            metrics.update(kl_measured=round(measured["kl"], 4), tied_fraction=round(measured["tied_fraction"], 4))
        # The whole best-of-k curve for k <= n from the same candidates (Gao et al.'s unbiased
        # estimator): gold and reward against the analytic KL, at no extra sampling. k = 1 is SFT.
        ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k < n] + [n]
        curves = {"n": ks, "kl": [float(analytic_kl(k)) for k in ks],
                  "gold": [float(expected_best_of_n(all_scores, all_golds, k).mean()) for k in ks],
                  "reward": [float(expected_best_of_n(all_scores, all_scores, k).mean()) for k in ks]}
        chosen_responses = {"responses": responses, "ended": [candidates_ended[i][j] for i, j in zip(rows, chosen)],
                            "golds": [round(float(g), 4) for g in golds]}
        return {"metrics": metrics, "responses": chosen_responses, "examples": _examples(run, chosen_responses),
                "curves": curves}

    rm_files = [Path(p) for p in run.results["reward_model"]["files"]]
    _cached_or_measure(run, "best_of_n", rm_files, ("sft",), measure,
                       extra=[n, run.config.measured_kl_prompts, run.config.measured_kl_samples])
    return []


STAGE_FUNCTIONS: dict[str, Callable[[PipelineRun], list[Path]]] = {
    "base": stage_base, "demonstrations": stage_demonstrations, "sft": stage_sft,
    "preferences": stage_preferences, "reward_model": stage_reward_model, "ppo": stage_ppo,
    "dpo": stage_dpo, "best_of_n": stage_best_of_n,
}


def run_pipeline(profile: Profile, out: str | Path, device=None, config: PipelineConfig | None = None,
                 fresh: str | None = None, until: str | None = None, progress: bool = True,
                 echo: Callable[[str], None] | None = print) -> dict:
    """Run the stages in order (up to ``until``), print a line per stage, write the outputs to
    ``out`` (``metrics.json``, ``curves.json``, ``report.md``, figures) and return the metrics.

    ``fresh``: None (reuse every cache), "all" (rebuild every stage) or a stage name (rebuild it and
    every stage built on it). Models are built on ``device`` (default: ``select_device()``)."""
    from .config import select_device

    config = config or PipelineConfig.for_profile(profile)
    device = device if device is not None else select_device()
    echo = echo or (lambda line: None)
    stop = STAGES.index(until) + 1 if until else len(STAGES)
    # Loading a tiny checkpoint or a JSON file is instant: no bars for it among the stages' bars.
    from datasets.utils.logging import disable_progress_bar as no_dataset_bars
    from transformers.utils.logging import disable_progress_bar as no_loading_bars

    no_dataset_bars()
    no_loading_bars()
    if fresh is not None:
        deleted = clear_stages(profile, stages_from(fresh))
        echo(f"--fresh: deleted {len(deleted)} cached file(s) and folder(s) of {', '.join(stages_from(fresh))} "
             f"(profile {profile.name})")
    seed_everything(config.seed)
    run = PipelineRun(profile, device, config, progress)
    seconds, cached = {}, {}
    total_started = time.perf_counter()
    for number, stage in enumerate(STAGES[:stop], start=1):
        echo(f"[{number}/{stop}] {STAGE_TITLES[stage]}")
        started = time.perf_counter()
        files = STAGE_FUNCTIONS[stage](run)
        run.results[stage]["files"] = [str(path) for path in files]
        seconds[stage] = round(time.perf_counter() - started, 2)
        cached[stage] = run.reused[stage] and not run.written_this_run(files)
        echo(f"      {'cached' if cached[stage] else 'done'} in {seconds[stage]:.1f} s: {_stage_line(stage, run.results[stage]['metrics'])}")
    seconds["total"] = round(time.perf_counter() - total_started, 2)

    metrics = collect_metrics(run, seconds, cached)
    write_outputs(run, metrics, Path(out))
    echo("")
    echo(results_table(metrics))
    echo(f"\nmetrics, report and figures written to {Path(out)} ({seconds['total']:.0f} s"
         f"{', every stage cached' if all(cached.values()) else ''})")
    return metrics


def _stage_line(stage: str, metrics: dict) -> str:
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


def collect_metrics(run: PipelineRun, seconds: dict, cached: dict) -> dict:
    """metrics.json: one dict per stage, plus the run's settings, seconds and cache hits."""
    metrics = {"profile": run.profile.name, "device": str(run.device), "config": asdict(run.config),
               "eval_prompts": len(run.eval_prompts), "max_new_tokens": run.profile.max_new_tokens}
    for stage, result in run.results.items():
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


POLICY_ROWS = ("base", "demonstrations", "sft", "ppo", "dpo", "best_of_n")


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
    lines = [f"profile {metrics['profile']}: gold on {metrics['eval_prompts']} held-out prompts, {_samples_note(metrics)}",
             text_table(policy_rows(metrics))]
    lines += _notes(metrics)
    failed = [name for name, ok in metrics["checks"].items() if not ok]
    if failed:
        lines.append("claims not met this run: " + ", ".join(failed))
    return "\n".join(lines)


def curves(run: PipelineRun) -> dict:
    return {stage: result["curves"] for stage, result in run.results.items() if "curves" in result}


def write_outputs(run: PipelineRun, metrics: dict, out: Path) -> list[Path]:
    """metrics.json, curves.json, the figures and report.md in ``out``; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:  # a figure of a stage that did not run this time must not linger
        (out / name).unlink(missing_ok=True)
    _write_json(out / "metrics.json", metrics)
    _write_json(out / "curves.json", curves(run))
    written = [out / "metrics.json", out / "curves.json"] + make_figures(metrics, curves(run), out)
    (out / "report.md").write_text(report(metrics, run, [path.name for path in written if path.suffix == ".png"]))
    return written + [out / "report.md"]


def make_figures(metrics: dict, curves: dict, out: Path) -> list[Path]:
    """PNG figures of the stages that ran (matplotlib's object API: no global backend is touched)."""
    from matplotlib.figure import Figure

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
        for column, (key, label) in enumerate([("reward", "reward-model score"), ("gold", "gold score"),
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
        axis.plot(rm["step"], rm["held_out_accuracy_labels"], marker=".", label="against the labels")
        axis.plot(rm["step"], rm["held_out_accuracy_gold"], marker=".", label="against the gold order")
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
        axis.plot(rm["step"], rm["held_out_loss"], marker=".", label="held out")
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
        axis.plot([dpo["step"][i] for i in trained], [dpo["held_out_accuracy"][i] for i in trained], marker=".")
        axis.axhline(0.5, color="gray", linestyle=":", linewidth=1, label="chance")
        axis.legend(fontsize=8)
        axis.set_xlabel("DPO step")
        axis.set_ylabel("held-out implicit-reward accuracy")
        axis = figure.add_subplot(1, 2, 2)
        axis.plot(dpo["step"], dpo["held_out_reward_margin"], marker=".")
        axis.set_xlabel("DPO step")
        axis.set_ylabel("held-out margin, beta * log-ratio")
        figure.suptitle(f"DPO training (beta {metrics['dpo']['beta']:g})")
        save(figure, "dpo_training.png")
    return written


def report(metrics: dict, run: PipelineRun, figures: Sequence[str]) -> str:
    """report.md: the table, the claims checked, the figures and a few held-out responses per stage."""
    lines = [f"# RLHF pipeline: {metrics['profile']} profile", "",
             f"Device {metrics['device']}; every policy answers the same {metrics['eval_prompts']} held-out "
             f"prompts ({_samples_note(metrics)}; sampling seed {metrics['config']['seed']}, at most "
             f"{metrics['max_new_tokens']} tokens). *+-* is the standard error of the mean gold. *gold* is the hidden human's score (never seen by training); *reward* is the reward "
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
    examples = {stage: run.results[stage].get("examples", []) for stage in POLICY_ROWS if stage in run.results}
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
