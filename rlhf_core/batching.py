"""Turning (prompt, response) text into padded token batches with their masks.

Every stage works on the same three (B, T) tensors:

    input_ids       prompt tokens, response tokens (ending in EOS), padding
    attention_mask  1 on real tokens, 0 on padding            -> what the model may attend to
    response_mask   1 on response tokens (EOS included), else 0 -> what we score and train on

Padding can sit on the left (generation needs every prompt to end at the same column) or on the
right (training batches). Nothing downstream may depend on which: real tokens are always found
through ``attention_mask``, never by comparing ids with the pad id (which equals EOS for GPT-2).

**No work on padding.** A batch padded to its longest row spends the model's compute on padding:
a DPO batch of 32 pairs of sampled responses (2 to 65 tokens) is about 40% padding, a batch of 64
pretraining reviews about half. Since nothing depends on the padding, a batch whose results are
one number per row (a sequence log-prob, a reward, a summed loss) can run in buckets of rows of
similar length, each at its own width (``per_row_in_buckets``): the same numbers up to float
rounding, for about 60% of the compute. A row's width is its length rounded up to a multiple of a
few tokens (``length_buckets``), so its result depends on that row alone, whatever rows share its
batch. Training on per-token results (PPO's minibatches) can draw rows of similar length together
(``length_sorted_minibatches``) and cut them to the columns they use (``used_columns``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # (B, T) token ids, padding included
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    response_mask: torch.Tensor  # (B, T) 1 on response tokens (EOS included)

    def to(self, device: torch.device | str) -> TokenBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return type(self)(**moved)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def repacked(self, rows: Sequence[int] | torch.Tensor, width: int) -> TokenBatch:
        """These rows with their real tokens moved to the left (in order) and padded on the right to
        ``width`` columns (at least their longest length): the same rows whatever padding they had."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        # a stable sort of "is padding" lists each row's real columns first, in order, then its padding
        columns = torch.sort((self.attention_mask[rows] == 0).to(torch.uint8), dim=-1, stable=True).indices  # (b, T)
        extra = max(0, width - columns.shape[-1])  # columns to add on the right

        def moved(tensor: torch.Tensor) -> torch.Tensor:  # (B, T) -> (b, width), real tokens first
            return F.pad(tensor[rows].gather(1, columns), (0, extra))[:, :width]

        real = moved(self.attention_mask)
        return TokenBatch(moved(self.input_ids) * real, real, moved(self.response_mask) * real)


def pack(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int, padding_side: str = "right"
) -> TokenBatch:
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
        input_ids[row, start : start + length] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        attention_mask[row, start : start + length] = 1
        response_mask[row, start + len(prompt) : start + length] = 1
    return TokenBatch(input_ids, attention_mask, response_mask)


def encode_responses(
    tokenizer, responses: Sequence[str], add_eos: bool = True, max_tokens: int | None = None
) -> list[list[int]]:
    """Token ids of each response, cut to ``max_tokens`` before EOS is appended."""
    encoded = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        encoded = [ids[:max_tokens] for ids in encoded]
    if add_eos:
        encoded = [ids + [tokenizer.eos_token_id] for ids in encoded]
    return encoded


def encode_pairs(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    add_eos: bool = True,
    padding_side: str = "right",
    max_response_tokens: int | None = None,
) -> TokenBatch:
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


# Bucket widths are multiples of this many tokens. A row's width is then a function of its own length
# alone, so its result never depends on which rows share its batch (a reference log-prob is the
# same number whether it was computed with 8 pairs or 12), and at most ``multiple - 1`` padding
# columns ride along with each row. On a 2-core CPU (tiny profile, one thread) 8 costs least:
# ``python -m rlhf_core bench`` measured it. A GPU runs a few hundred tokens more at no extra time
# but pays every pass in kernel launches, so its buckets are wide.
BUCKET_MULTIPLE = {"cpu": 8, "cuda": 64, "mps": 64}


def bucket_multiple(device: torch.device | str) -> int:
    """The multiple of tokens bucket widths are rounded up to on ``device`` (``BUCKET_MULTIPLE``)."""
    return BUCKET_MULTIPLE.get(torch.device(device).type, BUCKET_MULTIPLE["cuda"])


def length_buckets(lengths: Sequence[int], multiple: int) -> dict[int, list[int]]:
    """Row indices grouped by their length rounded up to a multiple of ``multiple``: {width: rows},
    narrowest first, rows in their order."""
    buckets: dict[int, list[int]] = {}
    for row, length in enumerate(lengths):
        buckets.setdefault(-(-int(length) // multiple) * multiple, []).append(row)
    return dict(sorted(buckets.items()))


def per_row_in_buckets(
    batch: TokenBatch, forward: Callable[[TokenBatch], torch.Tensor], multiple: int | None = None
) -> torch.Tensor:
    """``forward`` (a batch -> one result per row, (b, ...)) over ``batch`` in length buckets, each
    right-padded to its own width (``length_buckets``); the results come back in the batch's row
    order. (B, ...)

    Equal to ``forward(batch)`` up to float rounding wherever ``forward`` ignores padding (as every
    forward pass of the course does: positions and last tokens come from the attention mask), and
    each row's result depends on that row alone. Gradients flow through. ``multiple``: default the
    device's ``bucket_multiple``.
    """
    device = batch.input_ids.device
    multiple = bucket_multiple(device) if multiple is None else multiple
    buckets = length_buckets(batch.attention_mask.sum(-1).tolist(), multiple)
    outputs = torch.cat([forward(batch.repacked(rows, width)) for width, rows in buckets.items()])  # bucket order
    order = torch.tensor([row for rows in buckets.values() for row in rows], device=device)
    return outputs[torch.argsort(order)]  # back to the batch's order


def used_columns(attention_mask: torch.Tensor) -> slice:
    """The columns in which some row has a real token: a batch, and every per-token tensor aligned
    with it, cut to them gives the same results. (B, T) -> slice"""
    used = attention_mask.any(0).nonzero().squeeze(-1)
    return slice(int(used[0]), int(used[-1]) + 1) if len(used) else slice(0, 0)


def rows_and_columns(tensor: torch.Tensor, rows: torch.Tensor, columns: slice) -> torch.Tensor:
    """``tensor``'s ``rows``, cut to ``columns`` (a minibatch of a per-token tensor). (B, T) -> (b, t)"""
    return tensor[rows][:, columns]


def length_sorted_minibatches(
    lengths: torch.Tensor, minibatch_size: int, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Row indices in minibatches of rows of similar length, in random order: the rows shuffled,
    sorted by length (ties stay shuffled), cut into minibatches, and the minibatches shuffled. Each
    row is in exactly one; cut to its ``used_columns``, a minibatch then carries little padding."""
    order = torch.randperm(len(lengths), generator=generator)
    order = order[torch.argsort(lengths.cpu()[order], stable=True)]
    minibatches = list(torch.split(order, minibatch_size))
    return [minibatches[i] for i in torch.randperm(len(minibatches), generator=generator)]


def minibatch_rows(
    response_lengths: torch.Tensor, minibatch_size: int, generator: torch.Generator | None, length_sorted: bool
) -> list[torch.Tensor]:
    """One epoch's minibatches of row indices over a rollout: rows of similar response length
    together (``length_sorted_minibatches``) or a plain shuffle (the PPO of the papers). Either
    way every row is in exactly one minibatch, and the minibatches come in random order."""
    if length_sorted:
        return length_sorted_minibatches(response_lengths, minibatch_size, generator)
    return list(torch.split(torch.randperm(len(response_lengths), generator=generator), minibatch_size))
