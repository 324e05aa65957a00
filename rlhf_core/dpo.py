"""Direct Preference Optimization: RLHF's objective, optimised on preference pairs without a reward
model or sampling (Rafailov et al., 2023), and its IPO variant (Azar et al., 2023).

**From the RLHF objective to a loss.** PPO maximises, for each prompt x,

    max_pi  E_{y ~ pi(.|x)} [ r(x, y) ]  -  beta * KL( pi(.|x) || pi_ref(.|x) ).

Written as one expectation, E_pi[ r - beta log(pi / pi_ref) ] = -beta KL(pi || pi_ref e^{r/beta} / Z)
+ beta log Z(x), so the objective is maximised (over all distributions) by

    pi*(y|x) = pi_ref(y|x) exp( r(x, y) / beta ) / Z(x),    Z(x) = sum_y pi_ref(y|x) exp( r(x, y) / beta ).

Z(x) sums over every possible response and cannot be computed, but the relation can be turned
around: any policy pi is the optimum of the reward

    r_pi(x, y) = beta log( pi(y|x) / pi_ref(y|x) ) + beta log Z(x),

its *implicit reward*. The reward model of chapter 03 is fitted with the Bradley-Terry model,
P(y_w preferred to y_l | x) = sigmoid( r(x, y_w) - r(x, y_l) ), which only ever sees reward
*differences*: beta log Z(x) is the same for both responses to one prompt and cancels. Putting the
implicit reward into the Bradley-Terry likelihood gives a loss on the policy itself,

    L_DPO = -log sigmoid( beta * [ (log pi(y_w|x) - log pi(y_l|x)) - (log pi_ref(y_w|x) - log pi_ref(y_l|x)) ] ),

the reward model's loss with the reward model replaced by the policy. Minimising it fits the
preferences and, by construction, solves the KL-regularised problem for the reward it implies;
beta plays the same role as PPO's KL coefficient (small beta: far from pi_ref). No sampling,
no value model, no reward model: one forward pass of the policy over the two responses of each
pair, and the reference log-probs computed once.

**IPO** (Azar et al., 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences", eq. 17). With near-deterministic preferences, the DPO loss keeps rewarding a larger
margin for ever: log sigmoid -> 0 only as the log-ratio difference h -> infinity, so the policy can
drift arbitrarily far from pi_ref whatever beta says. IPO regresses h onto a fixed target instead:

    L_IPO = ( h - 1 / (2 tau) )^2,   h = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l)),

where tau is IPO's regularisation strength. Like TRL we pass it as ``beta`` (tau = beta): a larger
beta means a smaller target margin 1/(2 beta), i.e. stronger regularisation, as in DPO. One
difference from TRL: TRL's IPO averages the token log-probs of each response, where this module
sums them for both losses (the DPO paper's choice, and the log-probability of the sequence the
derivation is about); the target 1/(2 beta) is then a margin in nats per *response*.

**Conventions.** Sequence log-probs are sums over the response tokens (EOS included when the
response ended) from ``rlhf_core.logprobs``. A batch of pairs stacks the chosen and rejected rows
(``encode_preference_batch``) and runs them in buckets of similar length, so no row is padded to a
much longer one (see ``pair_logps``). The reference is frozen and its log-probs are
computed once before training (``precompute_reference_logps``), for the training pairs the run
will actually visit (``used_rows``); ``load_or_train_dpo`` keeps them on disk, so runs with other
betas reuse them. Logged "rewards" are the implicit
rewards beta * (log pi - log pi_ref) of the chosen and rejected responses (beta log Z left out:
it cancels in every comparison); "accuracy" is the share of pairs whose chosen response has the
larger implicit reward (a tie, e.g. at step 0 where pi = pi_ref, counts as wrong). Under mixed
precision (``precision``, see ``rlhf_core.precision``) the forward passes run in 16 bits; the
log-probs, and so the loss, are float32. A pair longer than the model's context is cut to it
(``logprobs.fit_to_context``), the same way for the policy and the reference.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from . import distributed
from .config import LORA_LEARNING_RATE_SCALE, Profile, get_profile, lora_rank_of, seed_everything, with_overrides
from .dpo_data import (  # noqa: F401 (part of rlhf_core.dpo's API: the chapters call them from here)
    _ended,
    encode_preference_batch,
    pair_logps,
    precompute_reference_logps,
    reference_logps_for_rows,
    used_rows,
)
from .loop import batch_rows, fingerprint, save_final, steps_done, steps_per_epoch, train_loop
from .models import disable_dropout
from .precision import autocast, resolve_precision
from .training import adamw

LOSS_TYPES = ("sigmoid", "ipo")


# ----------------------------------------------------------------------------------------------
# The loss


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO (``"sigmoid"``) or IPO (``"ipo"``) loss from summed sequence log-probs, all (B,).

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each (B,). The rewards are the implicit
    rewards beta * (log pi - log pi_ref), detached: they are for logging, the gradient flows
    through ``losses`` only.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}: use one of {LOSS_TYPES}")
    policy_logratios = policy_chosen_logps - policy_rejected_logps  # (B,) how much pi prefers y_w
    ref_logratios = ref_chosen_logps - ref_rejected_logps  # (B,) how much pi_ref already did
    margin = policy_logratios - ref_logratios  # (B,) h: the preference gained relative to pi_ref
    if loss_type == "sigmoid":
        # -log sigmoid(x) written with logsigmoid: exact for large |x| (no log(0) or exp overflow)
        losses = -F.logsigmoid(beta * margin)  # (B,)
    else:
        losses = (margin - 1.0 / (2.0 * beta)) ** 2  # (B,) IPO: regress h onto 1 / (2 tau), tau = beta
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()  # (B,)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()  # (B,)
    return losses, chosen_rewards, rejected_rewards


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class DPOConfig:
    beta: float = 0.1  # KL strength: the implicit reward is beta * log(pi / pi_ref) (IPO's tau)
    loss_type: str = "sigmoid"  # "sigmoid" (DPO) or "ipo" (squared loss of Azar et al.)
    epochs: int = 2  # passes over the training pairs (ignored when ``steps`` is set)
    steps: int | None = None  # optimiser steps; None: as many as ``epochs`` passes take
    batch_size: int = 32  # preference pairs per step (2x that many sequences per forward pass)
    learning_rate: float = 2e-4  # peak AdamW learning rate (tiny models; gpt2 wants far less)
    warmup_steps: int = 10  # linear warmup before the cosine decay
    weight_decay: float = 0.0  # AdamW decoupled weight decay on matrices (0: pi_ref is the anchor)
    max_grad_norm: float = 1.0  # gradient clipping
    max_response_tokens: int | None = 64  # responses are cut to this many tokens (before EOS)
    eval_every: int = 25  # steps between held-out loss / accuracy measurements (0: only at the end)
    eval_batch_size: int = 64  # pairs per forward pass when evaluating or precomputing pi_ref
    checkpoint_every: int = 50  # steps between resumable checkpoints (0: never)
    heldout_fraction: float = 0.1  # share of prompts whose pairs are kept out (load_or_train_dpo)
    max_heldout_pairs: int | None = None  # evaluate on at most this many of them (load_or_train_dpo; None: all)
    lora_rank: int = 0  # LoRA adapters of this rank on the policy, pi_ref its adapters off (0: full; rlhf_core.lora)
    seed: int = 0  # batch order (a pure function of the seed and the step, so resuming needs no RNG)

    @classmethod
    def for_profile(cls, profile: Profile | str | None = None, **overrides) -> DPOConfig:
        """The defaults the course uses (and caches) for a profile, with ``overrides`` applied."""
        profile = profile if isinstance(profile, Profile) else get_profile(profile)
        config = cls(max_response_tokens=profile.max_new_tokens)
        if not profile.offline:  # the hub GPT-2s
            # 124M parameters move much faster per step than the tiny model: the DPO paper's
            # learning rate range (1e-6 with batch 64) scaled up slightly for a 2-epoch run.
            config = replace(config, learning_rate=5e-6, batch_size=32, warmup_steps=20, eval_batch_size=32)
        if profile.quick:  # a smoke test (config.quick_variant): a few steps on a few held-out pairs
            config = replace(
                config, steps=12, batch_size=8, warmup_steps=2, eval_every=6, eval_batch_size=16, max_heldout_pairs=16
            )
        lora_rank = lora_rank_of(profile, overrides)
        if lora_rank:  # LoRA: a larger step (config.LORA_LEARNING_RATE_SCALE)
            config = replace(config, lora_rank=lora_rank, learning_rate=LORA_LEARNING_RATE_SCALE * config.learning_rate)
        return with_overrides(config, overrides)

    def total_steps(self, n_train: int) -> int:
        """Optimiser steps of the run for ``n_train`` training pairs (the last batch of an epoch
        holds what is left)."""
        if self.steps is not None:
            return self.steps
        return self.epochs * steps_per_epoch(n_train, self.batch_size)


def _summary(
    losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, global_count: int | None = None
) -> dict[str, float]:
    """The numbers logged for a batch of pairs (means over the pairs). With ``global_count``, these
    are one process's pairs of a global batch of that many (``distributed.global_means``)."""
    columns = {
        "loss": losses.detach(),
        "reward_margin": chosen_rewards - rejected_rewards,
        "accuracy": (chosen_rewards > rejected_rewards).float(),
        "chosen_reward": chosen_rewards,
        "rejected_reward": rejected_rewards,
    }
    if global_count is None:
        return {name: float(values.mean()) for name, values in columns.items()}
    return distributed.global_means(columns, global_count)


