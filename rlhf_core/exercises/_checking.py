"""What every checker shares: cases, the comparison, and messages a learner can act on."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch

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
