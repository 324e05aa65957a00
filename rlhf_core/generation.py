"""Sampling responses: our own decoding loop with a KV cache, stopping at EOS.

``generate`` takes a batch of prompts, left-pads them (so every prompt ends in the same column
and the next token of every row is predicted at the same step), then samples one token per step
for all rows at once, reusing the attention keys and values of earlier steps (the KV cache).
A row that produced EOS is finished: its later columns hold padding with attention 0 and
response mask 0. The result is a ``Generation``, a ``TokenBatch`` with the masks the rest of the
course needs (what was sampled is exactly what is scored and trained on), and the log-prob of
each sampled token under the distribution it was drawn from. In float32 those equal a fresh forward
pass over the finished batch to about 1e-6 (the KV cache changes only the order of the sums); the
course's PPO still scores the finished batch afresh, so that at the first step the policy's and the
reference's log-probs come from the same computation and the KL is exactly 0 (chapter 04).

Sampling draws from softmax(logits / temperature) over the whole vocabulary (no top-k / top-p:
PPO's log-probs must be those of the distribution we sampled from); temperature 0 means greedy.

A prompt and its response must fit the model's context (``config.n_positions``): a row stops
writing when it reaches it, like a row that reaches ``max_new_tokens``, and counts as not ended. The
forward passes run under ``precision.autocast`` (``precision``: fp32, bf16, fp16; None:
``RLHF_PRECISION``, else auto, fp32 on a CPU); the sampling probabilities are computed in float32.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .batching import TokenBatch, pack
from .errors import CourseError
from .logprobs import context_length
from .precision import autocast, resolve_precision


@dataclass
class Generation(TokenBatch):
    prompt_width: int = 0  # columns [0, prompt_width) hold the left-padded prompts
    ended: torch.Tensor | None = None  # (B,) True where the response ended with EOS (not cut by a length limit)
    prompts: list[str] | None = None  # the prompt texts
    responses: list[str] | None = None  # the decoded responses, EOS and padding removed
    logprobs: torch.Tensor | None = None  # (B, T) float32 log-prob of each sampled token as sampled, 0 elsewhere

    @property
    def response_lengths(self) -> torch.Tensor:
        """Response tokens per row, EOS included. (B,)"""
        return self.response_mask.sum(-1)


def _cache_argument(model) -> str:
    """The keyword the model's forward takes its KV cache by: ``cache`` in transformers 5.x,
    ``past_key_values`` before (Colab images may carry either)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a LoRA (peft) model's GPT-2
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _returned_cache(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


def _sample(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row, and its log-prob under the distribution it was drawn from
    (greedy, temperature 0: under the plain softmax). (B, V) -> (B,), (B,) float32"""
    logprobs = torch.log_softmax(logits.float() / (temperature or 1.0), dim=-1)  # (B, V)
    if temperature == 0:
        token = logits.argmax(-1)  # (B,)
    else:
        token = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(-1)  # (B,)
    return token, logprobs.gather(-1, token[:, None]).squeeze(-1)


def response_budget(prompt_lengths: torch.Tensor, max_new_tokens: int, context: int | None) -> torch.Tensor:
    """Tokens each row may write: ``max_new_tokens``, or fewer where the prompt and its response
    would not fit the model's ``context`` (its ``n_positions``). A row's budget depends on its own
    prompt only, never on the batch it is in. (B,) -> (B,)"""
    if context is None:
        return torch.full_like(prompt_lengths, max_new_tokens)
    too_long = prompt_lengths >= context
    if bool(too_long.any()):
        raise CourseError(
            f"a prompt of {int(prompt_lengths.max())} tokens leaves no room for a response in the "
            f"model's context of {context} tokens (n_positions): use shorter prompts"
        )
    return (context - prompt_lengths).clamp(max=max_new_tokens)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    precision: str | None = None,
) -> Generation:
    """Sample one response per prompt (see the module docstring for the layout of the result)."""
    device = next(model.parameters()).device
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    prompt_batch = pack(prompt_ids, [[] for _ in prompt_ids], pad_id, padding_side="left").to(device)
    batch, prompt_width = prompt_batch.input_ids.shape

    attention_mask = prompt_batch.attention_mask  # (B, P), grows by one column a step
    positions = attention_mask.sum(-1, keepdim=True) - 1  # (B, 1) position of each row's last token
    budget = response_budget(positions[:, 0] + 1, max_new_tokens, context_length(model))
    precision = resolve_precision(precision, device)
    with autocast(device, precision):
        output = model(
            input_ids=prompt_batch.input_ids,
            attention_mask=attention_mask,
            position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
        )
    cache_argument = _cache_argument(model)
    writing = torch.ones(batch, dtype=torch.bool, device=device)  # rows that have not stopped yet
    ended = torch.zeros(batch, dtype=torch.bool, device=device)  # rows that stopped at their EOS
    new_tokens, new_masks, new_logprobs = [], [], []
    for step in range(max_new_tokens):
        token, logprob = _sample(output["logits"][:, -1, :], temperature, generator)  # (B,), (B,)
        token = torch.where(writing, token, torch.full_like(token, pad_id))
        real = writing.long()  # rows still writing: this column is real for them
        new_tokens.append(token)
        new_masks.append(real)
        new_logprobs.append(logprob * real)
        ended = ended | (writing & (token == eos_id))
        writing = writing & (token != eos_id) & (step + 1 < budget)  # EOS, or the context is full
        if not bool(writing.any()):
            break
        attention_mask = torch.cat([attention_mask, real[:, None]], dim=-1)
        positions = positions + writing.long()[:, None]  # a stopped row's padding never reaches past the context
        with autocast(device, precision):
            output = model(
                input_ids=token[:, None],
                attention_mask=attention_mask,
                position_ids=positions,
                use_cache=True,
                **{cache_argument: _returned_cache(output)},
            )

    response_ids = torch.stack(new_tokens, dim=1)  # (B, R)
    response_real = torch.stack(new_masks, dim=1)  # (B, R)
    input_ids = torch.cat([prompt_batch.input_ids, response_ids], dim=1)  # (B, P + R)
    full_attention = torch.cat([prompt_batch.attention_mask, response_real], dim=1)
    response_mask = torch.cat([torch.zeros_like(prompt_batch.attention_mask), response_real], dim=1)
    prompt_zeros = torch.zeros(prompt_batch.input_ids.shape, dtype=torch.float32, device=device)
    logprobs = torch.cat([prompt_zeros, torch.stack(new_logprobs, dim=1)], dim=1)  # (B, P + R)
    texts = []
    for row in range(batch):
        ids = response_ids[row][response_real[row].bool()].tolist()
        if ids and ids[-1] == eos_id and ended[row]:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids, skip_special_tokens=False))
    return Generation(
        input_ids=input_ids,
        attention_mask=full_attention,
        response_mask=response_mask,
        prompt_width=prompt_width,
        ended=ended,
        prompts=list(prompts),
        responses=texts,
        logprobs=logprobs,
    )


def sample_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    batch_size: int = 64,
    seed: int | None = 0,
    progress: bool = False,
    precision: str | None = None,
) -> tuple[list[str], list[bool]]:
    """Responses (text) and EOS flags for many prompts, generated ``batch_size`` at a time."""
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    responses, ended = [], []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generating", disable=not progress):
        result = generate(
            model, tokenizer, prompts[start : start + batch_size], max_new_tokens, temperature, generator, precision
        )
        responses += result.responses
        ended += result.ended.tolist()
    return responses, ended
