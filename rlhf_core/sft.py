"""Supervised fine-tuning (SFT): stage 1 of RLHF, imitating demonstrations.

Before any reward, the pretrained model is taught to *imitate* good behaviour: it is trained with
the ordinary next-token loss on (prompt, response) demonstrations written by people (Stiennon et
al., 2020, "Learning to summarize from human feedback", fine-tune on reference summaries; Ouyang
et al., 2022, "Training language models to follow instructions with human feedback" (InstructGPT),
call it step 1, SFT on labeler demonstrations). Two details make it differ from pretraining:

- **Loss on the response only.** The prompt is given, not written by the model, so its tokens
  are not predicted. The usual way to say so (Hugging Face, TRL, most codebases) is a ``labels``
  tensor equal to ``input_ids`` with ``-100`` wherever no loss is wanted: on the prompt and on
  padding. ``-100`` is the ``ignore_index`` of ``torch.nn.functional.cross_entropy``:

      tokens:   The  film  was  fun  .   |  The  acting  was  great  .  <eos>  <pad>
      labels:   -100 -100 -100 -100 -100 |  The  acting  was  great  .  <eos>  -100

  (equivalently: a loss mask equal to ``response_mask``). The EOS *is* a label: the model must
  learn where a response ends, or it rambles until the length limit.
- **Shifted by one.** The logits at position t predict token t+1, so the loss pairs
  ``logits[:, :-1]`` with ``labels[:, 1:]``: the last prompt token's logits predict the first
  response token.

The loss is the mean over all response tokens of the batch (long responses weigh more, as in
Hugging Face's ``labels=`` loss). Training is the course's one loop (``rlhf_core.loop.train_loop``):
AdamW, linear warmup then cosine decay, gradient clipping, the NaN guard and resumable
checkpoints. An interrupted run resumed with ``resume=True`` ends with the same weights, bit for
bit on CPU, because the batch of every step is a pure function of (seed, step) and all the rest
is restored from the checkpoint. Under ``accelerate launch`` each process takes its rows of the
step's batch and steps on its share of the batch's token mean (``rlhf_core.distributed``): the same
updates as one process with the whole batch, up to float rounding.

What SFT can reach: a model that imitates the demonstrators perfectly writes like their *average*,
so its gold is (at best) the demonstrators' mean gold, the imitation ceiling. ``frozen_reference``
keeps a frozen copy of the SFT model: pi_ref, the anchor of RLHF's KL penalty.

A demonstration longer than the model's context (``n_positions``) is cut to fit, keeping its EOS
(the same rule as ``max_response_tokens``). Under mixed precision (``precision``, see
``rlhf_core.precision``) the forward passes run in 16 bits and the loss is computed in float32.

``load_or_train_sft`` is what later chapters call: the profile's SFT model from
``cache_dir()/<profile>/sft`` (safetensors, plus ``sft_summary.json`` with the config and the loss
history), trained from the base model on the standard demonstrations when it is missing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from . import distributed
from .batching import TokenBatch, encode_responses, pack
from .config import LORA_LEARNING_RATE_SCALE, Profile, get_profile, lora_rank_of, seed_everything, with_overrides
from .logprobs import context_length, forward_logits
from .loop import batch_rows, save_final, steps_done, steps_per_epoch, train_loop
from .models import disable_dropout
from .precision import autocast, resolve_precision
from .training import adamw

IGNORE_INDEX = -100  # cross_entropy's default ignore_index: "no loss at this position"
SUMMARY_FILE = "sft_summary.json"


@dataclass(frozen=True)
class SFTConfig:
    epochs: float = 2.0  # passes over the training demonstrations (used when ``steps`` is None)
    steps: int | None = None  # optimiser steps; when set, overrides ``epochs``
    batch_size: int = 32  # demonstrations per optimiser step
    learning_rate: float = 1e-3  # peak AdamW learning rate (small models like it high; gpt2 wants ~5e-5)
    warmup_steps: int = 20  # linear warmup before the cosine decay
    weight_decay: float = 0.01  # AdamW decoupled weight decay on matrices (not biases, not LayerNorm)
    max_grad_norm: float = 1.0  # gradient clipping (global L2 norm)
    max_response_tokens: int = 96  # responses are cut to this many tokens before EOS is appended
    heldout_records: int = 256  # the last demonstrations, kept out of training for the held-out loss
    eval_every: int = 40  # steps between held-out losses (also measured before the first and after the last step)
    checkpoint_every: int = 100  # steps between resumable checkpoints when ``out_dir`` is given (0: never)
    seed: int = 0  # batch order (and every other random state)
    lora_rank: int = 0  # LoRA adapters of this rank on the base model, merged when saved (0: full; rlhf_core.lora)

    @classmethod
    def for_profile(cls, profile: Profile | str | None = None, **overrides) -> SFTConfig:
        """The defaults the course uses (and caches) for a profile, with ``overrides`` applied."""
        profile = _profile(profile)
        if profile.name == "tiny":
            config = cls()
        elif profile.name == "small":
            config = cls(learning_rate=5e-4)
        else:  # gpt2: a 124M model pretrained on the web; a gentle learning rate, shorter responses
            config = cls(
                batch_size=16,
                learning_rate=5e-5,
                warmup_steps=30,
                max_response_tokens=profile.max_new_tokens - 1,
                eval_every=50,
            )
        if profile.quick:  # a smoke test (config.quick_variant): a few steps, a small held-out set
            config = replace(config, steps=24, batch_size=8, warmup_steps=4, heldout_records=16, eval_every=8)
        lora_rank = lora_rank_of(profile, overrides)
        if lora_rank:  # LoRA: a larger step (config.LORA_LEARNING_RATE_SCALE)
            config = replace(config, lora_rank=lora_rank, learning_rate=LORA_LEARNING_RATE_SCALE * config.learning_rate)
        return with_overrides(config, overrides)

    def total_steps(self, n_train: int) -> int:
        """Optimiser steps of the run for ``n_train`` training demonstrations (an epoch drops the
        incomplete last batch)."""
        if self.steps is not None:
            return self.steps
        return max(1, round(self.epochs * steps_per_epoch(n_train, self.batch_size, drop_last=True)))


def _profile(profile: Profile | str | None) -> Profile:
    return profile if isinstance(profile, Profile) else get_profile(profile)


@dataclass
class SFTBatch(TokenBatch):
    labels: torch.Tensor  # (B, T) input_ids where the loss applies (response + EOS), -100 elsewhere


def sft_labels(batch: TokenBatch) -> torch.Tensor:
    """Labels for the next-token loss: the token ids on response tokens (EOS included), -100 on
    prompt tokens and padding. Found through ``response_mask``, never by comparing ids with the
    pad id (for GPT-2, pad == EOS, and the EOS must stay a label). (B, T)"""
    return batch.input_ids.masked_fill(batch.response_mask == 0, IGNORE_INDEX)


def sft_batch(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    padding_side: str = "right",
    max_response_tokens: int | None = None,
) -> SFTBatch:
    """Prompts and responses as one padded batch (EOS appended to each response) with its labels."""
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    response_ids = encode_responses(tokenizer, responses, add_eos=True, max_tokens=max_response_tokens)
    return _pack_with_labels(prompt_ids, response_ids, tokenizer.pad_token_id, padding_side)


def fit_responses(prompt_ids, response_ids, context: int | None) -> list[list[int]]:
    """Each response cut so that prompt + response fit ``context`` tokens, its last token (the EOS)
    kept: a cut demonstration still teaches where a response ends."""
    if context is None:
        return [list(ids) for ids in response_ids]
    return [
        list(ids) if len(p) + len(ids) <= context else list(ids[: max(0, context - len(p) - 1)]) + list(ids[-1:])
        for p, ids in zip(prompt_ids, response_ids)
    ]


def _pack_with_labels(prompt_ids, response_ids, pad_id: int, padding_side: str = "right") -> SFTBatch:
    batch = pack(prompt_ids, response_ids, pad_id, padding_side)
    return SFTBatch(batch.input_ids, batch.attention_mask, batch.response_mask, sft_labels(batch))


def sft_loss(model, batch: SFTBatch, reduction: str = "mean") -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens (the response and its EOS); their sum
    with ``reduction="sum"`` (one process's share of a batch split over several, ``train_sft``)."""
    logits = forward_logits(model, batch.input_ids, batch.attention_mask)  # (B, T, V)
    shifted_logits = logits[:, :-1, :]  # position t predicts token t + 1
    shifted_labels = batch.labels[:, 1:]  # (B, T-1)
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]).float(),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def frozen_reference(model):
    """pi_ref: a deep copy of ``model`` that cannot change (no gradients, eval mode, no dropout).
    RLHF's KL penalty measures how far the policy drifts from it."""
    reference = copy.deepcopy(model)
    disable_dropout(reference)
    reference.requires_grad_(False)
    return reference.eval()


