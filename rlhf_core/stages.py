"""The course's stages, each built from the ones before it and cached (``rlhf_core.cache``).

    base -> demonstrations -> sft -> preferences -> reward_model -> ppo
                                              \\-> dpo        (best-of-n and the measurements: pipeline)

Each ``ensure_<stage>`` returns the stage's ``StageEntry``: the cached result when its config and its
inputs are unchanged, else it builds it first (an interrupted training resumes from its checkpoint).
Each ``load_or_train_<stage>`` loads what the chapters need from that entry. The algorithms
themselves live in their own modules (``sft``, ``reward_model``, ``rlhf``, ``dpo``, ...); this module
only says where their results go and when a result can be reused.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from . import cache
from .config import Profile, cache_dir, get_profile, seed_everything, select_device
from .demonstrations import (
    DEMONSTRATION_SEED,
    DemonstratorConfig,
    load_demonstrations,
    save_demonstrations,
    write_demonstrations,
)
from .dpo import DPOConfig, reference_logps_for_rows, train_dpo, used_rows
from .generation import sample_responses
from .gold import GoldConfig, gold_scores
from .models import load_causal_lm, looks_like_path
from .preferences import (
    PreferenceConfig,
    build_preferences,
    gold_agreement,
    labeler_accuracy_cap,
    load_preferences,
    save_preferences,
    split_preferences,
)
from .pretrain import PretrainConfig, pretrain
from .prompts import load_prompts
from .reward_model import (
    RewardModelConfig,
    fit_normalization,
    load_reward_model,
    pairwise_accuracy,
    reward_model_from_policy,
    save_reward_model,
    score_batch,
    score_texts,
    train_reward_model,
)
from .rlhf import PPOConfig, ValueModel
from .rlhf_trainer import PPOTrainer
from .sft import SFTConfig, frozen_reference, train_sft
from .tokenizer import load_tokenizer

DEMONSTRATIONS_FILE = "demonstrations.jsonl"
PREFERENCES_FILE = "preferences.jsonl"


def _profile(profile: Profile | str | None) -> Profile:
    return profile if isinstance(profile, Profile) else get_profile(profile)


def _device(device) -> torch.device:
    return device if isinstance(device, torch.device) else select_device(device)


# ----- base model --------------------------------------------------------------------------------
def base_identity(profile: Profile) -> str:
    """What identifies the base model: a hub name as such, a local folder by its weights."""
    if not profile.offline and not looks_like_path(profile.base_model):
        return f"hub:{profile.base_model}"
    ensure_base(profile)
    return cache.weights_identity(profile.base_model)


def ensure_base(profile: Profile, device=None, progress: bool = True) -> None:
    """An offline profile's base model: the shipped one (tiny), or pretrained into its folder when
    missing or pretrained with another config (small). A hub model needs nothing here."""
    if not profile.offline:
        return
    folder = Path(profile.base_model)
    weights = folder / "model.safetensors"
    problem = cache.safetensors_problem(weights) if weights.exists() else "model.safetensors is missing"
    summary_path = folder / "pretrain_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    config = PretrainConfig.for_profile(profile)
    if problem is None and summary.get("finished") and summary.get("config") == asdict(config):
        return
    if profile.name == "tiny" and problem is not None:  # shipped in git: never overwritten silently
        raise cache.DamagedCacheError(
            f"the shipped base model in {folder} is damaged ({problem}): restore it with `git checkout -- {folder}`"
        )
    if profile.name == "tiny":
        return  # the shipped model is the course's reference, whatever config made it
    print(f"base model in {folder}: {problem or 'pretrained with another config'}; pretraining it now")
    pretrain(profile, folder, config, tokenizer=load_tokenizer(profile.tokenizer), device=device or "cpu",
             progress=progress)


def load_base_model(profile: Profile | str | None = None, device=None):
    """The profile's pretrained base model (an offline one is pretrained first when missing)."""
    profile = _profile(profile)
    ensure_base(profile, device)
    return load_causal_lm(profile.base_model, device=device)


