"""Checked exercises: write a formula yourself, then let a checker compare it with the answer.

Each ``check_*`` function takes *your* function and calls it positionally with float32 tensors, with
the same signature as the library function it mirrors:

- ``check_gae``: ``fn(rewards, values, mask, gamma, lam) -> (advantages, returns)``, all (B, T),
  like ``rlhf_core.ppo.gae`` in its language-model form (no ``dones``).
- ``check_policy_loss``: ``fn(logprobs, old_logprobs, advantages, mask, clip_range) -> loss``, a
  scalar, like ``rlhf_core.ppo.policy_loss``.
- ``check_bradley_terry_loss``: ``fn(chosen_scores, rejected_scores) -> loss``, a scalar, like
  ``rlhf_core.reward_model.bradley_terry_loss``.
- ``check_dpo_loss``: ``fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
  ref_rejected_logps, beta) -> losses`` (B,), like ``rlhf_core.dpo.dpo_loss``.
- ``check_per_token_rewards``: ``fn(scores, kl, kl_coef, attention_mask, response_mask) -> rewards``
  (B, T), like ``rlhf_core.rlhf.compute_rewards``.
- ``check_rloo_advantages``: ``fn(scores, group_size) -> advantages`` (P * k,), like
  ``rlhf_core.grpo.group_advantages(scores, group_size, "rloo")``.

How a checker behaves:

- It runs several cases, from the simplest to the edge cases: padded and ragged batches (padding
  filled with numbers that must not matter), ratios outside the clip range, large margins that
  overflow a naive formula, ties.
- ``check_gae`` checks both outputs. The others, given a tuple, check its first element, so
  ``policy_loss`` with its stats and ``dpo_loss`` with its implicit rewards pass as they are.
- Values are compared within a float tolerance, only where the mask is 1.
- A correct function prints one line and returns ``True``.
- A wrong one raises ``AssertionError`` naming the case, the first wrong entry (expected, and what
  came back), the inputs, and a hint.
- A function that still raises ``NotImplementedError`` gets a printed hint, and the checker
  returns ``False``.

The expected answers come from plain Python loops written below, one element at a time, and never
from the library function being mirrored: the tests show that the library's functions pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch

__all__ = [
    "check_gae",
    "check_policy_loss",
    "check_bradley_terry_loss",
    "check_dpo_loss",
    "check_per_token_rewards",
    "check_rloo_advantages",
]

# Float32 results against float64 references: loose enough for any order of operations, far
# tighter than any of the typical mistakes.
ATOL = 1e-4
RTOL = 1e-4


# ---------------------------------------------------------------------------------------------
# The machinery every checker shares
# ---------------------------------------------------------------------------------------------


@dataclass
class _Case:
    description: str  # what the case is, in a learner's words ("3 right-padded rows of lengths 5, 3, 1")
    args: tuple  # positional arguments for the learner's function: float32 tensors and Python floats
    expected: dict[str, torch.Tensor]  # output name -> expected value (float64), in the order returned
    compare_mask: torch.Tensor | None  # where outputs are compared (shape of the outputs); None: everywhere
    hint: str  # what this case exercises, and the usual fix when it fails


@dataclass
class _Checker:
    name: str  # "check_gae": starts every message
    arg_names: tuple[str, ...]  # the learner function's parameters, in order, to print the inputs
    cases: list[_Case]  # simplest first, so the first failure points at the simplest mistake
    grad_args: tuple[int, ...]  # positions of the arguments the output must stay differentiable in
    shape_hint: str  # what the output's shape means, shown when the shape is wrong
    start_hint: str  # printed when the learner's function raises NotImplementedError


def _format_tensor(
    values: torch.Tensor, hidden: torch.Tensor | None = None, integers: bool = False, indent: str = "    "
) -> str:
    """A small tensor as aligned text; positions where ``hidden`` is set print as '.'."""
    values = values.detach().to("cpu", torch.float64)
    if values.dim() == 0:
        return f"{values.item():.4f}"
    rows = values.reshape(1, -1) if values.dim() == 1 else values.reshape(values.shape[0], -1)  # (rows, columns)
    if hidden is None:
        hidden_rows = torch.zeros_like(rows, dtype=torch.bool)
    else:
        hidden_rows = hidden.to("cpu").bool().reshape(rows.shape)
    cells = [
        [("." if hide else (f"{int(v)}" if integers else f"{v:.4f}")) for v, hide in zip(row, hide_row)]
        for row, hide_row in zip(rows.tolist(), hidden_rows.tolist())
    ]
    width = max(len(cell) for row in cells for cell in row)
    lines = ["[" + ", ".join(cell.rjust(width) for cell in row) + "]" for row in cells]
    if values.dim() == 1:
        return lines[0]
    return "[" + (",\n" + indent + " ").join(lines) + "]"


def _format_inputs(checker: _Checker, case: _Case) -> str:
    lines = []
    for name, value in zip(checker.arg_names, case.args):
        if isinstance(value, torch.Tensor):
            shown = _format_tensor(value, integers=name.endswith("mask"), indent="      ")
            lines.append(f"  {name} =\n      {shown}" if value.dim() > 1 else f"  {name} = {shown}")
        else:
            lines.append(f"  {name} = {value}")
    return "\n".join(lines)


def _entry(name: str, index: tuple[int, ...]) -> str:
    return name if not index else f"{name}[{', '.join(str(i) for i in index)}]"


def _number(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def _fail(
    checker: _Checker, case_number: int, case: _Case, problem: str, extra: str = "", show_hint: bool = True
) -> NoReturn:
    """Raise the AssertionError a learner reads. ``show_hint=False`` where the problem is not the
    formula (a wrong return type, an input changed in place): the problem line says what to do."""
    header = f"{checker.name} failed on case {case_number} of {len(checker.cases)}: {case.description}"
    body = [header, problem, "Inputs:", _format_inputs(checker, case)]
    if extra:
        body.append(extra)
    if show_hint:
        body.append(f"Hint: {case.hint}")
    raise AssertionError("\n".join(body))


def _compare(checker: _Checker, case_number: int, case: _Case, name: str, got, expected: torch.Tensor) -> None:
    """Check one output against its expected value, where ``case.compare_mask`` is set."""
    if not isinstance(got, torch.Tensor):
        _fail(
            checker,
            case_number,
            case,
            f"{name} should be a torch tensor, but your function returned {type(got).__name__} {got!r}. "
            "Return the tensor itself (a Python number has no gradient to train with).",
            show_hint=False,
        )
    got = got.detach().to("cpu", torch.float64)
    if expected.dim() == 0 and got.numel() == 1:
        got = got.reshape(())  # a loss of shape (1,) is as good as a 0-d one
    if got.shape != expected.shape:
        _fail(
            checker,
            case_number,
            case,
            f"{name} should have shape {tuple(expected.shape)} ({checker.shape_hint}), "
            f"but your function returned shape {tuple(got.shape)}.",
        )
    compared = (
        torch.ones_like(expected, dtype=torch.bool)
        if case.compare_mask is None
        else case.compare_mask.to("cpu").bool().reshape(expected.shape)
    )
    close = (got - expected).abs() <= ATOL + RTOL * expected.abs()  # NaN and inf are never close
    wrong = compared & ~close
    if not wrong.any():
        return
    index = tuple(wrong.nonzero()[0].tolist())
    problem = (
        f"{_entry(name, index)} should be {_number(expected[index].item())} "
        f"but your function returned {_number(got[index].item())}."
    )
    extra = ""
    if expected.dim() > 0:
        legend = " ('.' = padding, not compared)" if case.compare_mask is not None else ""
        extra = (
            f"Expected {name}{legend}:\n    {_format_tensor(expected, ~compared)}\n"
            f"Your {name}:\n    {_format_tensor(got, ~compared)}"
        )
    _fail(checker, case_number, case, problem, extra)


def _run(checker: _Checker, fn: Callable) -> bool:
    for case_number, case in enumerate(checker.cases, start=1):
        # Fresh copies: the learner's function never gets the case's own tensors, so it cannot spoil them.
        args = [a.clone() if isinstance(a, torch.Tensor) else a for a in case.args]
        for position in checker.grad_args:
            args[position].requires_grad_(True)
        try:
            result = fn(*args)
        except NotImplementedError:
            print(
                f"{checker.name}: your function raises NotImplementedError, so nothing was checked yet. "
                f"Replace the `raise NotImplementedError` with your code and run the checker again.\n"
                f"Hint: {checker.start_hint}"
            )
            return False
        except Exception as error:  # a crash on one case: say which inputs caused it
            raise AssertionError(
                f"{checker.name}: your function raised {type(error).__name__}: {error}\n"
                f"on case {case_number} of {len(checker.cases)}: {case.description}\n"
                f"Inputs:\n{_format_inputs(checker, case)}\nHint: {case.hint}"
            ) from error

        for name, passed, original in zip(checker.arg_names, args, case.args):
            if isinstance(original, torch.Tensor) and not torch.equal(passed.detach(), original):
                _fail(
                    checker,
                    case_number,
                    case,
                    f"your function changed its input `{name}` in place. Work on new tensors "
                    "(e.g. `x = x.clone()` first): the training loop reuses its inputs afterwards.",
                    show_hint=False,
                )

        names = list(case.expected)
        if len(names) > 1:
            if not isinstance(result, (tuple, list)) or len(result) != len(names):
                _fail(
                    checker,
                    case_number,
                    case,
                    f"your function should return a tuple ({', '.join(names)}), "
                    f"but it returned {type(result).__name__}.",
                    show_hint=False,
                )
            outputs = list(result)
        else:
            outputs = [result[0] if isinstance(result, (tuple, list)) else result]

        for name, got in zip(names, outputs):
            _compare(checker, case_number, case, name, got, case.expected[name])

        if checker.grad_args and torch.is_grad_enabled() and not outputs[0].requires_grad:
            differentiable = " and ".join(f"`{checker.arg_names[p]}`" for p in checker.grad_args)
            _fail(
                checker,
                case_number,
                case,
                f"the values are right, but {names[0]} carries no gradient back to {differentiable}: "
                "did you call .item(), .detach(), .numpy() or work under torch.no_grad()? "
                "The optimizer needs the gradient.",
                show_hint=False,
            )

    print(f"{checker.name}: all {len(checker.cases)} cases passed.")
    return True


def _tensor(rows) -> torch.Tensor:
    """Nested lists (or a tensor) as a float32 tensor."""
    return torch.as_tensor(rows, dtype=torch.float32).clone()


def _rounded_randn(shape: tuple[int, ...], generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Random float32 numbers rounded to 2 decimals, so a printed case is easy to read."""
    return torch.round(torch.randn(shape, generator=generator) * scale * 100) / 100


