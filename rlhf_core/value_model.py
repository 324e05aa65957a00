"""PPO's value model V_psi (chapter 04's fourth model): a transformer trunk and a scalar head, one
value per token, aligned with the log-probs of ``rlhf_core.rlhf``."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .batching import position_ids_from_mask
from .reward_model import normalization


class ValueModel(nn.Module):
    """A transformer trunk and a scalar head giving one value per token.

    ``values[:, t]`` estimates the return when the model is about to write token t: it is read
    from the hidden state at t - 1, the same state the policy's logits for token t come from.
    """

    def __init__(self, trunk: nn.Module, head: nn.Linear):
        super().__init__()
        self.trunk = trunk  # GPT2Model: (B, T) ids -> (B, T, d) hidden states
        self.head = head  # Linear(d, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.trunk(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
        ).last_hidden_state  # (B, T, d)
        values = self.head(hidden).squeeze(-1).float()  # (B, T): value after reading token t (float32)
        return nn.functional.pad(values[:, :-1], (1, 0))  # (B, T): value before writing token t

    @classmethod
    def from_reward_model(cls, reward_model) -> ValueModel:
        """InstructGPT's choice: start from the reward model, which already reads responses.

        The reward model's normalisation (gain, bias: SFT samples score 0 +- 1) is folded into the
        new head, so the first values are on the scale of the rewards they must predict. The copy
        is trainable even when the reward model is frozen (PPO freezes it; its copy must learn)."""
        copied = copy.deepcopy(reward_model).requires_grad_(True)
        return cls(copied.transformer, cls.head_from_score(copied))

    @classmethod
    def on_reward_model_trunk(cls, reward_model) -> ValueModel:
        """LoRA's choice (``lora.value_and_reward_models``): a head from the reward model's score on the
        reward model's own transformer (shared parameters; the adapters the caller put there train)."""
        return cls(reward_model.transformer, cls.head_from_score(reward_model))

    @staticmethod
    def head_from_score(reward_model) -> nn.Linear:
        """A trainable Linear(d, 1) equal to the reward model's normalised score: gain * score + bias."""
        gain, bias = normalization(reward_model)
        score = reward_model.score
        head = nn.Linear(score.in_features, 1)
        with torch.no_grad():
            head.weight.copy_(gain * score.weight)
            head.bias.fill_(bias)
            if score.bias is not None:
                head.bias.add_(gain * score.bias)
        return head.to(score.weight.device)

    @classmethod
    def on_policy_trunk(cls, policy) -> ValueModel:
        """The cheaper option: a new head on the policy's own transformer (shared parameters)."""
        head = nn.Linear(policy.config.n_embd, 1)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        return cls(policy.transformer, head)