# ----- demonstrations ----------------------------------------------------------------------------
def ensure_demonstrations(profile: Profile | str | None = None, rebuild: bool = False) -> cache.StageEntry:
    """The standard demonstrations: one per train prompt, written by ``DemonstratorConfig()``."""
    profile = _profile(profile)
    prompts = load_prompts(profile, "train")
    inputs = {"seed": DEMONSTRATION_SEED, "prompts": cache.stable_hash(prompts)}
    entry = cache.stage_entry(profile, "demonstrations", DemonstratorConfig(), inputs)
    if rebuild:
        cache.remove(entry)
    if not cache.is_finished(entry):
        records = write_demonstrations(prompts, DemonstratorConfig(), DEMONSTRATION_SEED)
        save_demonstrations(entry.folder / DEMONSTRATIONS_FILE, records)
        cache.finish(entry, [DEMONSTRATIONS_FILE])
    return entry


def load_or_write_demonstrations(profile: Profile | str | None = None):
    """The standard demonstrations as a ``datasets.Dataset`` (prompt, response, gold, ...)."""
    return load_demonstrations(ensure_demonstrations(profile).folder / DEMONSTRATIONS_FILE)


# ----- SFT ---------------------------------------------------------------------------------------
def sft_entry(profile: Profile | str | None = None, config: SFTConfig | None = None) -> cache.StageEntry:
    profile = _profile(profile)
    config = config or SFTConfig.for_profile(profile)
    inputs = {"base": base_identity(profile), "demonstrations": ensure_demonstrations(profile).digest}
    return cache.stage_entry(profile, "sft", config, inputs)


def sft_dir(profile: Profile | str | None = None, config: SFTConfig | None = None) -> Path:
    """Where the SFT model of this config and these inputs is (or will be) cached."""
    return sft_entry(profile, config).folder


def ensure_sft(profile: Profile | str | None = None, device=None, progress: bool = True,
               config: SFTConfig | None = None, callback: Callable[[dict], None] | None = None,
               rebuild: bool = False) -> cache.StageEntry:
    profile = _profile(profile)
    entry = sft_entry(profile, config)
    if rebuild:
        cache.remove(entry)
    if not cache.is_finished(entry):
        config = config or SFTConfig.for_profile(profile)
        tokenizer = load_tokenizer(profile.tokenizer)
        records = load_or_write_demonstrations(profile)
        base = load_base_model(profile, _device(device))
        train_sft(base, tokenizer, records, config, out_dir=entry.folder, resume=True, progress=progress,
                  callback=callback)
        cache.finish(entry, ["model.safetensors", "config.json", "sft_summary.json"])
    return entry


def load_or_train_sft(profile: Profile | str | None = None, device=None, progress: bool = True,
                      config: SFTConfig | None = None, callback: Callable[[dict], None] | None = None,
                      rebuild: bool = False):
    """``(policy, reference, tokenizer)``: the SFT model and its frozen copy pi_ref."""
    profile = _profile(profile)
    entry = ensure_sft(profile, device, progress, config, callback, rebuild)
    policy = load_causal_lm(entry.folder, device=_device(device))
    return policy, frozen_reference(policy), load_tokenizer(profile.tokenizer)


def sft_summary(profile: Profile | str | None = None, config: SFTConfig | None = None) -> dict:
    """The finished SFT run's summary (config, loss history, held-out losses, seconds)."""
    return json.loads((ensure_sft(profile, config=config).folder / "sft_summary.json").read_text())


# ----- preference pairs --------------------------------------------------------------------------
def ensure_preferences(profile: Profile | str | None = None, device=None, progress: bool = True,
                       config: PreferenceConfig | None = None, rebuild: bool = False) -> cache.StageEntry:
    """Pairs of SFT samples labelled by the simulated labeler (rebuilt when the SFT model changes)."""
    profile = _profile(profile)
    config = config or PreferenceConfig.for_profile(profile)
    sft = ensure_sft(profile, device, progress)
    # the simulated labeler follows the gold: a change to the gold's settings rebuilds the labels
    entry = cache.stage_entry(profile, "preferences", config, {"sft": sft.digest, "gold": asdict(GoldConfig())})
    if rebuild:
        cache.remove(entry)
    if not cache.is_finished(entry):
        policy = load_causal_lm(sft.folder, device=_device(device))
        prompts = load_prompts(profile, "train", config.n_prompts)
        records = build_preferences(policy, load_tokenizer(profile.tokenizer), prompts, config, seed=config.seed,
                                    progress=progress)
        save_preferences(entry.folder / PREFERENCES_FILE, records)
        cache.finish(entry, [PREFERENCES_FILE])
    return entry


