"""The stages that train a policy against the SFT model and the reward model or the pairs: PPO, DPO and
the critic-free loops (see ``rlhf_core.stages``)."""

from __future__ import annotations

import csv
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .. import cache, distributed
from ..config import Profile, cache_dir
from ..dpo import DPOConfig, reference_logps_for_rows, train_dpo, used_rows
from ..grpo import CriticFreeConfig
from ..grpo_trainer import CriticFreeTrainer
from ..lora import adapters_off_score, save_model, value_and_reward_models
from ..models import load_causal_lm
from ..preferences import split_preferences
from ..prompts import load_prompts
from ..reward_model import score_batch
from ..rlhf import PPOConfig, ValueModel
from ..rlhf_trainer import PPOTrainer
from .inputs import (
    _device,
    _profile,
    ensure_preferences,
    ensure_reward_model,
    ensure_sft,
    load_or_build_preferences,
    load_or_train_reward_model,
    sft_policy_and_reference,
)


# ----- PPO ---------------------------------------------------------------------------------------
def ppo_entry(
    profile: Profile | str | None = None, config: PPOConfig | None = None, device=None, progress: bool = True
) -> cache.StageEntry:
    profile = _profile(profile)
    config = config or PPOConfig.for_profile(profile)
    inputs = {
        "sft": ensure_sft(profile, device, progress).digest,
        "reward_model": ensure_reward_model(profile, device, progress).digest,
    }
    label = f"beta{config.kl_coef:g}{'-adaptive' if config.adaptive_kl else ''}"
    return cache.stage_entry(profile, "ppo", config, inputs, label)


def ppo_dir(profile: Profile | str | None = None, config: PPOConfig | None = None) -> Path:
    return ppo_entry(profile, config).folder


def build_ppo_trainer(
    profile: Profile | str | None = None, config: PPOConfig | None = None, device=None, progress: bool = True
) -> PPOTrainer:
    """The four models: policy and reference from SFT, the reward model, and a value model (from
    the reward model, or a head on the policy's trunk). Prompts: the profile's training prompts.

    With ``config.lora_rank``: the policy is the SFT model with LoRA adapters and the reference the
    same model with its adapters off (``sft_policy_and_reference``); the value model is adapters on the
    reward model's own weights, the reward model that model with them off
    (``lora.value_and_reward_models``), unless ``shared_value_trunk`` puts a head on the policy's trunk."""
    profile = _profile(profile)
    config = config or PPOConfig.for_profile(profile)
    device = _device(device)
    policy, reference, tokenizer = sft_policy_and_reference(profile, config.lora_rank, device, progress)
    reward_model, _, _ = load_or_train_reward_model(profile, device, progress)
    score_fn = score_batch
    if config.shared_value_trunk:
        value_model = ValueModel.on_policy_trunk(policy)
    elif config.lora_rank:
        value_model, reward_model = value_and_reward_models(reward_model, config.lora_rank)
        score_fn = adapters_off_score(score_batch)
    else:
        value_model = ValueModel.from_reward_model(reward_model)
    value_model = value_model.to(device)
    torch.manual_seed(config.seed)
    return PPOTrainer(
        policy, reference, reward_model, value_model, tokenizer, load_prompts(profile, "train"), config, score_fn
    )


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


def _train_policy(entry: cache.StageEntry, trainer, callback, progress: bool) -> None:
    """Train an RL policy (``PPOTrainer`` or ``CriticFreeTrainer``) into its stage folder: checkpoints
    while training (an interrupted run resumes), then the policy, ``summary.json`` (config, history,
    samples, seconds) and ``history.csv``/``.json``; the finished manifest last."""
    started = time.perf_counter()
    trainer.train(checkpoint_dir=entry.folder / "checkpoint", callback=callback, progress=progress)
    if distributed.is_main_process():  # several processes (rlhf_core.distributed): one writes, finish waits
        save_model(trainer.policy, entry.folder / "policy")  # a LoRA policy merged: a plain GPT-2 folder
        summary = {
            "config": asdict(trainer.config),
            "seconds_this_run": round(time.perf_counter() - started, 1),
            "history": trainer.history,
            "samples": trainer.samples,
        }
        cache.write_json_atomically(entry.folder / "summary.json", summary)
        save_history(trainer.history, entry.folder)
        shutil.rmtree(entry.folder / "checkpoint", ignore_errors=True)  # the final policy replaces it
    cache.finish(entry, ["policy/model.safetensors", "policy/config.json", "summary.json"])


