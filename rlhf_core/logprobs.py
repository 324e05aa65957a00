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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .batching import position_ids_from_mask


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits with position ids counted over real tokens (left padding must not shift them)."""
    output = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return output.logits  # (B, T, V)


def token_logprobs_from_logits(logits: torch.Tensor, input_ids: torch.Tensor,
                               temperature: float = 1.0) -> torch.Tensor:
    """log pi(x_t | x_<t) aligned with ``input_ids``; column 0 has no context and gets 0."""
    logits = logits[:, :-1, :].float() / temperature  # (B, T-1, V): position t predicts token t+1
    chosen = torch.gather(logits, 2, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    # log softmax at the chosen token only, without a second (B, T, V) tensor (50k vocab on gpt2)
    logprobs = chosen - torch.logsumexp(logits, dim=-1)  # (B, T-1)
    return F.pad(logprobs, (1, 0), value=0.0)  # (B, T)


def response_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs of the response tokens, 0 elsewhere. (B, T)"""
    logits = forward_logits(model, input_ids, attention_mask)
    return token_logprobs_from_logits(logits, input_ids, temperature) * response_mask


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(y | x): the sum of the response's token log-probs. (B,)"""
    return response_logprobs(model, input_ids, attention_mask, response_mask, temperature).sum(-1)
