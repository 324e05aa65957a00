"""Loading and creating the causal language models the course trains.

Every model, hub or local, goes through ``from_pretrained``: ``"gpt2"`` comes from the Hugging
Face hub on the GPU profile, ``data/base-tiny`` from this repository in the offline profile, and
checkpoints the stages write (SFT, reward model, PPO) from the cache folder. Weights are read
from safetensors files; nothing here runs code shipped with a model (no ``trust_remote_code``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedModel
from transformers.activations import ACT2FN

from .config import Profile
from .errors import HubUnreachableError, MissingCheckpointError

# What to run to rebuild each local checkpoint the course can miss; used in error messages.
HOW_TO_BUILD = {
    "base-tiny": "python -m rlhf_core pretrain --profile tiny",
    "base-small": "python -m rlhf_core pretrain --profile small",
    "tokenizer": "python -m rlhf_core pretrain --profile tiny",
}


def looks_like_path(name_or_path: str) -> bool:
    """A local folder (absolute, relative or existing) rather than a hub name like ``gpt2``."""
    return os.path.isabs(name_or_path) or name_or_path.startswith(".") or os.path.exists(name_or_path)


def pretrained_error(name_or_path: str, what: str, error: Exception) -> Exception:
    """A clear error for a checkpoint that could not be loaded: say how to make it, or why."""
    if looks_like_path(name_or_path):
        folder = Path(name_or_path)
        build = HOW_TO_BUILD.get(folder.name, "the stage of the course that writes it")
        return MissingCheckpointError(
            f"no {what} checkpoint at {folder}: build it with `{build}` "
            f"(or run the chapter that creates it). Original error: {error}"
        )
    return HubUnreachableError(
        f"could not load the {what} '{name_or_path}' from the Hugging Face hub (offline, or the hub "
        f"is unreachable). The course runs without the hub in the 'tiny' profile: set "
        f"RLHF_PROFILE=tiny or pass --profile tiny. Original error: {error}"
    )


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set every dropout probability to 0: RLHF compares log-probs of the same text under
    different models and passes, and dropout noise would leak into the ratios and the KL."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def fused_gelu(model: torch.nn.Module) -> torch.nn.Module:
    """Swap GPT-2's ``gelu_new`` (the tanh approximation of GELU written as six tensor operations)
    for ``gelu_pytorch_tanh``, the same formula in one fused kernel: logits agree to float32
    rounding (about 1e-5 on the tiny model's), a training step runs about 10% faster on a CPU. The
    config says so too, so a saved checkpoint reloads with the fused one."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "activation_function", None) != "gelu_new":
        return model
    config.activation_function = "gelu_pytorch_tanh"
    for module in model.modules():
        if hasattr(module, "act") and hasattr(module, "c_fc"):  # a GPT2MLP
            module.act = ACT2FN["gelu_pytorch_tanh"]
    return model


def load_causal_lm(
    name_or_path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """A causal LM from the hub or a local folder (safetensors), dropout off, in eval mode."""
    name_or_path = str(name_or_path)
    try:
        model = GPT2LMHeadModel.from_pretrained(name_or_path, torch_dtype=dtype or torch.float32, use_safetensors=True)
    except OSError as error:
        raise pretrained_error(name_or_path, "model", error) from error
    disable_dropout(fused_gelu(model))
    # transformers finds no loss for the class name GPT2LMHeadModel and warns, at a call with labels=, that
    # it falls back to the causal-LM loss: name that loss here (the course computes its own losses anyway)
    model.loss_type = "ForCausalLM"
    if device is not None:
        model.to(device)
    return model.eval()


def new_model(
    profile: Profile, vocab_size: int, eos_token_id: int, pad_token_id: int, seed: int = 0
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 of the profile's shape (what pretraining starts from)."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=profile.n_positions,
        n_embd=profile.n_embd,
        n_layer=profile.n_layer,
        n_head=profile.n_head,
        activation_function="gelu_pytorch_tanh",  # GPT-2's GELU, fused (see fused_gelu)
        # The world's text is unlimited and never repeats exactly: no need for dropout.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model computes on: its ``device`` (a transformers model, a LoRA policy, or a
    ``lora.AdapterOffReference``, which holds no parameters of its own), else its first parameter's."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ----- the reward model on disk: a plain GPT2ForSequenceClassification folder -------------------------


def save_reward_model(model, folder: str | Path, tokenizer=None, metrics: dict | None = None) -> Path:
    """Write ``config.json`` (with the normalisation) and ``model.safetensors`` (and the tokenizer
    and ``metrics.json`` when given), atomically: a half-written folder never replaces a good one."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    model.save_pretrained(partial, safe_serialization=True)
    if tokenizer is not None:
        from .tokenizer import save_tokenizer  # here: tokenizer imports this module

        save_tokenizer(tokenizer, partial)
    if metrics is not None:
        (partial / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(partial, folder)
    return folder


def load_reward_model(folder: str | Path, device: torch.device | str | None = None) -> GPT2ForSequenceClassification:
    """A reward model saved by ``save_reward_model`` (dropout off, eval mode)."""
    try:
        model = GPT2ForSequenceClassification.from_pretrained(str(folder), use_safetensors=True)
    except OSError as error:
        raise pretrained_error(str(folder), "reward model", error) from error
    disable_dropout(fused_gelu(model))
    if device is not None:
        model.to(device)
    return model.eval()