def _run_mask(B: int, T: int, runs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(B, T) float32 mask with one contiguous run of ones per row, given as (start, length)."""
    mask = torch.zeros(B, T)
    for row, (start, length) in enumerate(runs):
        mask[row, start : start + length] = 1.0
    return mask


def _with_padding(values: torch.Tensor, mask: torch.Tensor, fill: float) -> torch.Tensor:
    """``values`` with every padded position set to ``fill``: a number that must not matter."""
    return torch.where(mask > 0, values, torch.full_like(values, fill))


# ---------------------------------------------------------------------------------------------
# GAE (the language-model case: the response ends at its last real token)
# ---------------------------------------------------------------------------------------------


def _reference_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    B, T = rewards.shape
    r, v, m = rewards.tolist(), values.tolist(), mask.tolist()
    advantages = [[0.0] * T for _ in range(B)]
    returns = [[0.0] * T for _ in range(B)]
    for b in range(B):
        next_advantage = 0.0
        for t in reversed(range(T)):
            if not m[b][t]:
                next_advantage = 0.0
                continue
            continues = t + 1 < T and m[b][t + 1] > 0  # the response goes on after token t
            next_value = v[b][t + 1] if continues else 0.0
            delta = r[b][t] + gamma * next_value - v[b][t]
            advantage = delta + (gamma * lam * next_advantage if continues else 0.0)
            advantages[b][t] = advantage
            returns[b][t] = advantage + v[b][t]
            next_advantage = advantage
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    return as_tensor(advantages), as_tensor(returns)


def _gae_case(
    description: str,
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    hint: str,
) -> _Case:
    advantages, returns = _reference_gae(rewards, values, mask, gamma, lam)
    return _Case(
        description, (rewards, values, mask, gamma, lam), {"advantages": advantages, "returns": returns}, mask, hint
    )


def _gae_cases() -> list[_Case]:
    generator = torch.Generator().manual_seed(0)
    cases = [
        _gae_case(
            "one response of 4 tokens, no padding, gamma = lam = 1, the reward on the last token",
            _tensor([[0.0, 0.0, 0.0, 1.0]]),
            _tensor([[0.5, 0.2, -0.1, 0.3]]),
            torch.ones(1, 4),
            1.0,
            1.0,
            "with gamma = lam = 1, A_t is the sum of the rewards from t to the end minus V(s_t), and "
            "returns = advantages + values. Loop backwards from the last token; after it comes nothing "
            "(no V(s_{t+1}), no A_{t+1}).",
        ),
        _gae_case(
            "two responses of 5 tokens, no padding, gamma = 0.9, lam = 0.95",
            _rounded_randn((2, 5), generator),
            _rounded_randn((2, 5), generator),
            torch.ones(2, 5),
            0.9,
            0.95,
            "delta_t = r_t + gamma * V(s_{t+1}) - V(s_t) and A_t = delta_t + gamma * lam * A_{t+1}: "
            "check that both gamma and lam appear where they should.",
        ),
        _gae_case(
            "lam = 0 (one-step TD errors), gamma = 0.8, no padding",
            _rounded_randn((2, 4), generator),
            _rounded_randn((2, 4), generator),
            torch.ones(2, 4),
            0.8,
            0.0,
            "with lam = 0 each advantage is the one-step TD error delta_t = r_t + gamma * V(s_{t+1}) - V(s_t).",
        ),
    ]
    mask = _run_mask(3, 5, [(0, 5), (0, 3), (0, 1)])
    cases.append(
        _gae_case(
            "3 right-padded rows of lengths 5, 3 and 1 (mask below); the padding holds 7.0 in rewards and values",
            _with_padding(_rounded_randn((3, 5), generator), mask, 7.0),
            _with_padding(_rounded_randn((3, 5), generator), mask, 7.0),
            mask,
            1.0,
            0.95,
            "a response ends at its last real token (a 1 followed by a 0 in the mask): there "
            "delta_t = r_t - V(s_t), with no V(s_{t+1}) and no A_{t+1} taken from the padding. The padding "
            "here holds 7.0 to make a leak visible: use the mask so that padding never changes a result.",
        )
    )
    mask = _run_mask(3, 7, [(2, 4), (4, 3), (1, 6)])
    cases.append(
        _gae_case(
            "3 responses that start after a left-padded prompt and end before the last column (mask below); "
            "everything outside the mask holds -3.0, gamma = 1, lam = 0.95",
            _with_padding(_rounded_randn((3, 7), generator), mask, -3.0),
            _with_padding(_rounded_randn((3, 7), generator), mask, -3.0),
            mask,
            1.0,
            0.95,
            "the mask can start after column 0 (prompt tokens and padding come first) and end before the last "
            "column. The recursion runs over the real tokens only, from the last one backwards.",
        )
    )
    mask = _run_mask(4, 6, [(0, 6), (5, 1), (1, 2), (3, 3)])
    cases.append(
        _gae_case(
            "a mixed batch: a full row, a one-token response in the last column, and two short ones (mask "
            "below); the padding holds 5.0, gamma = 0.99, lam = 0.9",
            _with_padding(_rounded_randn((4, 6), generator), mask, 5.0),
            _with_padding(_rounded_randn((4, 6), generator), mask, 5.0),
            mask,
            0.99,
            0.9,
            "a one-token response has A = r - V; a response that reaches the last column has nothing after it. "
            "Every row is independent of the others.",
        )
    )
    return cases


def check_gae(fn: Callable) -> bool:
    """Check ``fn(rewards, values, mask, gamma, lam) -> (advantages, returns)``, all (B, T), like ``ppo.gae``.

    The language-model case: each row is one response, ``mask`` marks its tokens (contiguous, possibly
    after a padded prompt), and the response ends at its last real token. Both outputs are checked
    where ``mask`` is 1.
    """
    checker = _Checker(
        name="check_gae",
        arg_names=("rewards", "values", "mask", "gamma", "lam"),
        cases=_gae_cases(),
        grad_args=(),
        shape_hint="(B, T), the shape of rewards",
        start_hint="loop t backwards over the columns: delta_t = r_t + gamma * V(s_{t+1}) * m_{t+1} - V(s_t), "
        "A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}, where m_{t+1} = mask[:, t + 1] (0 after the "
        "last column); returns = advantages + values.",
    )
    return _run(checker, fn)


# ---------------------------------------------------------------------------------------------
# PPO's clipped policy loss
# ---------------------------------------------------------------------------------------------


def _reference_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> torch.Tensor:
    total, count = 0.0, 0
    for new, old, advantage, real in zip(
        logprobs.flatten().tolist(),
        old_logprobs.flatten().tolist(),
        advantages.flatten().tolist(),
        mask.flatten().tolist(),
    ):
        if not real:
            continue
        ratio = math.exp(new - old)
        clipped_ratio = min(max(ratio, 1.0 - clip_range), 1.0 + clip_range)
        total += max(-advantage * ratio, -advantage * clipped_ratio)  # the pessimistic bound
        count += 1
    return torch.tensor(total / count, dtype=torch.float64)


def _policy_case(
    description: str,
    ratios,
    advantages,
    mask: torch.Tensor,
    clip_range: float,
    old_logprobs,
    hint: str,
    padding: float = 0.0,
) -> _Case:
    ratios, advantages, old_logprobs = _tensor(ratios), _tensor(advantages), _tensor(old_logprobs)
    logprobs = old_logprobs + torch.log(ratios)  # (B, T): so that exp(logprobs - old_logprobs) = ratios
    logprobs = _with_padding(logprobs, mask, padding)
    old_logprobs = _with_padding(old_logprobs, mask, -padding)
    advantages = _with_padding(advantages, mask, padding)
    expected = _reference_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range)
    return _Case(description, (logprobs, old_logprobs, advantages, mask, clip_range), {"loss": expected}, None, hint)


def _policy_loss_cases() -> list[_Case]:
    generator = torch.Generator().manual_seed(1)

    def old_logprobs(B: int, T: int) -> torch.Tensor:  # log-probs of sampled tokens, in [-3, -0.5]
        return -0.5 - 2.5 * torch.rand(B, T, generator=generator)

    return [
        _policy_case(
            "ratios all 1 (logprobs == old_logprobs), no padding, clip_range = 0.2",
            [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
            [[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]],
            torch.ones(2, 3),
            0.2,
            old_logprobs(2, 3),
            "at ratio 1 the loss is -mean(advantages). PPO maximises the surrogate ratio * A, so the loss to "
            "minimise carries a minus sign.",
        ),
        _policy_case(
            "ratios inside [1 - clip_range, 1 + clip_range], advantages of both signs, no padding",
            [[1.1, 0.9, 1.05, 0.95]],
            [[1.0, -2.0, -0.5, 1.5]],
            torch.ones(1, 4),
            0.2,
            old_logprobs(1, 4),
            "inside the clip range the loss is -mean(advantages * ratio), with ratio = exp(logprobs - "
            "old_logprobs) (a ratio of probabilities, not of log-probs).",
        ),
        _policy_case(
            "ratios 1.5 and 0.5, outside the clip range 0.2, each with a positive and a negative advantage",
            [[1.5, 0.5, 1.5, 0.5], [1.3, 0.7, 1.25, 0.75]],
            [[1.0, 1.0, -1.0, -1.0], [2.0, -2.0, -0.5, 0.5]],
            torch.ones(2, 4),
            0.2,
            old_logprobs(2, 4),
            "per token, keep the pessimistic (larger) loss: max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)). "
            "With A > 0 and a ratio below 1 - eps, or A < 0 and a ratio above 1 + eps, the unclipped term is "
            "the larger one: clipping never hides a loss, it only removes the gain of moving further.",
        ),
        _policy_case(
            "3 right-padded rows of lengths 4, 2 and 1 (mask below), ratios in and out of the clip range; "
            "the padding holds +-4.0",
            [[1.4, 0.9, 1.0, 0.6], [1.1, 0.7, 1.0, 1.0], [1.3, 1.0, 1.0, 1.0]],
            [[0.3, -1.2, 0.8, 1.0], [-0.4, 2.0, 0.0, 0.0], [1.5, 0.0, 0.0, 0.0]],
            _run_mask(3, 4, [(0, 4), (0, 2), (0, 1)]),
            0.2,
            old_logprobs(3, 4),
            "the loss is the mean over every real token of the batch: the sum over the mask divided by the "
            "number of real tokens. Not a mean per row averaged over rows, and padding (+-4.0 here) must not count.",
            padding=4.0,
        ),
        _policy_case(
            "3 responses after left-padded prompts (mask below), clip_range = 0.1; the padding holds +-2.0",
            [[1.0, 1.0, 1.2, 0.8, 1.05], [1.0, 0.85, 1.15, 1.0, 1.0], [0.95, 1.3, 0.6, 1.1, 1.0]],
            [[0.0, 0.0, -0.7, 0.9, 1.1], [0.0, 1.3, 0.4, 0.0, 0.0], [-1.0, -0.2, 0.6, 0.8, 0.0]],
            _run_mask(3, 5, [(2, 3), (1, 2), (0, 4)]),
            0.1,
            old_logprobs(3, 5),
            "use clip_range as given (here 0.1), and average over the real tokens only, wherever they sit in the row.",
            padding=-2.0,
        ),
    ]


def check_policy_loss(fn: Callable) -> bool:
    """Check ``fn(logprobs, old_logprobs, advantages, mask, clip_range) -> loss``, like ``ppo.policy_loss``.

    The loss is PPO's clipped surrogate, to minimise, averaged over every real token of the batch.
    A returned tuple (``policy_loss`` returns ``(loss, stats)``) is checked on its first element.
    """
    checker = _Checker(
        name="check_policy_loss",
        arg_names=("logprobs", "old_logprobs", "advantages", "mask", "clip_range"),
        cases=_policy_loss_cases(),
        grad_args=(0,),
        shape_hint="a scalar: one loss for the whole batch",
        start_hint="ratio = exp(logprobs - old_logprobs); per token take max(-A * ratio, -A * clamp(ratio, "
        "1 - clip_range, 1 + clip_range)), then the mean over the positions where mask is 1.",
    )
    return _run(checker, fn)


# ---------------------------------------------------------------------------------------------
# The reward model's Bradley-Terry loss
# ---------------------------------------------------------------------------------------------


def _softplus(x: float) -> float:
    """log(1 + e^x), exact for large |x|: -log sigmoid(z) = softplus(-z)."""
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def _reference_bradley_terry(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    losses = [_softplus(-(c - r)) for c, r in zip(chosen_scores.tolist(), rejected_scores.tolist())]
    return torch.tensor(sum(losses) / len(losses), dtype=torch.float64)


def _bradley_terry_case(description: str, chosen, rejected, hint: str) -> _Case:
    chosen, rejected = _tensor(chosen), _tensor(rejected)
    return _Case(description, (chosen, rejected), {"loss": _reference_bradley_terry(chosen, rejected)}, None, hint)


def check_bradley_terry_loss(fn: Callable) -> bool:
    """Check ``fn(chosen_scores, rejected_scores) -> loss``, like ``reward_model.bradley_terry_loss``.

    Scores are (B,), one per pair; the loss is the mean over the pairs of -log sigmoid(chosen - rejected).
    """
    generator = torch.Generator().manual_seed(2)
    cases = [
        _bradley_terry_case(
            "one pair, the chosen response scored 1.0 and the rejected 0.0",
            [1.0],
            [0.0],
            "loss = -log sigmoid(chosen - rejected): small when the chosen response scores higher. Check the "
            "sign and the order of the difference.",
        ),
        _bradley_terry_case(
            "6 pairs, some ranked right and some wrong",
            _rounded_randn((6,), generator).tolist(),
            _rounded_randn((6,), generator).tolist(),
            "return the mean over the pairs: one number, not the sum and not one loss per pair.",
        ),
        _bradley_terry_case(
            "3 pairs with equal scores (each loss is log 2)",
            [0.5, -1.0, 2.0],
            [0.5, -1.0, 2.0],
            "when chosen and rejected score the same, sigmoid(0) = 1/2 and the loss is log 2 = 0.6931.",
        ),
        _bradley_terry_case(
            "4 pairs with large score differences (+-30, +-200)",
            [30.0, -30.0, 200.0, -100.0],
            [0.0, 0.0, 0.0, 100.0],
            "for a very negative difference x, torch.log(torch.sigmoid(x)) computes log(0) = -inf in float32. "
            "Use torch.nn.functional.logsigmoid(x) (or -softplus(-x)), which is exact there.",
        ),
    ]
    checker = _Checker(
        name="check_bradley_terry_loss",
        arg_names=("chosen_scores", "rejected_scores"),
        cases=cases,
        grad_args=(0, 1),
        shape_hint="a scalar: the mean loss over the pairs",
        start_hint="the probability that the chosen response wins is sigmoid(chosen - rejected); the loss is "
        "its negative log, averaged over the pairs (torch.nn.functional.logsigmoid helps).",
    )
    return _run(checker, fn)


# ---------------------------------------------------------------------------------------------
# DPO's per-pair loss
# ---------------------------------------------------------------------------------------------


def _reference_dpo(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    losses = []
    for pc, pr, rc, rr in zip(
        policy_chosen.tolist(), policy_rejected.tolist(), ref_chosen.tolist(), ref_rejected.tolist()
    ):
        margin = (pc - pr) - (rc - rr)  # how much more the policy prefers the chosen response than pi_ref does
        losses.append(_softplus(-beta * margin))  # -log sigmoid(beta * margin)
    return torch.tensor(losses, dtype=torch.float64)


def _dpo_case(
    description: str, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, hint: str
) -> _Case:
    args = tuple(_tensor(x) for x in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    return _Case(description, (*args, beta), {"losses": _reference_dpo(*args, beta)}, None, hint)


def check_dpo_loss(fn: Callable) -> bool:
    """Check ``fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    -> losses``, one per pair (B,), like ``dpo.dpo_loss`` with its default sigmoid loss.

    A returned tuple (``dpo_loss`` returns ``(losses, chosen_rewards, rejected_rewards)``) is checked on its
    first element.
    """
    generator = torch.Generator().manual_seed(3)

    def logps(n: int) -> list[float]:  # summed response log-probs, in [-60, -10]
        return (-10.0 - 50.0 * torch.rand(n, generator=generator)).round(decimals=2).tolist()

    same_chosen, same_rejected = logps(3), logps(3)
    ref_chosen, ref_rejected = logps(4), logps(4)
    cases = [
        _dpo_case(
            "3 pairs where the policy equals the reference (every loss is log 2), beta = 0.1",
            same_chosen,
            same_rejected,
            same_chosen,
            same_rejected,
            0.1,
            "when the policy equals the reference, every loss is log 2 = 0.6931, whatever the log-probs: DPO "
            "scores how much *more* the policy prefers the chosen response than pi_ref does. Subtract the "
            "reference's log-ratio (ref_chosen - ref_rejected).",
        ),
        _dpo_case(
            "4 pairs, the policy moved away from the reference, beta = 0.1",
            [c + d for c, d in zip(ref_chosen, [2.0, -1.0, 0.5, 3.0])],
            [r + d for r, d in zip(ref_rejected, [-1.0, 1.5, 0.0, 2.0])],
            ref_chosen,
            ref_rejected,
            0.1,
            "loss_i = -log sigmoid(beta * ((pi_chosen - pi_rejected) - (ref_chosen - ref_rejected))), one per "
            "pair; beta multiplies the margin inside the sigmoid.",
        ),
        _dpo_case(
            "3 pairs where the reference prefers the rejected response, beta = 0.5",
            [-20.0, -35.5, -12.25],
            [-22.0, -30.0, -15.0],
            [-25.0, -40.0, -14.0],
            [-18.0, -31.0, -13.0],
            0.5,
            "use beta as given (0.5 here), and keep the order: chosen minus rejected, policy minus reference.",
        ),
        _dpo_case(
            "2 pairs with large margins (+-150 nats), beta = 1.0",
            [-10.0, -160.0],
            [-160.0, -10.0],
            [-50.0, -50.0],
            [-50.0, -50.0],
            1.0,
            "for a very negative x, torch.log(torch.sigmoid(x)) computes log(0) = -inf in float32. Use "
            "torch.nn.functional.logsigmoid(x), which is exact there.",
        ),
    ]
    checker = _Checker(
        name="check_dpo_loss",
        arg_names=("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "beta"),
        cases=cases,
        grad_args=(0, 1),
        shape_hint="(B,): one loss per pair; do not average, the trainer does",
        start_hint="margin = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected); "
        "losses = -logsigmoid(beta * margin), one per pair.",
    )
    return _run(checker, fn)


# ---------------------------------------------------------------------------------------------
# Per-token rewards of the PPO rollout
# ---------------------------------------------------------------------------------------------


def _reference_per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, attention_mask: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    B, T = kl.shape
    s, k, attention, response = scores.tolist(), kl.tolist(), attention_mask.tolist(), response_mask.tolist()
    rewards = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if response[b][t]:
                rewards[b][t] = -kl_coef * k[b][t]
        last_real = max(t for t in range(T) if attention[b][t])  # the EOS, or the last token of a cut response
        rewards[b][last_real] += s[b]
    return torch.tensor(rewards, dtype=torch.float64)


def _rewards_case(
    description: str,
    layout: Sequence[tuple[int, int, int]],
    T: int,
    kl_coef: float,
    generator: torch.Generator,
    hint: str,
) -> _Case:
    """``layout``: per row (left padding, prompt length, response length); right padding fills the rest."""
    B = len(layout)
    attention_mask = _run_mask(B, T, [(pad, prompt + response) for pad, prompt, response in layout])
    response_mask = _run_mask(B, T, [(pad + prompt, response) for pad, prompt, response in layout])
    scores = _rounded_randn((B,), generator, scale=2.0)
    kl = _rounded_randn((B, T), generator, scale=0.3)  # per-token KL estimates (k1 can be negative)
    expected = _reference_per_token_rewards(scores, kl, kl_coef, attention_mask, response_mask)
    return _Case(
        description, (scores, kl, kl_coef, attention_mask, response_mask), {"rewards": expected}, response_mask, hint
    )


def check_per_token_rewards(fn: Callable) -> bool:
    """Check ``fn(scores, kl, kl_coef, attention_mask, response_mask) -> rewards`` (B, T), like
    ``rlhf.compute_rewards``: -kl_coef * kl on every response token, plus the reward model's score (B,) at
    each row's last real token. Compared where ``response_mask`` is 1.
    """
    generator = torch.Generator().manual_seed(4)
    cases = [
        _rewards_case(
            "3 right-padded rows, prompt from column 0 (masks below), kl_coef = 0.1",
            [(0, 2, 3), (0, 3, 1), (0, 1, 4)],
            6,
            0.1,
            generator,
            "r_t = -kl_coef * kl_t on every response token (a penalty: note the minus), and the score is added "
            "at the last real token of the row (the last column where attention_mask is 1), not at the first "
            "padding position after it and not in the last column.",
        ),
        _rewards_case(
            "3 rows as the rollout lays them out: left-padded prompts, right-padded responses (masks below), "
            "kl_coef = 0.05",
            [(2, 2, 2), (0, 3, 3), (1, 1, 2)],
            6,
            0.05,
            generator,
            "with left padding the last real token is not at attention_mask.sum() - 1: find, in each row, the "
            "last column where attention_mask is 1.",
        ),
        _rewards_case(
            "kl_coef = 0: the only reward is the score",
            [(1, 2, 3), (0, 2, 2)],
            6,
            0.0,
            generator,
            "with kl_coef = 0 every response token gets 0, except the last real token, which gets the score.",
        ),
        _rewards_case(
            "edge rows: a one-token response, and a response that fills the last column (masks below), kl_coef = 0.2",
            [(3, 2, 1), (0, 2, 5), (1, 3, 3)],
            7,
            0.2,
            generator,
            "a one-token response gets its KL penalty and the score on the same token; a response that reaches "
            "the last column has no padding after it. Add the score to the KL term, do not replace it.",
        ),
    ]
    checker = _Checker(
        name="check_per_token_rewards",
        arg_names=("scores", "kl", "kl_coef", "attention_mask", "response_mask"),
        cases=cases,
        grad_args=(),
        shape_hint="(B, T), the shape of kl",
        start_hint="start from rewards = -kl_coef * kl * response_mask, then for each row b add scores[b] at "
        "the last column where attention_mask[b] is 1.",
    )
    return _run(checker, fn)


# ---------------------------------------------------------------------------------------------
# RLOO: the leave-one-out baseline (chapter 08)
# ---------------------------------------------------------------------------------------------


def _reference_rloo(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    values = scores.tolist()
    advantages = []
    for start in range(0, len(values), group_size):
        group = values[start : start + group_size]  # the k samples of one prompt
        for i, score in enumerate(group):
            others = group[:i] + group[i + 1 :]
            advantages.append(score - sum(others) / len(others))
    return torch.tensor(advantages, dtype=torch.float64)


def _rloo_case(description: str, scores, group_size: int, hint: str) -> _Case:
    scores = _tensor(scores)
    return _Case(description, (scores, group_size), {"advantages": _reference_rloo(scores, group_size)}, None, hint)


def check_rloo_advantages(fn: Callable) -> bool:
    """Check ``fn(scores, group_size) -> advantages``, both (P * k,), like
    ``grpo.group_advantages(scores, group_size, "rloo")``.

    The k = ``group_size`` samples of prompt i are the consecutive entries i*k ... i*k + k - 1; each
    sample's advantage is its score minus the mean score of the other k - 1 samples of its prompt.
    """
    generator = torch.Generator().manual_seed(5)
    cases = [
        _rloo_case(
            "one prompt, k = 2 samples scored 1.0 and 0.0",
            [1.0, 0.0],
            2,
            "each sample's baseline is the mean of the OTHER k - 1 scores of its group (not including its own): "
            "A_i = r_i - (sum of the group - r_i) / (k - 1).",
        ),
        _rloo_case(
            "2 prompts, k = 4 samples each",
            _rounded_randn((8,), generator).tolist(),
            4,
            "the k samples of prompt i are the consecutive entries i*k ... i*k + k - 1, so "
            "scores.view(-1, group_size) has one row per prompt (scores.view(group_size, -1) mixes prompts).",
        ),
        _rloo_case(
            "2 prompts, k = 3: a group of equal scores and a group with a tie",
            [0.5, 0.5, 0.5, 1.0, 1.0, -2.0],
            3,
            "a group whose scores are all equal gets zero advantages: no sample did better than its peers. The "
            "leave-one-out baseline needs no division by a standard deviation.",
        ),
        _rloo_case(
            "3 prompts of different difficulty (scores around 10, 0 and -5), k = 5",
            (_rounded_randn((15,), generator) + torch.tensor([10.0] * 5 + [0.0] * 5 + [-5.0] * 5)).tolist(),
            5,
            "each prompt has its own baseline, from its own samples only: a batch-wide mean would reward easy "
            "prompts and punish hard ones.",
        ),
    ]
    checker = _Checker(
        name="check_rloo_advantages",
        arg_names=("scores", "group_size"),
        cases=cases,
        grad_args=(),
        shape_hint="(P * k,), the shape of scores",
        start_hint="reshape scores to (P, k) with scores.view(-1, group_size); the baseline of sample i is "
        "(group sum - r_i) / (k - 1); return the advantages flattened back to (P * k,).",
    )
    return _run(checker, fn)
