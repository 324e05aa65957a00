"""The reward model r_phi(x, y): the SFT backbone with a scalar head, trained on comparisons.

The recipe of Ziegler et al. (2019), Stiennon et al. (2020, "Learning to summarize from human
feedback") and Ouyang et al. (2022, InstructGPT), with the details collected by Huang et al.
(2024, "The N implementation details of RLHF with PPO"):

1. **Surgery.** Copy the SFT model and replace its LM head (d_model -> vocabulary logits) by a
   linear head d_model -> 1, initialised N(0, std = 1 / sqrt(d_model + 1)) (Huang et al.). The
   backbone starts from what SFT learned about the text. We use ``transformers``'
   ``GPT2ForSequenceClassification`` with ``num_labels=1``, so the checkpoint is an ordinary
   sequence-classification model that ``AutoModelForSequenceClassification`` loads. Its head,
   ``score``, has no bias: a constant added to every score cancels in every comparison.

2. **Read at the last real token.** r_phi(x, y) is the head applied to the hidden state of the
   last real token of prompt + response: the EOS token when the response ended, otherwise its
   last token (a response cut by the length limit is scored as it is, without an EOS it never
   wrote, so the model can tell it apart). The position is found from the attention mask
   (``rlhf_core.batching.last_token_index``) and positions are counted over real tokens, so left
   padding, right padding or no padding give the same score. We do *not* use the model's own
   ``forward`` pooling: it looks for the last token that is not the pad id, which, when pad ==
   EOS (GPT-2), skips the EOS itself; and it counts positions from column 0, so left padding
   shifts them.

3. **Bradley-Terry loss.** If people prefer y_w to y_l with probability
   sigmoid(r(x, y_w) - r(x, y_l)), the negative log-likelihood of the labels is
   loss = -mean log sigmoid(r(x, y_w) - r(x, y_l)).

4. **Normalisation.** After training, a gain and a bias make the scores of the SFT policy's own
   samples have mean 0 and standard deviation 1 (Ziegler et al.; Huang et al.), so the KL
   coefficient of PPO means the same thing from run to run. They are stored in ``config.json``
   as ``reward_gain`` / ``reward_bias``; ``normalize=True`` (the default) applies them:
   normalised = reward_gain * raw + reward_bias.

Under mixed precision (``precision``, see ``rlhf_core.precision``) the transformer runs in 16 bits;
the scores are cast to float32 before any loss, mean or normalisation is computed from them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GPT2ForSequenceClassification

from . import distributed
from .batching import (
    TokenBatch,
    encode_responses,
    last_token_index,
    pack,
    per_row_in_buckets,
    position_ids_from_mask,
)
from .config import LORA_LEARNING_RATE_SCALE, Profile, get_profile, lora_rank_of, seed_everything, with_overrides
from .loop import batch_rows, fingerprint, steps_per_epoch, train_loop
from .models import disable_dropout
from .precision import autocast, resolve_precision
from .training import adamw


@dataclass
class RewardModelConfig:
    epochs: int = 2  # passes over the training pairs (the papers use 1; a tiny model needs a little more)
    steps: int | None = None  # optimiser steps; None: as many as ``epochs`` passes take
    batch_size: int = 32  # pairs per optimiser step (each step scores 2 x batch_size texts)
    learning_rate: float = 1e-3  # peak AdamW learning rate (small models like it high)
    warmup_steps: int = 8  # linear warmup before the cosine decay (5% of the tiny profile's 170 steps)
    weight_decay: float = 0.01  # AdamW decoupled weight decay on matrices
    max_grad_norm: float = 1.0  # gradient clipping
    eval_every: int = 25  # steps between held-out accuracy measurements (0: only at the end)
    checkpoint_every: int = 50  # steps between resumable checkpoints when a folder is given (0: never)
    heldout_fraction: float = 0.1  # share of prompts whose pairs are kept out of training
    n_normalization_prompts: int = 512  # fresh SFT samples that fix the mean-0 / std-1 normalisation
    score_batch_size: int = 128  # texts scored per forward pass when not training
    seed: int = 0  # head initialisation, pair shuffling, split and normalisation samples
    lora_rank: int = 0  # LoRA adapters on the trunk, the head trained in full, merged when saved (0: full; for_profile)

    @classmethod
    def for_profile(cls, profile: Profile | str | None = None, **overrides) -> RewardModelConfig:
        """The defaults the course uses (and caches) for a profile, with ``overrides`` applied."""
        profile = profile if isinstance(profile, Profile) else get_profile(profile)
        if not profile.offline:  # gpt2 (124M) and up: the papers' single epoch and a gentler rate
            config = cls(
                epochs=1,
                batch_size=16,
                learning_rate=1e-5,
                warmup_steps=11,  # 5% of ~225 steps
                eval_every=50,
                score_batch_size=64,
            )
        else:
            config = cls()
        if profile.quick:  # a smoke test (config.quick_variant): a few steps, few normalisation samples
            config = replace(
                config,
                steps=16,
                batch_size=8,
                warmup_steps=2,
                eval_every=8,
                n_normalization_prompts=32,
                score_batch_size=32,
            )
        # LoRA by default on the hub GPT-2s only. On tiny a LoRA reward model stays at chance: held-out
        # accuracy 0.49 at rank 8 (0.50 at rank 32, 0.46 with the MLPs adapted too) against 0.72 trained in
        # full from the same SFT model; the frozen SFT features read by a linear head reach 0.54, LoRA with
        # the token embeddings trained too 0.63. The 2 x 128 model's features do not carry the preference,
        # and learning them takes every weight; so ``run --lora`` leaves the offline reward model in full.
        lora_rank = lora_rank_of(profile, overrides) if not profile.offline else int(overrides.get("lora_rank") or 0)
        if lora_rank:  # LoRA: a larger step (config.LORA_LEARNING_RATE_SCALE)
            config = replace(config, lora_rank=lora_rank, learning_rate=LORA_LEARNING_RATE_SCALE * config.learning_rate)
        return with_overrides(config, overrides)

    def total_steps(self, n_train: int) -> int:
        """Optimiser steps of the run for ``n_train`` training pairs (the last batch of an epoch
        holds what is left)."""
        if self.steps is not None:
            return self.steps
        return self.epochs * steps_per_epoch(n_train, self.batch_size)


# ----------------------------------------------------------------------------------------------
# The model


def reward_model_from_policy(policy) -> GPT2ForSequenceClassification:
    """The surgery: a copy of ``policy``'s transformer with a fresh scalar head instead of its LM head.

    The head is initialised N(0, 1 / sqrt(d_model + 1)) (Huang et al., 2024), so initial scores
    are O(1) and differ between texts. ``policy`` itself is not changed.
    """
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    config.architectures = ["GPT2ForSequenceClassification"]
    config.reward_gain = 1.0  # normalisation, set by fit_normalization
    config.reward_bias = 0.0
    reward_model = GPT2ForSequenceClassification(config)
    reward_model.transformer.load_state_dict(policy.transformer.state_dict())
    d_model = config.n_embd
    with torch.no_grad():
        reward_model.score.weight.normal_(0.0, 1.0 / math.sqrt(d_model + 1))
    disable_dropout(reward_model)
    return reward_model.to(next(policy.parameters()).device).eval()


def normalization(reward_model) -> tuple[float, float]:
    """(gain, bias) of the stored normalisation; (1, 0) before ``fit_normalization``."""
    return (
        float(getattr(reward_model.config, "reward_gain", 1.0)),
        float(getattr(reward_model.config, "reward_bias", 0.0)),
    )


def score_batch(
    reward_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
) -> torch.Tensor:
    """r_phi(x, y) of each row, read at its last real token. (B, T) -> (B,)

    Gradients flow (training uses this too); wrap in ``torch.no_grad()`` to score only.
    """
    hidden = reward_model.transformer(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),  # left padding must not shift positions
        use_cache=False,
    ).last_hidden_state  # (B, T, d)
    last = last_token_index(attention_mask)  # (B,) column of the last real token: EOS if present
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    scores = reward_model.score(hidden[rows, last]).squeeze(-1).float()  # (B,) float32 under autocast too
    if normalize:
        gain, bias = normalization(reward_model)
        scores = gain * scores + bias
    return scores


def encode_for_scoring(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    ended: Sequence[bool] | None = None,
    max_length: int | None = None,
    padding_side: str = "right",
) -> TokenBatch:
    """Prompt + response tokens; EOS is appended to the responses that ended (all, by default).

    ``max_length`` (the model's context) cuts over-long responses from the end, keeping their EOS.
    """
    if not len(prompts) == len(responses):
        raise ValueError(f"got {len(prompts)} prompts and {len(responses)} responses")
    ended = [True] * len(responses) if ended is None else [bool(e) for e in ended]
    if len(ended) != len(responses):
        raise ValueError(f"got {len(responses)} responses and {len(ended)} ended flags")
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    response_ids = encode_responses(tokenizer, responses, add_eos=False)
    response_ids = [ids + [tokenizer.eos_token_id] if end else ids for ids, end in zip(response_ids, ended)]
    if max_length is not None:
        response_ids = [
            ids if len(p) + len(ids) <= max_length else ids[: max(0, max_length - len(p) - 1)] + ids[-1:]
            for p, ids in zip(prompt_ids, response_ids)
        ]
    return pack(prompt_ids, response_ids, tokenizer.pad_token_id, padding_side)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_texts(
    reward_model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    batch_size: int = 128,
    normalize: bool = True,
    ended: Sequence[bool] | None = None,
    precision: str | None = None,
) -> np.ndarray:
    """r_phi(x, y) for many (prompt, response) texts, as a float array.

    ``ended[i]`` False: response i never produced EOS (it hit the length limit); it is scored at
    its last token, without EOS. ``ended=None`` treats every response as finished. ``precision``:
    fp32, bf16 or fp16 (None: ``RLHF_PRECISION``, else auto).
    """
    reward_model.eval()
    device = _device(reward_model)
    precision = resolve_precision(precision, device)
    ended = [True] * len(responses) if ended is None else list(ended)

    def chunk(index: int) -> torch.Tensor:  # (batch_size,) scores of the index-th batch of texts
        start, stop = index * batch_size, (index + 1) * batch_size
        batch = encode_for_scoring(
            tokenizer,
            prompts[start:stop],
            responses[start:stop],
            ended[start:stop],
            max_length=reward_model.config.n_positions,
        ).to(_device(reward_model))
        with autocast(device, precision):  # rows of similar length together: no pass pays for the longest text
            return per_row_in_buckets(
                batch, lambda rows: score_batch(reward_model, rows.input_ids, rows.attention_mask, normalize)
            ).cpu()

    # several processes (rlhf_core.distributed) score a share of the batches each: the same numbers
    scores = distributed.map_chunks(math.ceil(len(prompts) / batch_size), chunk)
    return torch.cat(scores).numpy() if scores else np.zeros(0, dtype=np.float32)


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """-mean log sigmoid(r_chosen - r_rejected): the negative log-likelihood of the labels under
    the Bradley-Terry model. ``logsigmoid`` stays finite where log(sigmoid(.)) would give log(0)."""
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


# ----------------------------------------------------------------------------------------------
# Training and evaluation


def _pair_batch(tokenizer, records: Sequence[dict], max_length: int) -> TokenBatch:
    """One batch of 2n texts: the n chosen responses, then the n rejected ones (same prompts).
    Scored with ``batching.per_row_in_buckets``, a chosen text is not padded to its rejected one."""
    prompts = [r["prompt"] for r in records]
    responses = [r["chosen"] for r in records] + [r["rejected"] for r in records]
    ended = [r.get("chosen_ended", True) for r in records] + [r.get("rejected_ended", True) for r in records]
    return encode_for_scoring(tokenizer, prompts + prompts, responses, ended, max_length)


def pair_scores(
    reward_model,
    tokenizer,
    records: Sequence[dict],
    batch_size: int = 128,
    normalize: bool = False,
    precision: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(chosen scores, rejected scores) of preference records, raw unless ``normalize``."""
    prompts = [r["prompt"] for r in records]
    chosen = score_texts(
        reward_model,
        tokenizer,
        prompts,
        [r["chosen"] for r in records],
        batch_size,
        normalize,
        [r.get("chosen_ended", True) for r in records],
        precision,
    )
    rejected = score_texts(
        reward_model,
        tokenizer,
        prompts,
        [r["rejected"] for r in records],
        batch_size,
        normalize,
        [r.get("rejected_ended", True) for r in records],
        precision,
    )
    return chosen, rejected


def pairwise_accuracy(
    reward_model, tokenizer, records: Sequence[dict], batch_size: int = 128, precision: str | None = None
) -> dict:
    """How often the reward model ranks a pair the way the labels do, and the way the gold does.

    ``accuracy_labels``: share of pairs where r(chosen) > r(rejected) (ties count one half).
    ``accuracy_gold``: the same against the noise-free gold order, over pairs that have gold scores
    and no gold tie (NaN when there are none). Also ``loss`` (Bradley-Terry) and ``n_pairs``.
    """
    chosen, rejected = pair_scores(reward_model, tokenizer, records, batch_size, precision=precision)
    margin = chosen - rejected  # (N,)
    agree = (margin > 0) + 0.5 * (margin == 0)
    gold_gap = np.array([r.get("chosen_gold", np.nan) - r.get("rejected_gold", np.nan) for r in records])
    has_gold = np.isfinite(gold_gap) & (gold_gap != 0)
    gold_agree = (np.sign(margin) == np.sign(gold_gap)) + 0.5 * (margin == 0)
    loss = bradley_terry_loss(torch.from_numpy(chosen), torch.from_numpy(rejected))
    return {
        "accuracy_labels": float(agree.mean()) if len(records) else float("nan"),
        "accuracy_gold": float(gold_agree[has_gold].mean()) if has_gold.any() else float("nan"),
        "loss": float(loss),
        "n_pairs": len(records),
    }


def train_reward_model(
    reward_model,
    tokenizer,
    train_records: Sequence[dict],
    heldout_records: Sequence[dict],
    config: RewardModelConfig,
    progress: bool = True,
    out_dir: str | Path | None = None,
    resume: bool = True,
    stop_after_steps: int | None = None,
    callback: Callable[[dict], None] | None = None,
    precision: str | None = None,
) -> tuple[GPT2ForSequenceClassification, list[dict]]:
    """Fit r_phi to the labels with the Bradley-Terry loss; returns ``(reward_model, history)``.

    ``history`` has one dict per step: ``step``, ``epoch`` (passes so far), ``lr``, ``grad_norm``,
    ``loss`` and ``accuracy`` (on that step's pairs); every ``eval_every`` steps and at the end
    (and in row 0, before training) also ``heldout_accuracy_labels``, ``heldout_accuracy_gold``
    and ``heldout_loss``. Only the labels (chosen vs rejected) are used; the gold scores are read
    for the accuracy against gold only. ``callback(record)`` runs after every step.

    With ``out_dir``: a resumable checkpoint every ``config.checkpoint_every`` steps in
    ``out_dir/checkpoint`` (``resume=True`` continues from it); ``stop_after_steps`` ends this call
    early after saving one. Nothing else is written: the model is finished (``fit_normalization``)
    and saved by the caller, whose save replaces the folder holding the checkpoint.
    ``precision``: fp32, bf16 or fp16 (None: ``RLHF_PRECISION``, else auto), see ``rlhf_core.precision``.
    Under ``accelerate launch`` each process scores its pairs of a step's batch and steps on its share of
    the batch's mean loss (``rlhf_core.distributed``): the updates of one process with the whole batch.
    """
    if not train_records:
        raise ValueError("no training pairs")
    distributed.require_rows(config.batch_size, "RewardModelConfig batch_size")
    seed_everything(config.seed)
    device = _device(reward_model)
    precision = resolve_precision(precision, device)
    max_length = reward_model.config.n_positions
    per_epoch = steps_per_epoch(len(train_records), config.batch_size)

    def loss_on_step(step: int) -> tuple[torch.Tensor, dict]:
        rows = batch_rows(step, len(train_records), config.batch_size, config.seed)
        pairs = [train_records[i] for i in distributed.shard(rows)]  # all of them in a single process
        if not pairs:  # several processes, a last batch smaller than their number
            stats = distributed.global_means({"accuracy": torch.zeros(0)}, len(rows))
            return distributed.empty_share(reward_model), {**stats, "epoch": (step + 1) / per_epoch}
        batch = _pair_batch(tokenizer, pairs, max_length).to(device)
        scores = per_row_in_buckets(
            batch,
            lambda rows: score_batch(  # (2n,), in buckets of similar length
                reward_model, rows.input_ids, rows.attention_mask, normalize=False
            ),
        )
        chosen_scores, rejected_scores = scores[: len(pairs)], scores[len(pairs) :]  # (n,), (n,)
        # alone: bradley_terry_loss and the batch's accuracy; several processes: their shares (distributed)
        loss = distributed.share_of_mean(-F.logsigmoid(chosen_scores - rejected_scores), len(rows))
        stats = distributed.global_means({"accuracy": (chosen_scores > rejected_scores).float()}, len(rows))
        return loss, {**stats, "epoch": (step + 1) / per_epoch}

    def evaluate() -> dict:
        metrics = pairwise_accuracy(reward_model, tokenizer, heldout_records, config.score_batch_size, precision)
        return {
            "heldout_accuracy_labels": metrics["accuracy_labels"],
            "heldout_accuracy_gold": metrics["accuracy_gold"],
            "heldout_loss": metrics["loss"],
        }

    checkpoint = Path(out_dir) / "checkpoint" if out_dir is not None else None
    history = train_loop(
        reward_model,
        adamw(reward_model, config.learning_rate, config.weight_decay),
        loss_on_step,
        steps=config.total_steps(len(train_records)),
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        max_grad_norm=config.max_grad_norm,
        name="reward-model",
        description="training reward model",
        evaluate=evaluate if heldout_records else None,
        eval_every=config.eval_every,
        checkpoint_dir=checkpoint,
        checkpoint_every=config.checkpoint_every,
        identity={"config": asdict(config), "data": fingerprint([list(train_records), list(heldout_records)])},
        resume=resume,
        stop_after_steps=stop_after_steps,
        callback=callback,
        progress=progress,
        precision=precision,
    )
    return reward_model, history


def history_last(history: Sequence[dict], key: str) -> float:
    """The latest value of ``key`` in a training history (NaN if never logged)."""
    for record in reversed(history):
        if key in record:
            return record[key]
    return float("nan")


def fit_normalization(
    reward_model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    ended: Sequence[bool] | None = None,
    batch_size: int = 128,
    precision: str | None = None,
) -> dict:
    """Set the stored gain and bias so that the scores of these responses (samples of the SFT
    policy) have mean 0 and standard deviation 1. Returns the raw ``mean`` and ``std``."""
    raw = score_texts(
        reward_model, tokenizer, prompts, responses, batch_size, normalize=False, ended=ended, precision=precision
    )
    mean, std = float(raw.mean()), float(raw.std())
    if not std > 0:
        raise ValueError(f"reward-model scores have no spread (std {std}): cannot normalise")
    reward_model.config.reward_gain = 1.0 / std
    reward_model.config.reward_bias = -mean / std
    return {"mean": mean, "std": std}
