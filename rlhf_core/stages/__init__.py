"""The course's stages, each built from the ones before it and cached (``rlhf_core.cache``).

    base -> demonstrations -> sft -> preferences -> reward_model -> ppo
                                              \\-> dpo        (best-of-n and the measurements: pipeline)

Each ``ensure_<stage>`` returns the stage's ``StageEntry``: the cached result when its config and its
inputs are unchanged, else it builds it first (an interrupted training resumes from its checkpoint).
Each ``load_or_train_<stage>`` loads what the chapters need from that entry. The algorithms
themselves live in their own modules (``sft``, ``reward_model``, ``rlhf``, ``dpo``, ...); this module
only says where their results go and when a result can be reused.
"""

from .inputs import (
    DEMONSTRATIONS_FILE,
    PREFERENCES_FILE,
    base_identity,
    ensure_base,
    ensure_demonstrations,
    ensure_preferences,
    ensure_reward_model,
    ensure_sft,
    finish_reward_model,
    load_base_model,
    load_or_build_preferences,
    load_or_train_reward_model,
    load_or_train_sft,
    load_or_write_demonstrations,
    reward_model_entry,
    reward_model_path,
    sft_dir,
    sft_entry,
    sft_policy_and_reference,
    sft_summary,
)
from .policies import (
    build_critic_free_trainer,
    build_ppo_trainer,
    cached_reference_logps,
    critic_free_entry,
    dpo_dir,
    dpo_entry,
    load_or_train_critic_free,
    load_or_train_dpo,
    load_or_train_ppo,
    ppo_dir,
    ppo_entry,
    save_history,
)

__all__ = [
    "DEMONSTRATIONS_FILE",
    "PREFERENCES_FILE",
    "base_identity",
    "build_critic_free_trainer",
    "build_ppo_trainer",
    "cached_reference_logps",
    "critic_free_entry",
    "dpo_dir",
    "dpo_entry",
    "ensure_base",
    "ensure_demonstrations",
    "ensure_preferences",
    "ensure_reward_model",
    "ensure_sft",
    "finish_reward_model",
    "load_base_model",
    "load_or_build_preferences",
    "load_or_train_critic_free",
    "load_or_train_dpo",
    "load_or_train_ppo",
    "load_or_train_reward_model",
    "load_or_train_sft",
    "load_or_write_demonstrations",
    "ppo_dir",
    "ppo_entry",
    "reward_model_entry",
    "reward_model_path",
    "save_history",
    "sft_dir",
    "sft_entry",
    "sft_policy_and_reference",
    "sft_summary",
]
