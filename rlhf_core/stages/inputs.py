"""The stages every policy optimiser shares: the base model, the demonstrations, SFT, the preference
pairs and the reward model (see ``rlhf_core.stages``)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .. import cache, distributed
from ..config import Profile, get_profile, seed_everything, select_device
from ..demonstrations import (
    DEMONSTRATION_SEED,
    DemonstratorConfig,
    load_demonstrations,
    save_demonstrations,
    write_demonstrations,
)
from ..generation import sample_responses
from ..gold import GoldConfig, gold_scores
from ..lora import AdapterOffReference, add_lora, merged_copy
from ..models import load_causal_lm, load_reward_model, looks_like_path, save_reward_model
from ..preferences import (
    PreferenceConfig,
    build_preferences,
    gold_agreement,
    labeler_accuracy_cap,
    load_preferences,
    save_preferences,
    split_preferences,
)
from ..pretrain import PretrainConfig, pretrain
from ..prompts import load_prompts
from ..reward_model import (
    RewardModelConfig,
    fit_normalization,
    pairwise_accuracy,
    reward_model_from_policy,
    score_texts,
    train_reward_model,
)
from ..sft import SFTConfig, frozen_reference, train_sft
from ..tokenizer import load_tokenizer

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
    pretrain(
        profile, folder, config, tokenizer=load_tokenizer(profile.tokenizer), device=device or "cpu", progress=progress
    )


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
        if distributed.is_main_process():  # several processes build it alike; one writes (cache.finish waits)
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


def ensure_sft(
    profile: Profile | str | None = None,
    device=None,
    progress: bool = True,
    config: SFTConfig | None = None,
    callback: Callable[[dict], None] | None = None,
    rebuild: bool = False,
) -> cache.StageEntry:
    profile = _profile(profile)
    entry = sft_entry(profile, config)
    if rebuild:
        cache.remove(entry)
    if not cache.is_finished(entry):
        config = config or SFTConfig.for_profile(profile)
        tokenizer = load_tokenizer(profile.tokenizer)
        records = load_or_write_demonstrations(profile)
        base = load_base_model(profile, _device(device))
        if config.lora_rank:  # adapters on the frozen base, merged into it when saved (rlhf_core.lora)
            base = add_lora(base, config.lora_rank)
        train_sft(
            base, tokenizer, records, config, out_dir=entry.folder, resume=True, progress=progress, callback=callback
        )
        cache.finish(entry, ["model.safetensors", "config.json", "sft_summary.json"])
    return entry


def load_or_train_sft(
    profile: Profile | str | None = None,
    device=None,
    progress: bool = True,
    config: SFTConfig | None = None,
    callback: Callable[[dict], None] | None = None,
    rebuild: bool = False,
):
    """``(policy, reference, tokenizer)``: the SFT model and its frozen copy pi_ref."""
    profile = _profile(profile)
    entry = ensure_sft(profile, device, progress, config, callback, rebuild)
    policy = load_causal_lm(entry.folder, device=_device(device))
    return policy, frozen_reference(policy), load_tokenizer(profile.tokenizer)


def sft_policy_and_reference(
    profile: Profile | str | None = None, lora_rank: int = 0, device=None, progress: bool = True
):
    """``(policy, reference, tokenizer)`` for a trainer that starts from the SFT model: with ``lora_rank``
    0, the SFT model and its frozen copy pi_ref (``load_or_train_sft``); else the SFT model with LoRA
    adapters of that rank, and pi_ref the same model with its adapters off (``lora.AdapterOffReference``:
    no second copy of the weights)."""
    if not lora_rank:
        return load_or_train_sft(profile, device, progress)
    profile = _profile(profile)
    policy = add_lora(load_causal_lm(ensure_sft(profile, device, progress).folder, device=_device(device)), lora_rank)
    return policy, AdapterOffReference(policy), load_tokenizer(profile.tokenizer)


def sft_summary(profile: Profile | str | None = None, config: SFTConfig | None = None) -> dict:
    """The finished SFT run's summary (config, loss history, held-out losses, seconds)."""
    return json.loads((ensure_sft(profile, config=config).folder / "sft_summary.json").read_text())


