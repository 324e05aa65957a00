"""Profiles, paths, device and seeding: the few global choices every stage shares.

A *profile* says which world the course runs in:

- ``tiny``  the offline world on a laptop CPU (the default, and what CI runs): the project's own
            review generator, its own BPE tokenizer and a 2-layer GPT-2 shipped in ``data/``.
- ``small`` the same offline world with a 4-layer x 256 GPT-2, pretrained into the cache folder
            on first use, for a richer local run.
- ``gpt2``  the real thing on one GPU: ``gpt2`` (124M) and IMDB review prefixes from the hub.
- ``gpt2-medium`` (355M) and ``gpt2-large`` (774M): the same, from the bigger hub checkpoints, with LoRA
            adapters by default (``lora_rank`` 8, ``rlhf_core.lora``): where a learner who outgrows
            gpt2 goes next.
- ``auto``  ``gpt2`` where CUDA is present, else ``tiny``.

A profile's ``lora_rank`` (0: full fine-tuning) is the default of every policy trainer's config (SFT, PPO,
DPO, the critic-free loop) and, on the hub profiles, of the reward model's (``RewardModelConfig.for_profile``
says why not on tiny): ``profile.with_overrides(lora_rank=8)`` (``run --lora``) trains LoRA adapters, and
since the configs hold the rank, full and LoRA results never share a cached stage.

The profile is chosen by argument, else by the ``RLHF_PROFILE`` environment variable, else ``auto``.

Two optional stand-ins let the gpt2 profiles run without the hub (CI runs them so, on a CPU):

- ``RLHF_GPT2_MODEL`` (``RLHF_GPT2_MEDIUM_MODEL``, ``RLHF_GPT2_LARGE_MODEL`` for the bigger ones): a
  local folder holding a gpt2-config model and its tokenizer (written by ``save_pretrained``); the
  profile then starts from it, and takes its shape (layers, width, context, vocabulary) from its
  ``config.json``.
- ``RLHF_IMDB``: a local folder that ``datasets.load_from_disk`` reads as a ``DatasetDict`` with
  ``train`` and ``test`` splits and a ``text`` column, what ``load_dataset("stanfordnlp/imdb")``
  gives (read by ``rlhf_core.prompts``).

A *quick* profile (``get_profile(name, quick=True)``, ``RLHF_QUICK=1``, or ``run --quick``) is the
same profile shrunk to a smoke test: ``QUICK_TRAIN_PROMPTS`` training prompts (so fewer
demonstrations and preference pairs), ``QUICK_EVAL_PROMPTS`` held-out prompts, and every stage's
config (SFT, reward model, PPO, DPO, the pipeline) cut to a few steps and iterations by its own
``for_profile``. Its configs differ from the full ones, so its cached stages never mix with theirs.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .errors import CourseError

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent


def data_dir() -> Path:
    """Folder of what the offline world ships (tokenizer, tiny base model, prompts)."""
    return Path(os.environ.get("RLHF_DATA_DIR", REPO_DIR / "data"))


def cache_dir() -> Path:
    """Ignored folder where stages write checkpoints they build (SFT, reward model, ...)."""
    return Path(os.environ.get("RLHF_CACHE_DIR", REPO_DIR / "cache"))


@dataclass(frozen=True)
class Profile:
    name: str  # "tiny", "small", "gpt2", "gpt2-medium" or "gpt2-large"
    base_model: str  # hub name or local folder of the pretrained causal LM the course starts from
    tokenizer: str  # hub name or local folder of its tokenizer
    prompt_source: str  # "world" (the offline review generator) or "imdb" (hub review prefixes)
    n_layer: int  # transformer blocks, used when the project pretrains the base model itself
    n_head: int  # attention heads per block
    n_embd: int  # width of the residual stream
    n_positions: int  # longest sequence (prompt + response) the model can see
    vocab_size: int  # BPE vocabulary size of the offline tokenizer (ignored for gpt2)
    max_new_tokens: int  # longest response sampled before we stop and call it "no EOS"
    pretrain_steps: int  # optimiser steps of base-model pretraining
    pretrain_batch_size: int  # reviews per pretraining step
    pretrain_lr: float  # peak AdamW learning rate of pretraining
    generation_batch_size: int  # prompts sampled in parallel when generating
    n_eval_prompts: int  # held-out prompts every stage is scored on (gold means are comparable)
    n_train_prompts: int | None = None  # training prompts used, the first n of the source (None: all of them)
    quick: bool = False  # shrunk to a smoke test (see the module docstring): every for_profile reads it
    lora_rank: int = 0  # LoRA adapters of this rank on every trained policy (0: full fine-tuning; rlhf_core.lora)

    @property
    def offline(self) -> bool:
        """True when nothing needs the Hugging Face hub."""
        return self.prompt_source == "world"

    def with_overrides(self, **changes) -> Profile:
        return replace(self, **changes)


def _profiles() -> dict[str, Profile]:
    data = data_dir()
    cache = cache_dir()
    tiny = Profile(
        name="tiny",
        base_model=str(data / "base-tiny"),
        tokenizer=str(data / "tokenizer"),
        prompt_source="world",
        n_layer=2,
        n_head=4,
        n_embd=128,
        n_positions=128,
        vocab_size=2048,
        max_new_tokens=64,
        pretrain_steps=1500,
        pretrain_batch_size=64,
        pretrain_lr=3e-3,
        generation_batch_size=128,
        n_eval_prompts=256,
    )
    small = replace(
        tiny,
        name="small",
        base_model=str(cache / "base-small"),
        n_layer=4,
        n_head=4,
        n_embd=256,
        pretrain_steps=3000,
        pretrain_lr=1.5e-3,
    )
    gpt2 = Profile(
        name="gpt2",
        base_model="gpt2",
        tokenizer="gpt2",
        prompt_source="imdb",
        n_layer=12,
        n_head=12,
        n_embd=768,
        n_positions=1024,
        vocab_size=50257,
        max_new_tokens=48,
        pretrain_steps=0,  # the hub checkpoint is already pretrained
        pretrain_batch_size=0,
        pretrain_lr=0.0,
        generation_batch_size=64,
        n_eval_prompts=256,
    )
    # The bigger hub GPT-2s: the gpt2 profile's world and settings, their own shapes, LoRA by default
    # (their full four-model loop would hold about 10 copies of the weights; see rlhf_core.memory).
    medium = replace(gpt2, name="gpt2-medium", base_model="gpt2-medium", tokenizer="gpt2-medium", lora_rank=8)
    medium = replace(medium, n_layer=24, n_head=16, n_embd=1024, generation_batch_size=32)
    large = replace(gpt2, name="gpt2-large", base_model="gpt2-large", tokenizer="gpt2-large", lora_rank=8)
    large = replace(large, n_layer=36, n_head=20, n_embd=1280, generation_batch_size=32)
    return {"tiny": tiny, "small": small, "gpt2": gpt2, "gpt2-medium": medium, "gpt2-large": large}


PROFILE_NAMES = ("tiny", "small", "gpt2", "gpt2-medium", "gpt2-large", "auto")
GPT2_MODEL_VARIABLE = "RLHF_GPT2_MODEL"  # local stand-in for the hub's gpt2 (model and tokenizer folder)
# each hub profile's local stand-in variable (a model and tokenizer folder written by save_pretrained)
STAND_IN_VARIABLES = {
    "gpt2": GPT2_MODEL_VARIABLE,
    "gpt2-medium": "RLHF_GPT2_MEDIUM_MODEL",
    "gpt2-large": "RLHF_GPT2_LARGE_MODEL",
}
IMDB_VARIABLE = "RLHF_IMDB"  # local stand-in for the hub's IMDB (a DatasetDict saved with save_to_disk)
QUICK_VARIABLE = "RLHF_QUICK"  # "1": the quick profile
QUICK_TRAIN_PROMPTS = 128  # a quick profile's training prompts (demonstrations; at most as many preference pairs)
QUICK_EVAL_PROMPTS = 16  # a quick profile's held-out prompts


# LoRA's learning rate over full fine-tuning's, the default of every LoRA config (``for_profile``): the
# adapters are few and start at zero (B = 0), and a step must move them as far as a full step moves the
# weights; LoRA recipes use about 10x (Hu et al. 2021: 2e-4 where full fine-tuning of GPT-2 used 2e-5).
LORA_LEARNING_RATE_SCALE = 10.0


def lora_rank_of(profile: Profile, overrides: dict) -> int:
    """The LoRA rank a config built by ``for_profile(profile, **overrides)`` gets: the override's, else
    the profile's (0: full fine-tuning). Its learning-rate defaults follow it."""
    return int(overrides.get("lora_rank", profile.lora_rank) or 0)