def _columns(records) -> tuple[list[str], list[str]]:
    """Prompts and responses of a ``datasets.Dataset`` or a list of dicts."""
    if hasattr(records, "column_names"):
        return list(records["prompt"]), list(records["response"])
    return [r["prompt"] for r in records], [r["response"] for r in records]


def data_fingerprint(prompts: Sequence[str], responses: Sequence[str]) -> str:
    """A short hash of the training text: a checkpoint only resumes on the data it was made on."""
    digest = hashlib.sha256()
    for prompt, response in zip(prompts, responses):
        digest.update(json.dumps([prompt, response]).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def heldout_loss(
    model, prompt_ids, response_ids, pad_id: int, batch_size: int = 128, precision: str | None = None
) -> float:
    """Mean response-token loss over held-out demonstrations (every response token weighs the same)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)

    def chunk(index: int) -> tuple[float, int]:  # (mean loss, tokens) of the index-th batch of demonstrations
        start = index * batch_size
        batch = _pack_with_labels(
            prompt_ids[start : start + batch_size], response_ids[start : start + batch_size], pad_id
        ).to(device)
        with autocast(device, precision):
            return sft_loss(model, batch).item(), int((batch.labels[:, 1:] != IGNORE_INDEX).sum())

    total, count = 0.0, 0
    # several processes (rlhf_core.distributed) share the batches; the sum runs in the same order
    for loss, tokens in distributed.map_chunks(math.ceil(len(prompt_ids) / batch_size), chunk):
        total += loss * tokens
        count += tokens
    model.train(was_training)
    return total / max(1, count)


def history_series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, for plotting: e.g. ``history_series(h, "heldout_loss")``."""
    rows = [row for row in history if row.get(key) is not None]
    return [row["step"] for row in rows], [row[key] for row in rows]


def train_sft(
    model,
    tokenizer,
    records,
    config: SFTConfig | None = None,
    out_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    stop_after_steps: int | None = None,
    callback: Callable[[dict], None] | None = None,
    precision: str | None = None,
):
    """Fine-tune ``model`` (in place, on its own device) on demonstrations; returns ``(model, history)``.

    ``records``: a ``datasets.Dataset`` or a list of dicts with ``prompt`` and ``response`` (other
    columns, like ``gold``, are ignored). The last ``config.heldout_records`` are held out.

    ``history`` is a list of dicts, one per step: ``step`` (steps done), ``loss`` (train loss of the
    step's batch), ``lr``, ``grad_norm`` (before clipping), ``response_tokens`` (in the step's
    batch: the tokens the loss is over) and, every ``eval_every`` steps, ``heldout_loss``. Row 0 (step 0) holds the
    held-out loss before training. ``history_series`` pulls one metric out for plotting.
    ``callback(record)`` runs after every step.

    With ``out_dir``: a resumable checkpoint every ``config.checkpoint_every`` steps in
    ``out_dir/checkpoint`` (``resume=True`` continues from it), and at the end the model
    (safetensors), the tokenizer and ``sft_summary.json`` (config, history, timings) in ``out_dir``.
    ``stop_after_steps`` ends this call early after saving a checkpoint (to train in slices, or to
    test resuming); the history then stops short of the total. ``precision``: fp32, bf16 or fp16
    (None: ``RLHF_PRECISION``, else auto: fp32 on a CPU), see ``rlhf_core.precision``.
    """
    config = config or SFTConfig()
    prompts, responses = _columns(records)
    n_heldout = config.heldout_records
    n_train = len(prompts) - n_heldout
    if n_train < config.batch_size:
        raise ValueError(
            f"{len(prompts)} demonstrations leave {n_train} for training after holding out "
            f"{n_heldout}: fewer than one batch of {config.batch_size}"
        )
    distributed.require_rows(config.batch_size, "SFTConfig batch_size")
    total_steps = config.total_steps(n_train)
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    seed_everything(config.seed)

    # Tokenize once: prompt ids, and response ids cut to max_response_tokens with EOS appended,
    # then to the model's context.
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = encode_responses(tokenizer, responses, add_eos=True, max_tokens=config.max_response_tokens)
    response_ids = fit_responses(prompt_ids, response_ids, context_length(model))
    train_prompts, train_responses = prompt_ids[:n_train], response_ids[:n_train]
    heldout_prompts, heldout_responses = prompt_ids[n_train:], response_ids[n_train:]
    pad_id = tokenizer.pad_token_id
    disable_dropout(model)

    def loss_on_step(step: int) -> tuple[torch.Tensor, dict]:
        rows = distributed.shard(batch_rows(step, n_train, config.batch_size, config.seed, drop_last=True))
        batch = _pack_with_labels([train_prompts[i] for i in rows], [train_responses[i] for i in rows], pad_id).to(
            device
        )
        if not distributed.is_distributed():
            return sft_loss(model, batch), {"response_tokens": int(batch.response_mask.sum())}
        # several processes: each its rows' token sum, over the global batch's tokens (rlhf_core.distributed)
        counts = torch.stack([(batch.labels[:, 1:] != IGNORE_INDEX).sum(), batch.response_mask.sum()]).double()
        labels, tokens = distributed.sum_across(counts).tolist()
        return distributed.share_of_sum(sft_loss(model, batch, "sum"), labels), {"response_tokens": int(tokens)}

    def evaluate() -> dict:
        return {"heldout_loss": heldout_loss(model, heldout_prompts, heldout_responses, pad_id, precision=precision)}

    identity = {"config": asdict(config), "data": data_fingerprint(prompts, responses)}
    checkpoint = Path(out_dir) / "checkpoint" if out_dir is not None else None
    started = time.perf_counter()
    history = train_loop(
        model,
        adamw(model, config.learning_rate, config.weight_decay, betas=(0.9, 0.95)),
        loss_on_step,
        steps=total_steps,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        max_grad_norm=config.max_grad_norm,
        name="SFT",
        evaluate=evaluate if heldout_prompts else None,
        eval_every=config.eval_every,
        checkpoint_dir=checkpoint,
        checkpoint_every=config.checkpoint_every,
        identity=identity,
        resume=resume,
        stop_after_steps=stop_after_steps,
        callback=callback,
        progress=progress,
        precision=precision,
    )

    if out_dir is not None and steps_done(history) == total_steps:
        heldout = [row["heldout_loss"] for row in history if "heldout_loss" in row]
        summary = {
            "finished": True,
            "config": asdict(config),
            "data": identity["data"],
            "n_train": n_train,
            "n_heldout": len(heldout_prompts),
            "steps": total_steps,
            "heldout_loss_before": heldout[0] if heldout else None,
            "heldout_loss_after": heldout[-1] if heldout else None,
            "seconds_this_run": round(time.perf_counter() - started, 2),
            "history": history,
        }
        save_final(out_dir, model, SUMMARY_FILE, summary, tokenizer)
    return model, history