# ----- preference pairs --------------------------------------------------------------------------
def ensure_preferences(
    profile: Profile | str | None = None,
    device=None,
    progress: bool = True,
    config: PreferenceConfig | None = None,
    rebuild: bool = False,
) -> cache.StageEntry:
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
        records = distributed.on_main(  # several processes: the main one samples and writes, as one process would
            lambda: build_preferences(
                policy, load_tokenizer(profile.tokenizer), prompts, config, seed=config.seed, progress=progress
            )
        )
        if distributed.is_main_process():
            save_preferences(entry.folder / PREFERENCES_FILE, records)
        cache.finish(entry, [PREFERENCES_FILE])
    return entry


def load_or_build_preferences(
    profile: Profile | str | None = None, device=None, progress: bool = True, config: PreferenceConfig | None = None
) -> list[dict]:
    entry = ensure_preferences(profile, device, progress, config)
    return load_preferences(entry.folder / PREFERENCES_FILE)


# ----- reward model ------------------------------------------------------------------------------
def reward_model_entry(
    profile: Profile | str | None = None, config: RewardModelConfig | None = None, device=None, progress: bool = True
) -> cache.StageEntry:
    profile = _profile(profile)
    config = config or RewardModelConfig.for_profile(profile)
    inputs = {
        "sft": ensure_sft(profile, device, progress).digest,
        "preferences": ensure_preferences(profile, device, progress).digest,
    }
    return cache.stage_entry(profile, "reward_model", config, inputs)


def reward_model_path(profile: Profile | str | None = None, config: RewardModelConfig | None = None) -> Path:
    return reward_model_entry(profile, config).folder


def finish_reward_model(
    profile: Profile,
    reward_model,
    tokenizer,
    policy,
    config: RewardModelConfig,
    train_records: Sequence[dict],
    heldout_records: Sequence[dict],
    history: list[dict],
    seconds: float,
) -> dict:
    """After training: normalise the scores on fresh SFT samples (mean 0, std 1), measure, and cache
    the model as the profile's reward model for this config. Returns its metrics."""
    entry = reward_model_entry(profile, config)
    # fresh samples of the SFT policy: the last train prompts, a seed unlike the preference data's
    prompts = load_prompts(profile, "train")[-config.n_normalization_prompts :]
    responses, ended = distributed.on_main(  # several processes: one seeded stream, sampled by the main one
        lambda: sample_responses(
            policy,
            tokenizer,
            prompts,
            profile.max_new_tokens,
            temperature=1.0,
            batch_size=profile.generation_batch_size,
            seed=config.seed + 1000,
        )
    )
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
    if distributed.is_main_process():  # several processes: one writes, cache.finish waits for it
        save_reward_model(reward_model, entry.folder, tokenizer, metrics)
    cache.finish(entry, ["model.safetensors", "config.json", "metrics.json"])
    return metrics


def ensure_reward_model(
    profile: Profile | str | None = None,
    device=None,
    progress: bool = True,
    config: RewardModelConfig | None = None,
    callback: Callable[[dict], None] | None = None,
    rebuild: bool = False,
) -> cache.StageEntry:
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
        if config.lora_rank:  # adapters on the SFT trunk, the fresh head trained in full (rlhf_core.lora)
            reward_model = add_lora(reward_model, config.lora_rank, trainable_modules=("score",))
        started = time.perf_counter()
        reward_model, history = train_reward_model(
            reward_model,
            tokenizer,
            train_records,
            heldout_records,
            config,
            progress,
            out_dir=entry.folder / "training",
            callback=callback,
        )
        if config.lora_rank:  # normalised, measured and saved as a plain GPT2ForSequenceClassification
            reward_model = merged_copy(reward_model)
        finish_reward_model(
            profile,
            reward_model,
            tokenizer,
            policy,
            config,
            train_records,
            heldout_records,
            history,
            time.perf_counter() - started,
        )
    return entry


def load_or_train_reward_model(
    profile: Profile | str | None = None,
    device=None,
    progress: bool = True,
    config: RewardModelConfig | None = None,
    callback: Callable[[dict], None] | None = None,
    rebuild: bool = False,
):
    """``(reward_model, tokenizer, metrics)``: normalised so that SFT samples score 0 +- 1."""
    profile = _profile(profile)
    entry = ensure_reward_model(profile, device, progress, config, callback, rebuild)
    metrics = json.loads((entry.folder / "metrics.json").read_text())
    return load_reward_model(entry.folder, _device(device)), load_tokenizer(profile.tokenizer), metrics
