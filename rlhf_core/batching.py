"""Turning (prompt, response) text into padded token batches with their masks.

Every stage works on the same three (B, T) tensors:

    input_ids       prompt tokens, response tokens (ending in EOS), padding
    attention_mask  1 on real tokens, 0 on padding            -> what the model may attend to
    response_mask   1 on response tokens (EOS included), else 0 -> what we score and train on

Padding can sit on the left (generation needs every prompt to end at the same column) or on the
right (training batches). Nothing downstream may depend on which: real tokens are always found
through ``attention_mask``, never by comparing ids with the pad id (which equals EOS for GPT-2).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # (B, T) token ids, padding included
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    response_mask: torch.Tensor  # (B, T) 1 on response tokens (EOS included)

    def to(self, device: torch.device | str) -> "TokenBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return type(self)(**moved)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pack(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int,
         padding_side: str = "right") -> TokenBatch:
    """Concatenate each prompt with its response and pad the rows to one width."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    width = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    batch = len(prompt_ids)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    response_mask = torch.zeros((batch, width), dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        length = len(prompt) + len(response)
        start = 0 if padding_side == "right" else width - length
        input_ids[row, start:start + length] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        attention_mask[row, start:start + length] = 1
        response_mask[row, start + len(prompt):start + length] = 1
    return TokenBatch(input_ids, attention_mask, response_mask)


def encode_responses(tokenizer, responses: Sequence[str], add_eos: bool = True,
                     max_tokens: int | None = None) -> list[list[int]]:
    """Token ids of each response, cut to ``max_tokens`` before EOS is appended."""
    encoded = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        encoded = [ids[:max_tokens] for ids in encoded]
    if add_eos:
        encoded = [ids + [tokenizer.eos_token_id] for ids in encoded]
    return encoded


def encode_pairs(tokenizer, prompts: Sequence[str], responses: Sequence[str], add_eos: bool = True,
                 padding_side: str = "right", max_response_tokens: int | None = None) -> TokenBatch:
    """Tokenize prompts and responses separately (the boundary stays where the text put it)
    and pack them; responses end with EOS unless ``add_eos=False``."""
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    response_ids = encode_responses(tokenizer, responses, add_eos, max_response_tokens)
    return pack(prompt_ids, response_ids, tokenizer.pad_token_id, padding_side)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, 2, ... counted over real tokens only, so a left-padded row sees the same
    positions as the same row padded on the right. Padding positions get 0 (never attended to)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last real token, for left or right padding alike. (B, T) -> (B,)"""
    columns = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.long() * (columns + 1)).argmax(-1)  # +1: a row whose only real token is column 0
