"""Per-token log-probabilities of response tokens under a causal language model.

For a sequence x_1..x_T the model gives log pi(x_t | x_<t) for every t > 1. RLHF needs these for
the response tokens only: PPO's ratio and the per-token KL to the reference are built from them,
DPO sums them into sequence log-probs (the DPO paper's choice: sums, not means).

Convention used throughout the package: the returned (B, T) tensor is aligned with the tokens,
``logprobs[b, t] = log pi(input_ids[b, t] | input_ids[b, :t])``, and is 0 wherever
``response_mask`` is 0. So ``response_mask`` selects the same positions in ids and log-probs.

``temperature`` divides the logits before the softmax. Sampling at temperature tau draws from
softmax(logits / tau), so log-probs used for PPO must be computed the same way (a mismatch makes
the "old" log-probs wrong from the first step).

Under mixed precision (``rlhf_core.precision``) the logits come out of the model in bfloat16 or
float16; they are cast to float32 *before* the log-softmax, so every log-prob, and every ratio, KL
and loss built from them, is float32. (bfloat16 keeps about 3 significant digits: a log-prob of
-2.0 could be off by 0.01, and PPO's ratio exp(new - old) of identical policies would not be 1.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .batching import TokenBatch, position_ids_from_mask
from .errors import CourseError


def context_length(model) -> int | None:
    """The longest sequence the model can read (GPT-2's ``n_positions``); None when it does not say."""
    return getattr(getattr(model, "config", None), "n_positions", None)


def fit_to_context(batch: TokenBatch, context: int | None) -> TokenBatch:
    """``batch`` with each row cut to its first ``context`` real tokens (the end of a response too
    long for the model is dropped, as the length limit drops it): the tokens past the context get
    attention 0 and response mask 0, and columns no row uses any more are removed. Rows that fit
    are unchanged, whatever the padding side."""
    if context is None or batch.input_ids.shape[1] <= context:
        return batch
    attention_mask = batch.attention_mask * (batch.attention_mask.cumsum(-1) <= context)  # (B, T)
    response_mask = batch.response_mask * attention_mask  # (B, T)
    width = int(attention_mask.any(0).nonzero().max()) + 1  # right padding: back to ``context`` columns
    return TokenBatch(batch.input_ids[:, :width], attention_mask[:, :width], response_mask[:, :width])


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits with position ids counted over real tokens (left padding must not shift them)."""
    context = context_length(model)
    if context is not None and input_ids.shape[1] > context and int(attention_mask.sum(-1).max()) > context:
        raise CourseError(
            f"a sequence of {int(attention_mask.sum(-1).max())} tokens is longer than the model's "
            f"context of {context} (n_positions): cut it first (rlhf_core.logprobs.fit_to_context)"
        )
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return output.logits  # (B, T, V)


def token_logprobs_from_logits(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(x_t | x_<t) aligned with ``input_ids``; column 0 has no context and gets 0."""
    logits = logits[:, :-1, :].float() / temperature  # (B, T-1, V) float32: position t predicts token t+1
    chosen = torch.gather(logits, 2, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    # log softmax at the chosen token only, without a second (B, T, V) tensor (50k vocab on gpt2)
    logprobs = chosen - torch.logsumexp(logits, dim=-1)  # (B, T-1)
    return F.pad(logprobs, (1, 0), value=0.0)  # (B, T)


def response_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-token log-probs of the response tokens, 0 elsewhere. (B, T)"""
    logits = forward_logits(model, input_ids, attention_mask)
    return token_logprobs_from_logits(logits, input_ids, temperature) * response_mask


def sequence_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log pi(y | x): the sum of the response's token log-probs. (B,)"""
    return response_logprobs(model, input_ids, attention_mask, response_mask, temperature).sum(-1)
