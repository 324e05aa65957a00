"""LoRA adapters on the course's GPT-2s, through ``peft`` (Hu et al., 2021, "LoRA: Low-Rank Adaptation
of Large Language Models").

A LoRA policy keeps every pretrained weight W frozen and learns, next to some of its matrices, a
change of low rank r:

    h = W x + (alpha / r) * B A x          A: (r, d_in), B: (d_out, r), r << d

A starts random and B at zero, so before the first step the LoRA model *is* the model it wraps.
Only A and B train: their gradients and AdamW's two moments are a few percent of the model's,
where full fine-tuning holds a gradient and two moments for every weight (``rlhf_core.memory``).

What it changes in RLHF:

- **pi_ref for free.** The reference is the SFT model, and a LoRA policy started from SFT *contains*
  it: switch the adapters off and the policy is pi_ref again, exactly (``AdapterOffReference``). No
  second copy of the weights is held.
- **The value model** starts, as in InstructGPT, from the reward model, but as adapters on the reward
  model's own weights, with a head that starts as its score (``value_and_reward_models``); the reward
  model is that same model with the value's adapters off. No third copy either. (A head on the policy's
  LoRA trunk, ``rlhf.ValueModel.on_policy_trunk`` with ``PPOConfig.shared_value_trunk``, is a little
  cheaper, 2.09 against 2.18 times one model's weights on the tiny profile, but its values explained
  nothing there: explained variance about 0.00 over 30 iterations against 0.42, and PPO's gold +0.46
  against +0.54, the SFT model's being +0.22.)
- **A larger learning rate** (``config.LORA_LEARNING_RATE_SCALE``: 10x full fine-tuning's for SFT and DPO,
  ``rlhf.LORA_PPO_SCALE``: 10/3x for PPO and the critic-free loop, set by each config's ``for_profile``): the
  adapters start at zero and are few, and each step must move them as far as a full step moves W.
- **Saving.** At the end of a stage the adapters are merged into W (``merged_copy``: W + (alpha / r) B A)
  and saved as a plain ``GPT2LMHeadModel`` folder, so later stages, ``load_causal_lm`` and plain
  ``transformers`` read it with no peft involved. Mid-training checkpoints hold the adapters only
  (``save_adapters`` / ``load_adapters``): the frozen base is the stage's input, already on disk.

GPT-2 writes its projections as ``Conv1D`` modules, whose weight is stored (d_in, d_out), the
transpose of ``nn.Linear``'s: peft must be told so (``fan_in_fan_out=True``). ``TARGET_MODULES`` says
which projections get adapters.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .errors import CourseError

# The projections that get adapters, by the end of their module names (what peft matches): the
# attention's fused query/key/value projection (``c_attn``) and its output projection (``attn.c_proj``),
# as Hu et al. did. The MLP's two matrices (``c_fc``, ``mlp.c_proj``; QLoRA adapts them too) are left
# out: on the tiny model (width 128) their rank-8 adapters would be another 3.7% of the weights per
# adapted model (the policy and the value model), which with their gradients and AdamW's moments takes
# the four-model loop from 2.18 to 2.47 times one model's weights (``rlhf_core.memory``); on gpt2 and up
# either choice stays under 2.08. (On tiny, SFT with them reached gold +0.29 against +0.27 without.)
TARGET_MODULES = ("c_attn", "attn.c_proj")
ADAPTER_FILE = "adapters.safetensors"  # a checkpoint's adapter weights (``save_adapters``)


def is_lora(model) -> bool:
    """True for a model wrapped by ``add_lora`` (a peft model). A model is only one if peft was imported."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules=TARGET_MODULES,
    seed: int = 0,
    trainable_modules: tuple[str, ...] = (),
):
    """``model`` (a GPT-2, changed in place) with LoRA adapters of rank ``rank`` on ``target_modules``,
    as a peft model: only the adapters are trainable; the rest is frozen. ``alpha``: the scale's
    numerator, (alpha / r) B A (default 2 * rank, a scale of 2). ``dropout``: on the adapters' input
    (0 in RLHF: dropout noise would leak into the ratios and the KL). The random A matrices are drawn
    from ``seed`` (the global random state is left as it was), so the same call gives the same adapters.
    ``trainable_modules``: modules trained in full beside the adapters (peft's ``modules_to_save``: the
    reward model's fresh ``score`` head, which has no pretrained weights for adapters to adjust); they
    are saved with the adapters and merged like them."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise CourseError(f"add_lora: rank={rank!r} must be a whole number of at least 1 (8 is usual)")
    if is_lora(model):
        raise CourseError("add_lora: the model already has LoRA adapters")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        fan_in_fan_out=True,  # GPT-2's Conv1D stores its weight (d_in, d_out)
        bias="none",
        modules_to_save=list(trainable_modules) or None,
    )
    with torch.random.fork_rng(), warnings.catch_warnings():
        torch.manual_seed(seed)
        # peft asks the model `is_gradient_checkpointing`, which transformers 5 deprecates with a
        # FutureWarning that names a site-packages path: noise on the page, and a path that differs
        # from machine to machine in a checked output.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def lora_parameters(model) -> list[nn.Parameter]:
    """The adapters' parameters (A and B of every adapted projection): what a LoRA model trains."""
    return [p for name, p in model.named_parameters() if "lora_" in name]