def _trained_policy(entry: cache.StageEntry, device):
    """``(policy, history, samples)`` of a finished RL stage."""
    summary = json.loads((entry.folder / "summary.json").read_text())
    return load_causal_lm(entry.folder / "policy", device=_device(device)), summary["history"], summary["samples"]


def load_or_train_ppo(
    profile: Profile | str | None = None,
    config: PPOConfig | None = None,
    device=None,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
    rebuild: bool = False,
):
    """``(policy, history, samples)`` of a finished PPO run with this config against this SFT model
    and this reward model: from the cache, or trained now (checkpointed, resumable)."""
    profile = _profile(profile)
    config = config or PPOConfig.for_profile(profile)
    entry = ppo_entry(profile, config, device, progress)
    if rebuild:
        cache.remove(entry)
    if not cache.is_finished(entry):
        _train_policy(entry, build_ppo_trainer(profile, config, device, progress), callback, progress)
    return _trained_policy(entry, device)


# ----- DPO ---------------------------------------------------------------------------------------
def _dpo_config(profile: Profile, beta: float | None, config: DPOConfig | None) -> DPOConfig:
    config = config or DPOConfig.for_profile(profile)
    return replace(config, beta=beta) if beta is not None else config


def dpo_entry(
    profile: Profile | str | None = None,
    beta: float | None = None,
    config: DPOConfig | None = None,
    device=None,
    progress: bool = True,
) -> cache.StageEntry:
    profile = _profile(profile)
    config = _dpo_config(profile, beta, config)
    inputs = {
        "sft": ensure_sft(profile, device, progress).digest,
        "preferences": ensure_preferences(profile, device, progress).digest,
    }
    return cache.stage_entry(profile, "dpo", config, inputs, f"beta{config.beta:g}")


def dpo_dir(profile: Profile | str | None = None, beta: float | None = None, config: DPOConfig | None = None) -> Path:
    return dpo_entry(profile, beta, config).folder