@torch.no_grad()
def evaluate_dpo(
    policy,
    tokenizer,
    records: Sequence[dict],
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    config: DPOConfig,
    precision: str | None = None,
) -> dict[str, float]:
    """Loss, reward margin, accuracy and mean implicit rewards of ``policy`` on ``records`` (no update)."""
    was_training = policy.training
    policy.eval()
    device = next(policy.parameters()).device
    precision = resolve_precision(precision, device)

    def evaluate_chunk(index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # one batch's pairs
        start = index * config.eval_batch_size
        chunk = records[start : start + config.eval_batch_size]
        rows = slice(start, start + len(chunk))
        with autocast(device, precision):
            policy_chosen, policy_rejected = pair_logps(policy, tokenizer, chunk, config.max_response_tokens)
        loss, chosen, rejected = dpo_loss(
            policy_chosen,
            policy_rejected,
            ref_chosen_logps[rows].to(device),
            ref_rejected_logps[rows].to(device),
            config.beta,
            config.loss_type,
        )
        return loss.cpu(), chosen.cpu(), rejected.cpu()

    # several processes (rlhf_core.distributed) evaluate a share of the batches each: the same numbers
    chunks = distributed.map_chunks(math.ceil(len(records) / config.eval_batch_size), evaluate_chunk)
    policy.train(was_training)
    losses, chosen_rewards, rejected_rewards = ([part[i] for part in chunks] for i in range(3))
    return _summary(torch.cat(losses), torch.cat(chosen_rewards), torch.cat(rejected_rewards))


# ----------------------------------------------------------------------------------------------
# Training


def train_dpo(
    policy,
    reference,
    tokenizer,
    train_records: Sequence[dict],
    heldout_records: Sequence[dict],
    config: DPOConfig,
    out_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    stop_after_steps: int | None = None,
    reference_logps: tuple[torch.Tensor, torch.Tensor] | None = None,
    heldout_reference_logps: tuple[torch.Tensor, torch.Tensor] | None = None,
    callback: Callable[[dict], None] | None = None,
    precision: str | None = None,
):
    """Train ``policy`` with the DPO (or IPO) loss against the frozen ``reference``.

    Returns ``(policy, history)``. ``history`` has one dict per step (``step``, ``loss``,
    ``reward_margin``, ``accuracy``, ``chosen_reward``, ``rejected_reward``, ``lr``,
    ``grad_norm``); every ``config.eval_every`` steps and at the end it also holds
    ``heldout_loss``, ``heldout_reward_margin``, ``heldout_accuracy``, ``heldout_chosen_reward``
    and ``heldout_rejected_reward``. A first record with ``step`` 0 holds the held-out numbers
    before training (pi = pi_ref: loss log 2, margin 0). ``callback(record)`` runs after every step.

    With ``out_dir``: a checkpoint every ``config.checkpoint_every`` steps in ``out_dir/checkpoint``
    (resumed from when ``resume``), and at the end the policy (``save_pretrained``) and
    ``dpo_summary.json`` (config and history) in ``out_dir``. ``stop_after_steps`` ends this call
    early after saving a checkpoint (a simulated disconnect); a later call finishes the run with
    the same weights, bit for bit, as an uninterrupted one.

    ``reference_logps`` / ``heldout_reference_logps``: log pi_ref of the chosen and rejected
    responses, (N,) each and aligned with the records, when the caller has them already (several
    runs on the same pairs with different betas). Missing, they are computed here: for the training
    rows the run visits (``used_rows``) and every held-out pair. ``precision``: fp32, bf16 or fp16
    (None: ``RLHF_PRECISION``, else auto), see ``rlhf_core.precision``. Under ``accelerate launch``
    each process takes its pairs of a step's batch and steps on its share of the batch's mean loss
    (``rlhf_core.distributed``): the updates of one process with the whole batch, up to float rounding.
    """
    if config.loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {config.loss_type!r}: use one of {LOSS_TYPES}")
    if not train_records:
        raise ValueError("no training pairs")
    distributed.require_rows(config.batch_size, "DPOConfig batch_size")
    policy_parameters = {p.data_ptr() for p in policy.parameters()}
    if policy is reference or any(p.data_ptr() in policy_parameters for p in reference.parameters()):
        raise ValueError(
            "policy and reference share weights: pass a frozen copy of the starting "
            "policy as the reference (rlhf_core.sft.frozen_reference)"
        )
    train_records, heldout_records = list(train_records), list(heldout_records)
    device = next(policy.parameters()).device
    precision = resolve_precision(precision, device)
    seed_everything(config.seed)
    disable_dropout(policy)
    disable_dropout(reference)
    reference.eval().requires_grad_(False)

    if reference_logps is None:
        reference_logps = reference_logps_for_rows(
            reference,
            tokenizer,
            train_records,
            used_rows(len(train_records), config),
            config.eval_batch_size,
            config.max_response_tokens,
            precision=precision,
        )
    if heldout_reference_logps is None:
        heldout_reference_logps = precompute_reference_logps(
            reference,
            tokenizer,
            heldout_records,
            config.eval_batch_size,
            config.max_response_tokens,
            precision=precision,
        )
    ref_chosen, ref_rejected = (t.float().cpu() for t in reference_logps)
    heldout_ref_chosen, heldout_ref_rejected = (t.float().cpu() for t in heldout_reference_logps)
    if len(ref_chosen) != len(train_records) or len(heldout_ref_chosen) != len(heldout_records):
        raise ValueError("reference log-probs must be aligned with the records, one per pair")

    def loss_on_step(step: int) -> tuple[torch.Tensor, dict]:
        global_rows = batch_rows(step, len(train_records), config.batch_size, config.seed)
        rows = distributed.shard(global_rows)  # this process's pairs: all of them in a single process
        if not rows:  # several processes, a last batch smaller than their number
            empty = torch.zeros(0)
            stats = _summary(empty, empty, empty, len(global_rows))
            del stats["loss"]
            return distributed.empty_share(policy), stats
        policy_chosen, policy_rejected = pair_logps(
            policy, tokenizer, [train_records[i] for i in rows], config.max_response_tokens
        )  # (B,), (B,)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen,
            policy_rejected,
            ref_chosen[rows].to(device),
            ref_rejected[rows].to(device),
            config.beta,
            config.loss_type,
        )
        stats = _summary(losses, chosen_rewards, rejected_rewards, len(global_rows))
        del stats["loss"]  # the loop logs the loss it steps on
        # alone: losses.mean(); several processes: this one's share of the global mean (distributed)
        return distributed.share_of_mean(losses, len(global_rows)), stats

    def evaluate() -> dict:
        numbers = evaluate_dpo(
            policy, tokenizer, heldout_records, heldout_ref_chosen, heldout_ref_rejected, config, precision
        )
        return {f"heldout_{name}": value for name, value in numbers.items()}

    checkpoint = Path(out_dir) / "checkpoint" if out_dir is not None else None
    total_steps = config.total_steps(len(train_records))
    started = time.perf_counter()
    history = train_loop(
        policy,
        adamw(policy, config.learning_rate, config.weight_decay),
        loss_on_step,
        steps=total_steps,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        max_grad_norm=config.max_grad_norm,
        name="DPO",
        description=f"DPO (beta {config.beta:g})",
        evaluate=evaluate if heldout_records else None,
        eval_every=config.eval_every,
        checkpoint_dir=checkpoint,
        checkpoint_every=config.checkpoint_every,
        identity={"config": asdict(config), "data": fingerprint([train_records, heldout_records])},
        resume=resume,
        stop_after_steps=stop_after_steps,
        callback=callback,
        progress=progress,
        precision=precision,
    )

    if out_dir is not None and steps_done(history) == total_steps:
        save_final(
            out_dir,
            policy,
            "dpo_summary.json",
            {
                "config": asdict(config),
                "n_train": len(train_records),
                "n_heldout": len(heldout_records),
                "steps": total_steps,
                "seconds_this_run": round(time.perf_counter() - started, 1),
                "history": history,
            },
        )
    return policy, history