class AdapterOffReference(nn.Module):
    """pi_ref as the LoRA policy with its adapters switched off: the model the adapters were added to
    (the SFT model), with no second copy of its weights. (The same for the reward model that carries
    the value model's adapters: ``value_and_reward_models``.)

    It registers no parameters, buffers or submodules of its own: the LoRA model is held outside
    PyTorch's bookkeeping, so ``parameters()`` is empty, and ``requires_grad_(False)``, ``eval()``,
    ``to()`` or ``state_dict()`` on the reference never reach (or freeze, or save) the policy. Its
    forward runs the policy under peft's ``disable_adapter()``, without gradients (pi_ref is
    frozen): the base weights alone, the same numbers as the model before the adapters were added."""

    def __init__(self, model):
        super().__init__()
        if not is_lora(model):
            raise CourseError(
                "AdapterOffReference needs a LoRA policy (rlhf_core.lora.add_lora); for a fully "
                "fine-tuned policy use a frozen copy (rlhf_core.sft.frozen_reference)"
            )
        object.__setattr__(self, "model", model)  # not a submodule: see the class docstring

    @property
    def policy(self):
        """The LoRA model whose adapters this reference switches off."""
        return self.model

    @property
    def config(self):
        """The model's config (its context length, width, ...)."""
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, *args, **kwargs):
        with torch.no_grad(), self.model.disable_adapter():
            return self.model(*args, **kwargs)

    def extra_repr(self) -> str:
        return "a LoRA model with its adapters off (no weights of its own)"


def value_and_reward_models(reward_model, rank: int, seed: int = 1):
    """LoRA's value model and the reward model it shares its weights with: ``(value_model, reward_model)``.

    Adapters of rank ``rank`` go on the reward model (changed in place); the value model reads the
    reward model's trunk with them on, through a head that starts as the reward model's normalised
    score (``rlhf.ValueModel.on_reward_model_trunk``), InstructGPT's starting point without the copy.
    The reward model returned is that model with the adapters off (``AdapterOffReference``): score it
    with ``adapters_off_score(score_fn)``, since ``reward_model.score_batch`` reads its layers directly."""
    from .rlhf import ValueModel  # here: rlhf imports training, which imports this module

    wrapped = add_lora(reward_model, rank, seed=seed)
    return ValueModel.on_reward_model_trunk(wrapped), AdapterOffReference(wrapped)


def adapters_off_score(score_fn):
    """``score_fn(reward_model, input_ids, attention_mask)`` for a reward model given as an
    ``AdapterOffReference``: it runs on the model inside, adapters off, without gradients."""

    def score(reward_model, input_ids, attention_mask):
        with torch.no_grad(), reward_model.model.disable_adapter():
            return score_fn(reward_model.model, input_ids, attention_mask)

    score.__name__ = f"{getattr(score_fn, '__name__', 'score')}_adapters_off"
    return score


def merged_copy(policy) -> nn.Module:
    """A plain ``transformers`` model (``GPT2LMHeadModel``, or the reward model's
    ``GPT2ForSequenceClassification`` with its trained head) whose weights are the LoRA model's,
    adapters merged in (W + (alpha / r) B A): the same outputs, no peft needed to read it. The policy is unchanged (the
    merge happens on a copy, so it briefly holds a second copy of the weights)."""
    if not is_lora(policy):
        raise CourseError("merged_copy: the model has no LoRA adapters; save it as it is")
    merged = copy.deepcopy(policy).merge_and_unload()
    merged.requires_grad_(True)  # a plain model, as load_causal_lm gives
    return merged.eval()


def save_model(model, folder: str | Path) -> Path:
    """``save_pretrained`` of a plain model; of a LoRA model, its merged copy (``merged_copy``): either
    way ``folder`` holds a plain GPT-2 (``config.json``, ``model.safetensors``), never adapter files."""
    folder = Path(folder)
    (merged_copy(model) if is_lora(model) else model).save_pretrained(folder, safe_serialization=True)
    return folder


save_merged = save_model  # the name that says what happens to a LoRA policy


def save_adapters(model, folder: str | Path) -> Path:
    """A LoRA model's adapter weights (and whatever else it trains) in ``folder/adapters.safetensors``:
    what a checkpoint needs, the frozen base being the stage's input."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in get_peft_model_state_dict(model).items()}
    save_file(state, folder / ADAPTER_FILE)
    return folder / ADAPTER_FILE


def load_adapters(model, folder: str | Path) -> None:
    """Load ``save_adapters``' weights back into a LoRA model of the same shape (every adapter must match)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_FILE
    if not path.exists():
        raise ValueError(f"checkpoint {folder} holds no {ADAPTER_FILE}: it was not saved from a LoRA model")
    state = load_file(path, device=str(model.device))
    expected = set(get_peft_model_state_dict(model))
    if set(state) != expected:
        raise ValueError(
            f"checkpoint {folder} does not match the model's adapters: missing {sorted(expected - set(state))}, "
            f"unexpected {sorted(set(state) - expected)}"
        )
    set_peft_model_state_dict(model, state)