def load_or_build_preferences(profile: Profile | str | None = None, device=None, progress: bool = True,
                              config: PreferenceConfig | None = None) -> list[dict]:
    entry = ensure_preferences(profile, device, progress, config)
    return load_preferences(entry.folder / PREFERENCES_FILE)


# ----- reward model ------------------------------------------------------------------------------
def reward_model_entry(profile: Profile | str | None = None, config: RewardModelConfig | None = None,
                       device=None, progress: bool = True) -> cache.StageEntry:
    profile = _profile(profile)
    config = config or RewardModelConfig.for_profile(profile)
    inputs = {"sft": ensure_sft(profile, device, progress).digest,
              "preferences": ensure_preferences(profile, device, progress).digest}
    return cache.stage_entry(profile, "reward_model", config, inputs)


def reward_model_path(profile: Profile | str | None = None, config: RewardModelConfig | None = None) -> Path:
    return reward_model_entry(profile, config).folder


def finish_reward_model(profile: Profile, reward_model, tokenizer, policy, config: RewardModelConfig,
                        train_records: Sequence[dict], heldout_records: Sequence[dict], history: list[dict],
                        seconds: float) -> dict:
    """After training: normalise the scores on fresh SFT samples (mean 0, std 1), measure, and cache
    the model as the profile's reward model for this config. Returns its metrics."""
    entry = reward_model_entry(profile, config)
    # fresh samples of the SFT policy: the last train prompts, a seed unlike the preference data's
    prompts = load_prompts(profile, "train")[-config.n_normalization_prompts:]
    responses, ended = sample_responses(policy, tokenizer, prompts, profile.max_new_tokens, temperature=1.0,
                                        batch_size=profile.generation_batch_size, seed=config.seed + 1000)
    raw = fit_normalization(reward_model, tokenizer, prompts, responses, ended, config.score_batch_size)
    rewards = score_texts(reward_model, tokenizer, prompts, responses, config.score_batch_size, ended=ended)
    golds = gold_scores(prompts, responses, ended)  # for the learner's measurement only
    heldout = pairwise_accuracy(reward_model, tokenizer, heldout_records, config.score_batch_size)
    metrics = {
        "profile": profile.name,
        "train_pairs": len(train_records),
        "heldout_pairs": len(heldout_records),
        "heldout_accuracy_labels": heldout["accuracy_labels"],
        "heldout_accuracy_gold": heldout["accuracy_gold"],
        "heldout_loss": heldout["loss"],
        "labeler_accuracy_cap": labeler_accuracy_cap(
            heldout_records, PreferenceConfig.for_profile(profile).labeler_temperature
        ),
        "labels_agree_with_gold": gold_agreement(heldout_records),
        "reward_gold_correlation": float(np.corrcoef(rewards, golds)[0, 1]),
        "raw_score_mean": raw["mean"],
        "raw_score_std": raw["std"],
        "training_seconds": round(seconds, 1),
        "config": asdict(config),
        "history": history,
    }
    save_reward_model(reward_model, entry.folder, tokenizer, metrics)
    cache.finish(entry, ["model.safetensors", "config.json", "metrics.json"])
    return metrics


