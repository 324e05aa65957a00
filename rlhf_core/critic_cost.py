"""What dropping the critic buys and costs, measured (chapter 08): the policy gradient of one rollout under
each advantage estimator, its noise across resampled rollouts (``GradientMoments``), and the bytes each loop
holds for parameters, gradients and optimiser state (``training_memory``)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .errors import CourseError
from .generation import Generation
from .grpo import token_weights
from .logprobs import forward_logits, token_logprobs_from_logits


def policy_gradient(
    policy: nn.Module,
    batch: Generation,
    advantages: torch.Tensor,
    temperature: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The policy gradient of one rollout at the policy that sampled it, flattened to one vector:

        g = -grad_theta sum_{i,t} w_{i,t} A_{i,t} log pi_theta(y_{i,t} | x_i, y_{i,<t})

    the gradient of the first step of every loop of the course (PPO's ratio is 1 there, so its
    clipped loss has exactly this gradient). advantages (B, T); ``weights`` (B, T), by default
    ``token_weights(..., "token")``: the same averaging for every estimator, so only the advantages differ.
    Leaves the policy's ``.grad`` empty."""
    input_ids, attention_mask, response_mask = batch.input_ids, batch.attention_mask, batch.response_mask
    if weights is None:
        weights = token_weights(response_mask, "token", 1)
    logits = forward_logits(policy, input_ids, attention_mask)  # (B, T, V)
    logprobs = token_logprobs_from_logits(logits, input_ids, temperature) * response_mask  # (B, T)
    surrogate = -(weights * advantages.detach() * logprobs).sum()
    parameters = [p for p in policy.parameters() if p.requires_grad]
    gradients = torch.autograd.grad(surrogate, parameters)
    return torch.cat([g.reshape(-1) for g in gradients]).detach()


class GradientMoments:
    """Running first and second moments of gradient vectors: what their noise is, in O(D) memory.

    After n >= 2 gradients g_1 ... g_n (independent draws of the same estimator):
      mean   = sum g / n                              (D,)
      noise  = sum ||g - mean||^2 / (n - 1)          the trace of the covariance, unbiased
      signal = ||mean||^2 - noise / n                ||E g||^2, unbiased (``mean`` carries noise / n)
      signal_to_noise = signal / noise               how many times the direction outweighs the noise
    """

    def __init__(self):
        self.count = 0
        self.total: torch.Tensor | None = None  # (D,) sum of the gradients, float64
        self.total_squared_norm = 0.0  # sum of ||g||^2

    def add(self, gradient: torch.Tensor) -> None:
        gradient = gradient.detach().double()
        self.total = gradient.clone() if self.total is None else self.total + gradient
        self.total_squared_norm += float(gradient.dot(gradient))
        self.count += 1

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def noise(self) -> float:
        if self.count < 2:
            raise CourseError("GradientMoments: the noise needs at least 2 gradients; add more resamples")
        n = self.count
        mean_squared_norm = float(self.mean.dot(self.mean))
        return (self.total_squared_norm - n * mean_squared_norm) / (n - 1)

    @property
    def signal(self) -> float:
        return float(self.mean.dot(self.mean)) - self.noise / self.count

    @property
    def signal_to_noise(self) -> float:
        return self.signal / self.noise


def training_memory(models: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> dict[str, dict[str, int]]:
    """Bytes each model holds while training, counted tensor by tensor (after a backward pass and an
    optimiser step, so that gradients and AdamW's two moments exist):

        {name: {"parameters": ..., "gradients": ..., "optimizer_state": ...}}

    A tensor shared by two models (a tied embedding, a value head on the policy's trunk) counts once,
    with the first model that holds it. Activations are not counted: they live only during a step."""
    seen: set[int] = set()
    result = {}
    for name, model in models.items():
        counts = {"parameters": 0, "gradients": 0, "optimizer_state": 0}
        for parameter in model.parameters():
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            counts["parameters"] += parameter.numel() * parameter.element_size()
            if parameter.grad is not None:
                counts["gradients"] += parameter.grad.numel() * parameter.grad.element_size()
            for value in optimizer.state.get(parameter, {}).values():
                if isinstance(value, torch.Tensor):
                    counts["optimizer_state"] += value.numel() * value.element_size()
        result[name] = counts
    return result
