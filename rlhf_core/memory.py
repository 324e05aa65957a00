"""What the four-model loop holds in memory, full fine-tuning against LoRA (chapter 04's memory section).

One PPO-RLHF step holds the four models' weights, the gradients of the two that train (policy, value)
and AdamW's two moments (``exp_avg``, ``exp_avg_sq``) for each of their trained weights. In units of
one model's weights W (the policy, in the same dtype):

    full fine-tuning   4 W  (policy, reference, reward, value: a copy of the reward model)
                     + 2 W  gradients (policy, value)
                     + 4 W  AdamW moments (two per trained weight)            = about 10 W
    LoRA               1 W  policy base weights, which are the reference's too (adapters off)
                     + 1 W  reward model
                     + 4 a  adapters (and the value head): weights, gradients, two moments
                                                                              = about 2 W + 4 a

where a is the adapters' share of W (``lora.add_lora``): a few percent on the tiny model, well under one
percent on gpt2 and up. Activations are not in these counts: they grow with the batch and the sequence,
not with the model, and are the same for both.

Two ways to count, which must agree:

- ``measure_four_model_loop``: real models of a shape, built as the stages build them (``PPOTrainer``'s
  optimiser), one update step taken, then every tensor counted (``critic_cost.training_memory``: each
  distinct tensor once, so a tied embedding, the reference's shared base weights and the value head's
  shared trunk count once). On CUDA the step's peak (``torch.cuda.max_memory_allocated``, a small
  batch's activations included) is measured too.
- ``counted_four_model_loop``: the same models on PyTorch's ``meta`` device (shapes, no weights), counted
  from the shapes: what ``memory_table`` does for the real gpt2, gpt2-medium and gpt2-large on a CPU.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from .config import Profile, get_profile
from .critic_cost import training_memory
from .lora import AdapterOffReference, add_lora, value_and_reward_models
from .models import looks_like_path
from .rlhf import PPOConfig, ValueModel, clip_groups
from .sft import frozen_reference
from .training import backward_and_step

DEFAULT_LORA_RANK = 8
T4_BYTES = 15 * 2**30  # a T4's usable memory (Colab's free GPU): 15 GiB
HUB_PROFILES = ("gpt2", "gpt2-medium", "gpt2-large")


@dataclass
class LoopMemory:
    """Bytes of one four-model step: ``by_model[name]`` holds parameters, gradients and optimizer_state."""

    by_model: dict[str, dict[str, int]]  # policy, reference, reward_model, value_model
    one_model_bytes: int  # the weights of one model (the policy's GPT-2, adapters excluded) in the same dtype
    lora_rank: int
    peak_bytes: int | None = None  # CUDA: max_memory_allocated during the step (activations included)

    @property
    def total_bytes(self) -> int:
        return sum(sum(counts.values()) for counts in self.by_model.values())

    @property
    def multiple(self) -> float:
        """Parameters, gradients and optimiser state, in units of one model's weights."""
        return self.total_bytes / self.one_model_bytes

    @property
    def peak_multiple(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / self.one_model_bytes

    def kinds(self) -> dict[str, int]:
        """Bytes of parameters, gradients and optimizer_state, summed over the models."""
        return {
            kind: sum(counts[kind] for counts in self.by_model.values()) for kind in next(iter(self.by_model.values()))
        }


def model_shape(profile: Profile | str | None = None) -> GPT2Config:
    """The GPT-2 config of a profile's models: a local base model's ``config.json`` (tiny, a stand-in),
    else one built from the profile's shape (the hub's gpt2s, nothing downloaded)."""
    profile = profile if isinstance(profile, Profile) else get_profile(profile)
    folder = Path(profile.base_model)
    if looks_like_path(profile.base_model) and (folder / "config.json").exists():
        return GPT2Config.from_pretrained(folder)
    return GPT2Config(
        n_layer=profile.n_layer,
        n_head=profile.n_head,
        n_embd=profile.n_embd,
        n_positions=profile.n_positions,
        vocab_size=profile.vocab_size,
    )


def _reward_model(policy: GPT2LMHeadModel) -> GPT2ForSequenceClassification:
    """A reward model of the policy's shape (its weights do not matter here)."""
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    return GPT2ForSequenceClassification(config).to(policy.device)


def four_models(config: GPT2Config, lora_rank: int = 0, shared_value_trunk: bool = False) -> dict[str, nn.Module]:
    """Policy, reference, reward model and value model of shape ``config``, random weights, built as
    ``stages.build_ppo_trainer`` builds them on the current default device (``with torch.device(...)``):
    full fine-tuning's frozen copy of the policy and value copy of the reward model, or LoRA's
    adapters-off reference and value adapters on the reward model's weights (its scores: adapters off).
    ``shared_value_trunk``: a value head on the policy's trunk instead (``PPOConfig.shared_value_trunk``)."""
    policy = GPT2LMHeadModel(config)
    reward_model = _reward_model(policy).requires_grad_(False)
    if lora_rank:
        policy = add_lora(policy, lora_rank)
        reference = AdapterOffReference(policy)
    else:
        reference = frozen_reference(policy)
    if shared_value_trunk:
        value_model = ValueModel.on_policy_trunk(policy)
    elif lora_rank:
        value_model, reward_model = value_and_reward_models(reward_model, lora_rank)
    else:
        value_model = ValueModel.from_reward_model(reward_model)
    return {"policy": policy, "reference": reference, "reward_model": reward_model, "value_model": value_model}


def one_model_bytes(config: GPT2Config, dtype: torch.dtype = torch.float32) -> int:
    """The weights of one GPT-2 of shape ``config`` (tied embedding once), in ``dtype``."""
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    return sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()


def measure_four_model_loop(
    profile_or_shape: Profile | GPT2Config | str | None = None,
    lora_rank: int = 0,
    device: torch.device | str | None = None,
    shared_value_trunk: bool = False,
    seed: int = 0,
) -> LoopMemory:
    """Build the four models of the shape (random weights), take one update step through ``PPOTrainer``'s
    own optimiser (so gradients and AdamW's moments exist), and count every tensor: see the module
    docstring. On CUDA ``peak_bytes`` is the step's ``max_memory_allocated`` above what was allocated
    before the models were built."""
    from .rlhf_trainer import PPOTrainer  # here: rlhf_trainer imports the trainers' stack

    config = profile_or_shape if isinstance(profile_or_shape, GPT2Config) else model_shape(profile_or_shape)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    torch.manual_seed(seed)
    with torch.device(device):
        models = four_models(config, lora_rank, shared_value_trunk)
    shared = models["value_model"].trunk is models["policy"].transformer
    ppo_config = PPOConfig(lora_rank=lora_rank, shared_value_trunk=shared)
    trainer = PPOTrainer(
        models["policy"],
        models["reference"],
        models["reward_model"],
        models["value_model"],
        None,
        [],
        ppo_config,
        None,
        precision="fp32",
    )
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(config.vocab_size, (2, 8), generator=generator).to(device)  # a small batch
    mask = torch.ones_like(input_ids)
    logits = trainer.policy(input_ids=input_ids, attention_mask=mask).logits.float()  # (2, 8, V)
    values = trainer.value_model(input_ids, mask)  # (2, 8)
    loss = torch.logsumexp(logits, -1).mean() + values.square().mean()
    backward_and_step(loss, trainer.state.optimizer, None, clip_groups(trainer.policy, trainer.value_model), 1.0)
    del logits, values, loss
    peak = None
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    counts = training_memory(_held(models), trainer.state.optimizer)
    dtype = next(models["policy"].parameters()).dtype
    return LoopMemory(counts, one_model_bytes(config, dtype), lora_rank, peak)


def _held(models: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The modules whose tensors are counted: a reward model given as an ``AdapterOffReference`` counts
    as the LoRA model inside it (its weights, its score head, and the value model's adapters on it)."""
    return {
        name: model.model if isinstance(model, AdapterOffReference) and name == "reward_model" else model
        for name, model in models.items()
    }


def counted_four_model_loop(
    profile_or_shape: Profile | GPT2Config | str | None = None,
    lora_rank: int = 0,
    dtype: torch.dtype = torch.float32,
    shared_value_trunk: bool = False,
) -> LoopMemory:
    """The same count from shapes alone: the four models on the ``meta`` device (no weights), each
    distinct tensor once, and for every trainable one of the policy and the value model a gradient and
    AdamW's two moments, all in ``dtype``. Works for gpt2-large on a laptop."""
    config = profile_or_shape if isinstance(profile_or_shape, GPT2Config) else model_shape(profile_or_shape)
    size = torch.empty((), dtype=dtype).element_size()
    with torch.device("meta"):
        models = _held(four_models(config, lora_rank, shared_value_trunk))
    seen: set[int] = set()
    by_model = {}
    for name, model in models.items():
        counts = {"parameters": 0, "gradients": 0, "optimizer_state": 0}
        for parameter in model.parameters():
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            counts["parameters"] += parameter.numel() * size
            if parameter.requires_grad:  # trained: the policy's, the value model's (the others are frozen)
                counts["gradients"] += parameter.numel() * size
                counts["optimizer_state"] += 2 * parameter.numel() * size  # exp_avg, exp_avg_sq
        by_model[name] = counts
    return LoopMemory(by_model, one_model_bytes(config, dtype), lora_rank)


def four_model_memory(profile_or_shape: Profile | GPT2Config | str | None = None, lora_rank: int = 0) -> float:
    """The four-model loop's parameters, gradients and optimiser state as a multiple of one model's
    weights (counted from the shapes; the multiple is the same in any dtype)."""
    return counted_four_model_loop(profile_or_shape, lora_rank).multiple


def memory_table(names=HUB_PROFILES, lora_rank: int = DEFAULT_LORA_RANK) -> list[dict]:
    """For the real gpt2, gpt2-medium and gpt2-large shapes (counted on the meta device: no weights, no
    download): parameters, the multiple and the GiB of the four-model loop, full against LoRA, in fp32
    and in 16 bits (bf16 or fp16), and whether each fits a 15 GiB T4 (activations not included: they
    need what is left). The 16-bit column holds weights, gradients and moments in 16 bits; the course's
    ``--precision bf16/fp16`` is autocast over float32 weights, so its runs are the fp32 column."""
    rows = []
    for name in names:
        profile = get_profile(name)
        shape = GPT2Config(
            n_layer=profile.n_layer,
            n_head=profile.n_head,
            n_embd=profile.n_embd,
            n_positions=profile.n_positions,
            vocab_size=profile.vocab_size,
        )  # the hub model's shape, whatever stand-in the environment names
        row = {"profile": name, "parameters": one_model_bytes(shape, torch.float32) // 4}
        for label, rank in (("full", 0), ("lora", lora_rank)):
            count = counted_four_model_loop(shape, rank, torch.float32)
            row[f"{label}_multiple"] = round(count.multiple, 3)
            for bits, total in (("fp32", count.total_bytes), ("bf16", count.total_bytes // 2)):  # 4 or 2 bytes each
                row[f"{label}_{bits}_gib"] = round(total / 2**30, 2)
                row[f"{label}_{bits}_fits_t4"] = total <= T4_BYTES
        rows.append(row)
    return rows


def memory_markdown(rows: list[dict]) -> str:
    """``memory_table``'s rows as a markdown table (the README's and chapter 04's)."""
    lines = [
        "| model | parameters | full: x weights | full fp32 / 16-bit (GiB) "
        "| LoRA: x weights | LoRA fp32 / 16-bit (GiB) |",
        "|---|---|---|---|---|---|",
    ]

    def cell(row: dict, label: str) -> str:  # the GiB, and what a T4 has left for activations
        gib = row[f"{label}_gib"]
        return f"{gib:.1f} ({T4_BYTES / 2**30 - gib:.1f} left)" if row[f"{label}_fits_t4"] else f"{gib:.1f} (too big)"

    for row in rows:
        lines.append(
            f"| {row['profile']} | {row['parameters'] / 1e6:.0f}M | {row['full_multiple']:.2f} | "
            f"{cell(row, 'full_fp32')} / {cell(row, 'full_bf16')} | {row['lora_multiple']:.2f} | "
            f"{cell(row, 'lora_fp32')} / {cell(row, 'lora_bf16')} |"
        )
    return "\n".join(lines)