def ensure_reward_model(profile: Profile | str | None = None, device=None, progress: bool = True,
                        config: RewardModelConfig | None = None, callback: Callable[[dict], None] | None = None,
                        rebuild: bool = False) -> cache.StageEntry:
    profile = _profile(profile)
    config = config or RewardModelConfig.for_profile(profile)
    entry = reward_model_entry(profile, config, device, progress)
    if rebuild:
        cache.remove(entry)
    if not cache.is_finished(entry):
        device = _device(device)
        policy, _reference, tokenizer = load_or_train_sft(profile, device, progress)
        records = load_or_build_preferences(profile, device, progress)
        train_records, heldout_records = split_preferences(records, config.heldout_fraction, config.seed)
        seed_everything(config.seed)
        reward_model = reward_model_from_policy(policy)
        started = time.perf_counter()
        reward_model, history = train_reward_model(reward_model, tokenizer, train_records, heldout_records, config,
                                                   progress, out_dir=entry.folder / "training", callback=callback)
        finish_reward_model(profile, reward_model, tokenizer, policy, config, train_records, heldout_records,
                            history, time.perf_counter() - started)
    return entry


def load_or_train_reward_model(profile: Profile | str | None = None, device=None, progress: bool = True,
                               config: RewardModelConfig | None = None,
                               callback: Callable[[dict], None] | None = None, rebuild: bool = False):
    """``(reward_model, tokenizer, metrics)``: normalised so that SFT samples score 0 +- 1."""
    profile = _profile(profile)
    entry = ensure_reward_model(profile, device, progress, config, callback, rebuild)
    metrics = json.loads((entry.folder / "metrics.json").read_text())
    return load_reward_model(entry.folder, _device(device)), load_tokenizer(profile.tokenizer), metrics


# ----- PPO ---------------------------------------------------------------------------------------
def ppo_entry(profile: Profile | str | None = None, config: PPOConfig | None = None, device=None,
              progress: bool = True) -> cache.StageEntry:
    profile = _profile(profile)
    config = config or PPOConfig.for_profile(profile)
    inputs = {"sft": ensure_sft(profile, device, progress).digest,
              "reward_model": ensure_reward_model(profile, device, progress).digest}
    label = f"beta{config.kl_coef:g}{'-adaptive' if config.adaptive_kl else ''}"
    return cache.stage_entry(profile, "ppo", config, inputs, label)


def ppo_dir(profile: Profile | str | None = None, config: PPOConfig | None = None) -> Path:
    return ppo_entry(profile, config).folder


def build_ppo_trainer(profile: Profile | str | None = None, config: PPOConfig | None = None, device=None,
                      progress: bool = True) -> PPOTrainer:
    """The four models: policy and reference from SFT, the reward model, and a value model (from
    the reward model, or a head on the policy's trunk). Prompts: the profile's training prompts."""
    profile = _profile(profile)
    config = config or PPOConfig.for_profile(profile)
    device = _device(device)
    policy, reference, tokenizer = load_or_train_sft(profile, device, progress)
    reward_model, _, _ = load_or_train_reward_model(profile, device, progress)
    value_model = (ValueModel.on_policy_trunk(policy) if config.shared_value_trunk
                   else ValueModel.from_reward_model(reward_model)).to(device)
    torch.manual_seed(config.seed)
    return PPOTrainer(policy, reference, reward_model, value_model, tokenizer, load_prompts(profile, "train"),
                      config, score_batch)