class UnknownProfileError(CourseError, ValueError):
    """A profile name that is not one of ``PROFILE_NAMES``."""


def resolve_profile_name(name: str | None = None) -> str:
    """Argument, else ``RLHF_PROFILE``, else ``auto``; ``auto`` becomes gpt2 on CUDA, else tiny."""
    chosen = (name or os.environ.get("RLHF_PROFILE") or "auto").strip().lower()
    if chosen not in PROFILE_NAMES:
        raise UnknownProfileError(f"unknown profile {chosen!r}: choose one of {', '.join(PROFILE_NAMES)}")
    if chosen == "auto":
        chosen = "gpt2" if torch.cuda.is_available() else "tiny"
    return chosen


def get_profile(name: str | None = None, quick: bool | None = None) -> Profile:
    """The profile by name (see module docstring); paths are read from the environment each call.
    ``quick``: the shrunk variant (None: ``RLHF_QUICK``)."""
    profile = _profiles()[resolve_profile_name(name)]
    variable = STAND_IN_VARIABLES.get(profile.name)
    if variable and os.environ.get(variable):
        profile = gpt2_stand_in(profile, os.environ[variable], variable)
    if quick is None:
        quick = os.environ.get(QUICK_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")
    return quick_variant(profile) if quick else profile


def gpt2_stand_in(profile: Profile, folder: str | Path, variable: str = GPT2_MODEL_VARIABLE) -> Profile:
    """A gpt2 profile on a local model and tokenizer folder (``RLHF_GPT2_MODEL``, or ``variable`` for
    the bigger ones), shaped as its ``config.json`` says."""
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise CourseError(
            f"{variable}={folder}: no config.json there; point it at a folder written by "
            f"save_pretrained (a gpt2-config model and its tokenizer), or unset it to use the hub"
        )
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "gpt2":
        raise CourseError(
            f"{variable}={folder}: its config.json describes a "
            f"{config.get('model_type')!r} model, not gpt2; point it at a gpt2-config model"
        )
    return replace(
        profile,
        base_model=str(folder),
        tokenizer=str(folder),
        n_layer=config["n_layer"],
        n_head=config["n_head"],
        n_embd=config["n_embd"],
        n_positions=config["n_positions"],
        vocab_size=config["vocab_size"],
    )


def quick_variant(profile: Profile) -> Profile:
    """``profile`` shrunk to a smoke test: few training and held-out prompts, and ``quick`` set, so
    every stage's ``for_profile`` shrinks its steps and iterations too."""
    return replace(
        profile,
        quick=True,
        n_train_prompts=QUICK_TRAIN_PROMPTS,
        n_eval_prompts=min(profile.n_eval_prompts, QUICK_EVAL_PROMPTS),
    )


def with_overrides(config, overrides: dict):
    """``config`` with some fields changed; an unknown field name is an error that lists the known
    ones (a misspelt override must never be silently ignored). Every ``for_profile`` ends here."""
    known = [field.name for field in fields(config)]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise TypeError(
            f"{type(config).__name__} has no field {', '.join(map(repr, unknown))}: the fields are {', '.join(known)}"
        )
    return replace(config, **overrides)


def check_bounds(config, at_least_one=(), not_negative=(), positive=()) -> None:
    """Raise a one-line ``CourseError`` naming the first field of ``config`` out of its range."""
    rules = [
        ("must be at least 1", at_least_one, lambda v: v >= 1),
        ("must not be negative", not_negative, lambda v: v >= 0),
        ("must be positive", positive, lambda v: v > 0),
    ]
    for rule, names, holds in rules:
        for name in names:
            if not holds(getattr(config, name)):
                raise CourseError(f"{type(config).__name__} {name}={getattr(config, name)} {rule}")


def select_device(preferred: str | None = None) -> torch.device:
    """CUDA, then Apple's MPS, then CPU; ``RLHF_DEVICE`` or the argument overrides. Under ``accelerate
    launch``: the process's own device (its GPU, or the CPU with ``--cpu``; ``rlhf_core.distributed``)."""
    preferred = preferred or os.environ.get("RLHF_DEVICE")
    if preferred:
        return torch.device(preferred)
    if distributed.device() is not None:
        return distributed.device()
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); returns a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
