"""DPO's data side: preference pairs as token batches, sequence log-probs of the chosen and rejected
responses, and pi_ref's log-probs computed once per pair (``rlhf_core.dpo`` holds the loss and the trainer)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from . import distributed
from .batching import TokenBatch, encode_responses, pack, per_row_in_buckets
from .logprobs import context_length, fit_to_context, sequence_logprobs
from .loop import batch_rows
from .models import model_device
from .precision import autocast, resolve_precision

if TYPE_CHECKING:  # a type hint only: ``dpo`` imports this module
    from .dpo import DPOConfig


def _ended(record: dict, which: str) -> bool:
    """Whether the response produced EOS when it was sampled (missing: True, see preferences)."""
    return bool(record.get(f"{which}_ended", True))


def encode_preference_batch(
    tokenizer, records: Sequence[dict], max_response_tokens: int | None = None, padding_side: str = "right"
) -> TokenBatch:
    """Rows 0..B-1: prompt + chosen; rows B..2B-1: prompt + rejected, padded to one width.

    EOS is appended to a response only if it ended with EOS when it was sampled (``*_ended``): a
    response cut at the length limit must not teach the policy to stop there. Cut responses
    (``max_response_tokens``) keep the EOS of a response that ended, as ``encode_pairs`` does.
    """
    prompts = [record["prompt"] for record in records]
    responses = [record["chosen"] for record in records] + [record["rejected"] for record in records]
    ended = [_ended(r, "chosen") for r in records] + [_ended(r, "rejected") for r in records]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = encode_responses(tokenizer, responses, add_eos=False, max_tokens=max_response_tokens)
    response_ids = [ids + [tokenizer.eos_token_id] if stop else ids for ids, stop in zip(response_ids, ended)]
    return pack(prompt_ids + prompt_ids, response_ids, tokenizer.pad_token_id, padding_side)


def pair_logps(
    model, tokenizer, records: Sequence[dict], max_response_tokens: int | None = None, padding_side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(chosen | prompt) and log pi(rejected | prompt), each (B,), summed over response tokens.

    The 2B rows of ``encode_preference_batch`` go through the model in buckets of similar length
    (``batching.per_row_in_buckets``): each row is padded to its own length rounded up to a multiple
    of 8 tokens (64 on a GPU), not to its pair's other response nor to the batch's longest row.
    Padding changes no log-prob (positions come from the attention mask), so these are the numbers
    of one (2B, T) pass up to float rounding, for about 60% of its compute on a CPU, and a pair's
    log-probs do not depend on the pairs beside it. Gradients flow when the caller allows them.
    """
    device = model_device(model)  # pi_ref may be a LoRA policy's adapters off (no parameters of its own)
    batch = encode_preference_batch(tokenizer, records, max_response_tokens, padding_side)
    batch = fit_to_context(batch, context_length(model)).to(device)
    logps = per_row_in_buckets(
        batch,
        lambda rows: sequence_logprobs(  # (2B,)
            model, rows.input_ids, rows.attention_mask, rows.response_mask
        ),
    )
    return logps[: len(records)], logps[len(records) :]


@torch.no_grad()
def precompute_reference_logps(
    reference,
    tokenizer,
    records: Sequence[dict],
    batch_size: int = 64,
    max_response_tokens: int | None = None,
    progress: bool = False,
    precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_ref of every chosen and rejected response, (N,) each, on the CPU.

    pi_ref never changes, so its log-probs are computed once before training: each training step
    then needs forward passes of the policy only (half the compute, and no second model in memory
    on a GPU during the update)."""
    was_training = reference.training
    reference.eval()
    device = model_device(reference)
    precision = resolve_precision(precision, device)

    def chunk(index: int) -> tuple[torch.Tensor, torch.Tensor]:  # the index-th batch of pairs
        start = index * batch_size
        with autocast(device, precision):
            chosen_logps, rejected_logps = pair_logps(
                reference, tokenizer, records[start : start + batch_size], max_response_tokens
            )
        return chosen_logps.float().cpu(), rejected_logps.float().cpu()

    # several processes (rlhf_core.distributed) compute a share of the batches each: the same numbers
    chunks = distributed.map_chunks(math.ceil(len(records) / batch_size), chunk, progress, "pi_ref log-probs")
    chosen, rejected = [part[0] for part in chunks], [part[1] for part in chunks]
    reference.train(was_training)
    if not chosen:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(chosen), torch.cat(rejected)


def used_rows(n_train: int, config: DPOConfig) -> list[int]:
    """The training rows a run of ``config.total_steps(n_train)`` steps visits (``batch_rows``),
    sorted. A short run (fewer steps than an epoch) needs the reference log-probs of these pairs only."""
    rows: set[int] = set()
    for step in range(config.total_steps(n_train)):
        rows.update(batch_rows(step, n_train, config.batch_size, config.seed))
        if len(rows) == n_train:
            break
    return sorted(rows)


def reference_logps_for_rows(
    reference,
    tokenizer,
    records: Sequence[dict],
    rows: Sequence[int],
    batch_size: int = 64,
    max_response_tokens: int | None = None,
    progress: bool = False,
    precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``precompute_reference_logps`` of ``records[rows]`` only, scattered into (N,) tensors that
    hold NaN elsewhere: a row that was not precomputed can never be used silently (a NaN loss
    stops training)."""
    chosen = torch.full((len(records),), float("nan"))
    rejected = torch.full((len(records),), float("nan"))
    rows = list(rows)
    if rows:
        chosen_rows, rejected_rows = precompute_reference_logps(
            reference, tokenizer, [records[i] for i in rows], batch_size, max_response_tokens, progress, precision
        )
        chosen[rows], rejected[rows] = chosen_rows, rejected_rows
    return chosen, rejected