def cached_reference_logps(
    path: Path,
    reference,
    tokenizer,
    records: Sequence[dict],
    rows: Sequence[int] | None,
    batch_size: int,
    max_response_tokens: int | None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """pi_ref's sequence log-probs of the pairs' chosen and rejected responses, ``(N,)`` each,
    computed once per pair and kept in ``path`` (shared by every beta: pi_ref does not change)."""
    rows = list(range(len(records))) if rows is None else list(rows)
    store: dict[str, list[float]] = {}
    if path.exists():
        try:
            store = json.loads(path.read_text())
        except json.JSONDecodeError:
            store = {}  # a damaged file is recomputed, never served
    keys = [
        cache.stable_hash(
            [r["prompt"], r["chosen"], r["rejected"], r.get("chosen_ended", True), r.get("rejected_ended", True)], 24
        )
        for r in records
    ]
    missing = [row for row in rows if keys[row] not in store]
    chosen, rejected = reference_logps_for_rows(
        reference, tokenizer, records, missing, batch_size, max_response_tokens, progress
    )
    for row in missing:
        store[keys[row]] = [float(chosen[row]), float(rejected[row])]
    for row in rows:
        chosen[row], rejected[row] = store[keys[row]]
    if missing and distributed.is_main_process():
        cache.write_json_atomically(path, store)
    distributed.wait_for_everyone()  # several processes read the file next time: all of it, the same
    return chosen, rejected


def load_or_train_dpo(
    profile: Profile | str | None = None,
    beta: float | None = None,
    device=None,
    progress: bool = True,
    config: DPOConfig | None = None,
    rebuild: bool = False,
):
    """``(policy, history)``: DPO from the SFT policy on the simulated preference pairs, split by
    prompt; one cached policy per config (``beta`` overrides the config's)."""
    profile = _profile(profile)
    config = _dpo_config(profile, beta, config)
    entry = dpo_entry(profile, None, config, device, progress)
    if rebuild:
        cache.remove(entry)
    if not cache.is_finished(entry):
        device = _device(device)
        policy, reference, tokenizer = sft_policy_and_reference(profile, config.lora_rank, device, progress)
        records = load_or_build_preferences(profile, device, progress)
        train_records, heldout_records = split_preferences(records, config.heldout_fraction, config.seed)
        heldout_records = heldout_records[: config.max_heldout_pairs]
        # pi_ref's log-probs depend only on the SFT model and the cut: one file for every beta
        reference_file = (
            cache_dir()
            / profile.name
            / (f"dpo-reference-logps-{cache.stable_hash([entry.inputs['sft'], config.max_response_tokens])}.json")
        )
        reference_logps = cached_reference_logps(
            reference_file,
            reference,
            tokenizer,
            train_records,
            used_rows(len(train_records), config),
            config.eval_batch_size,
            config.max_response_tokens,
            progress,
        )
        heldout_reference_logps = cached_reference_logps(
            reference_file,
            reference,
            tokenizer,
            heldout_records,
            None,
            config.eval_batch_size,
            config.max_response_tokens,
            progress,
        )
        train_dpo(
            policy,
            reference,
            tokenizer,
            train_records,
            heldout_records,
            config,
            out_dir=entry.folder,
            resume=True,
            progress=progress,
            reference_logps=reference_logps,
            heldout_reference_logps=heldout_reference_logps,
        )
        cache.finish(entry, ["model.safetensors", "config.json", "dpo_summary.json"])
    summary = json.loads((entry.folder / "dpo_summary.json").read_text())
    return load_causal_lm(entry.folder, device=_device(device)), summary["history"]


# ----- critic-free (GRPO, Dr. GRPO, RLOO) ------------------------------------------------------


def critic_free_entry(
    profile: Profile | str | None = None, config: CriticFreeConfig | None = None, device=None, progress: bool = True
) -> cache.StageEntry:
    profile = _profile(profile)
    config = config or CriticFreeConfig.for_profile(profile)
    inputs = {
        "sft": ensure_sft(profile, device, progress).digest,
        "reward_model": ensure_reward_model(profile, device, progress).digest,
    }
    return cache.stage_entry(profile, "critic_free", config, inputs, label=config.method)


def build_critic_free_trainer(
    profile: Profile | str | None = None, config: CriticFreeConfig | None = None, device=None, progress: bool = True
) -> CriticFreeTrainer:
    """The three models: policy and reference from SFT, the reward model; no value model. Prompts: the
    profile's training prompts (PPO's)."""
    profile = _profile(profile)
    config = config or CriticFreeConfig.for_profile(profile)
    device = _device(device)
    policy, reference, tokenizer = sft_policy_and_reference(profile, config.lora_rank, device, progress)
    reward_model, _, _ = load_or_train_reward_model(profile, device, progress)
    torch.manual_seed(config.seed)
    return CriticFreeTrainer(
        policy, reference, reward_model, tokenizer, load_prompts(profile, "train"), config, score_batch
    )


def load_or_train_critic_free(
    profile: Profile | str | None = None,
    config: CriticFreeConfig | None = None,
    device=None,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
    rebuild: bool = False,
):
    """``(policy, history, samples)`` of a finished critic-free run (GRPO, Dr. GRPO or RLOO, as
    ``config.method`` says; default ``CriticFreeConfig.for_profile(profile)``, GRPO) against this SFT
    model and this reward model: from the cache, or trained now (checkpointed, resumable)."""
    profile = _profile(profile)
    config = config or CriticFreeConfig.for_profile(profile)
    entry = critic_free_entry(profile, config, device, progress)
    if rebuild:
        cache.remove(entry)
    if not cache.is_finished(entry):
        _train_policy(entry, build_critic_free_trainer(profile, config, device, progress), callback, progress)
    return _trained_policy(entry, device)