def save_history(history: list[dict], folder: str | Path) -> tuple[Path, Path]:
    """The per-iteration records as ``history.csv`` (spreadsheets, pandas) and ``history.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(key for record in history for key in record))
    with open(folder / "history.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=names)
        writer.writeheader()
        writer.writerows(history)
    cache.write_json_atomically(folder / "history.json", history)
    return folder / "history.csv", folder / "history.json"


def load_or_train_ppo(profile: Profile | str | None = None, config: PPOConfig | None = None, device=None,
                      progress: bool = True, callback: Callable[[dict], None] | None = None,
                      rebuild: bool = False):
    """``(policy, history, samples)`` of a finished PPO run with this config against this SFT model
    and this reward model: from the cache, or trained now (checkpointed, resumable)."""
    profile = _profile(profile)
    config = config or PPOConfig.for_profile(profile)
    entry = ppo_entry(profile, config, device, progress)
    if rebuild:
        cache.remove(entry)
    if not cache.is_finished(entry):
        trainer = build_ppo_trainer(profile, config, device, progress)
        started = time.perf_counter()
        trainer.train(checkpoint_dir=entry.folder / "checkpoint", callback=callback, progress=progress)
        trainer.policy.save_pretrained(entry.folder / "policy", safe_serialization=True)
        summary = {"config": asdict(config), "seconds_this_run": round(time.perf_counter() - started, 1),
                   "history": trainer.history, "samples": trainer.samples}
        cache.write_json_atomically(entry.folder / "ppo_summary.json", summary)
        save_history(trainer.history, entry.folder)
        shutil.rmtree(entry.folder / "checkpoint", ignore_errors=True)  # the final policy replaces it
        cache.finish(entry, ["policy/model.safetensors", "policy/config.json", "ppo_summary.json"])
    summary = json.loads((entry.folder / "ppo_summary.json").read_text())
    policy = load_causal_lm(entry.folder / "policy", device=_device(device))
    return policy, summary["history"], summary["samples"]


# ----- DPO ---------------------------------------------------------------------------------------
def _dpo_config(profile: Profile, beta: float | None, config: DPOConfig | None) -> DPOConfig:
    config = config or DPOConfig.for_profile(profile)
    return replace(config, beta=beta) if beta is not None else config


def dpo_entry(profile: Profile | str | None = None, beta: float | None = None, config: DPOConfig | None = None,
              device=None, progress: bool = True) -> cache.StageEntry:
    profile = _profile(profile)
    config = _dpo_config(profile, beta, config)
    inputs = {"sft": ensure_sft(profile, device, progress).digest,
              "preferences": ensure_preferences(profile, device, progress).digest}
    return cache.stage_entry(profile, "dpo", config, inputs, f"beta{config.beta:g}")


def dpo_dir(profile: Profile | str | None = None, beta: float | None = None, config: DPOConfig | None = None) -> Path:
    return dpo_entry(profile, beta, config).folder


def cached_reference_logps(path: Path, reference, tokenizer, records: Sequence[dict], rows: Sequence[int] | None,
                           batch_size: int, max_response_tokens: int | None,
                           progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """pi_ref's sequence log-probs of the pairs' chosen and rejected responses, ``(N,)`` each,
    computed once per pair and kept in ``path`` (shared by every beta: pi_ref does not change)."""
    rows = list(range(len(records))) if rows is None else list(rows)
    store: dict[str, list[float]] = {}
    if path.exists():
        try:
            store = json.loads(path.read_text())
        except json.JSONDecodeError:
            store = {}  # a damaged file is recomputed, never served
    keys = [cache.stable_hash([r["prompt"], r["chosen"], r["rejected"], r.get("chosen_ended", True),
                               r.get("rejected_ended", True)], 24) for r in records]
    missing = [row for row in rows if keys[row] not in store]
    chosen, rejected = reference_logps_for_rows(reference, tokenizer, records, missing, batch_size,
                                                max_response_tokens, progress)
    for row in missing:
        store[keys[row]] = [float(chosen[row]), float(rejected[row])]
    for row in rows:
        chosen[row], rejected[row] = store[keys[row]]
    if missing:
        cache.write_json_atomically(path, store)
    return chosen, rejected


def load_or_train_dpo(profile: Profile | str | None = None, beta: float | None = None, device=None,
                      progress: bool = True, config: DPOConfig | None = None, rebuild: bool = False):
    """``(policy, history)``: DPO from the SFT policy on the simulated preference pairs, split by
    prompt; one cached policy per config (``beta`` overrides the config's)."""
    profile = _profile(profile)
    config = _dpo_config(profile, beta, config)
    entry = dpo_entry(profile, None, config, device, progress)
    if rebuild:
        cache.remove(entry)
    if not cache.is_finished(entry):
        device = _device(device)
        policy, reference, tokenizer = load_or_train_sft(profile, device, progress)
        records = load_or_build_preferences(profile, device, progress)
        train_records, heldout_records = split_preferences(records, config.heldout_fraction, config.seed)
        heldout_records = heldout_records[: config.max_heldout_pairs]
        # pi_ref's log-probs depend only on the SFT model and the cut: one file for every beta
        reference_file = cache_dir() / profile.name / (
            f"dpo-reference-logps-{cache.stable_hash([entry.inputs['sft'], config.max_response_tokens])}.json"
        )
        reference_logps = cached_reference_logps(reference_file, reference, tokenizer, train_records,
                                                 used_rows(len(train_records), config), config.eval_batch_size,
                                                 config.max_response_tokens, progress)
        heldout_reference_logps = cached_reference_logps(reference_file, reference, tokenizer, heldout_records,
                                                         None, config.eval_batch_size, config.max_response_tokens,
                                                         progress)
        train_dpo(policy, reference, tokenizer, train_records, heldout_records, config, out_dir=entry.folder,
                  resume=True, progress=progress, reference_logps=reference_logps,
                  heldout_reference_logps=heldout_reference_logps)
        cache.finish(entry, ["model.safetensors", "config.json", "dpo_summary.json"])
    summary = json.loads((entry.folder / "dpo_summary.json").read_text())
    return load_causal_lm(entry.folder, device=_device(device)), summary["history"]


# ----- critic-free (GRPO, Dr. GRPO, RLOO) ------------------------------------------------------
from .grpo import CriticFreeConfig, CriticFreeTrainer  # noqa: E402  (to move into the imports at the top)


def critic_free_entry(profile: Profile | str | None = None, config: CriticFreeConfig | None = None, device=None,
                      progress: bool = True) -> cache.StageEntry:
    profile = _profile(profile)
    config = config or CriticFreeConfig.for_profile(profile)
    inputs = {"sft": ensure_sft(profile, device, progress).digest,
              "reward_model": ensure_reward_model(profile, device, progress).digest}
    return cache.stage_entry(profile, "critic_free", config, inputs, label=config.method)


def build_critic_free_trainer(profile: Profile | str | None = None, config: CriticFreeConfig | None = None,
                              device=None, progress: bool = True) -> CriticFreeTrainer:
    """The three models: policy and reference from SFT, the reward model; no value model. Prompts: the
    profile's training prompts (PPO's)."""
    profile = _profile(profile)
    config = config or CriticFreeConfig.for_profile(profile)
    device = _device(device)
    policy, reference, tokenizer = load_or_train_sft(profile, device, progress)
    reward_model, _, _ = load_or_train_reward_model(profile, device, progress)
    torch.manual_seed(config.seed)
    return CriticFreeTrainer(policy, reference, reward_model, tokenizer, load_prompts(profile, "train"), config,
                             score_batch)


def load_or_train_critic_free(profile: Profile | str | None = None, config: CriticFreeConfig | None = None,
                              device=None, progress: bool = True, callback: Callable[[dict], None] | None = None,
                              rebuild: bool = False):
    """``(policy, history, samples)`` of a finished critic-free run (GRPO, Dr. GRPO or RLOO, as
    ``config.method`` says; default ``CriticFreeConfig.for_profile(profile)``, GRPO) against this SFT
    model and this reward model: from the cache, or trained now (checkpointed, resumable)."""
    profile = _profile(profile)
    config = config or CriticFreeConfig.for_profile(profile)
    entry = critic_free_entry(profile, config, device, progress)
    if rebuild:
        cache.remove(entry)
    if not cache.is_finished(entry):
        trainer = build_critic_free_trainer(profile, config, device, progress)
        started = time.perf_counter()
        trainer.train(checkpoint_dir=entry.folder / "checkpoint", callback=callback, progress=progress)
        trainer.policy.save_pretrained(entry.folder / "policy", safe_serialization=True)
        summary = {"config": asdict(config), "seconds_this_run": round(time.perf_counter() - started, 1),
                   "history": trainer.history, "samples": trainer.samples}
        cache.write_json_atomically(entry.folder / "critic_free_summary.json", summary)
        save_history(trainer.history, entry.folder)
        shutil.rmtree(entry.folder / "checkpoint", ignore_errors=True)  # the final policy replaces it
        cache.finish(entry, ["policy/model.safetensors", "policy/config.json", "critic_free_summary.json"])
    summary = json.loads((entry.folder / "critic_free_summary.json").read_text())
    policy = load_causal_lm(entry.folder / "policy", device=_device(device))
    return policy, summary["history"], summary["samples"]
