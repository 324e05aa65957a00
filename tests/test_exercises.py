"""rlhf_core.exercises: every checker accepts the library's own function and rejects typical mistakes.

The mistakes below are the ones a learner makes (a mask ignored, a sign flipped, a mean taken over
the wrong set, the score put at the wrong token); each must be refused with an AssertionError whose
message names the case, the expected value and what came back.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rlhf_core import exercises
from rlhf_core.dpo import dpo_loss
from rlhf_core.grpo import group_advantages
from rlhf_core.ppo import gae, policy_loss
from rlhf_core.reward_model import bradley_terry_loss
from rlhf_core.rlhf import compute_rewards

# ---------------------------------------------------------------------------------------------
# Typical mistakes, one small function each
# ---------------------------------------------------------------------------------------------


def gae_loop(rewards, values, mask, gamma, lam, use_mask=True, use_lam=True, add_values=True):
    """A learner's GAE, with switches that reproduce the usual slips."""
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros(B)
    for t in reversed(range(T)):
        next_is_real = mask[:, t + 1] if t + 1 < T else torch.zeros(B)
        if not use_mask:
            next_is_real = torch.ones(B) if t + 1 < T else torch.zeros(B)
        next_value = values[:, t + 1] * next_is_real if t + 1 < T else torch.zeros(B)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        decay = gamma * lam if use_lam else gamma
        advantages[:, t] = delta + decay * next_is_real * next_advantage
        next_advantage = advantages[:, t]
    returns = advantages + values if add_values else advantages
    return advantages, returns


GAE_MISTAKES = {
    "ignores the mask": lambda r, v, m, g, l: gae_loop(r, v, m, g, l, use_mask=False),
    "forgets lam": lambda r, v, m, g, l: gae_loop(r, v, m, g, l, use_lam=False),
    "returns without the values": lambda r, v, m, g, l: gae_loop(r, v, m, g, l, add_values=False),
    "returns advantages only": lambda r, v, m, g, l: gae_loop(r, v, m, g, l)[0],
}


def clipped_terms(logprobs, old_logprobs, advantages, clip_range):
    ratio = torch.exp(logprobs - old_logprobs)
    return -advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)


def policy_loss_optimistic(logprobs, old_logprobs, advantages, mask, clip_range):
    unclipped, clipped = clipped_terms(logprobs, old_logprobs, advantages, clip_range)
    return (torch.minimum(unclipped, clipped) * mask).sum() / mask.sum()


def policy_loss_without_minus(logprobs, old_logprobs, advantages, mask, clip_range):
    unclipped, clipped = clipped_terms(logprobs, old_logprobs, advantages, clip_range)
    return -(torch.maximum(unclipped, clipped) * mask).sum() / mask.sum()


def policy_loss_mean_of_row_means(logprobs, old_logprobs, advantages, mask, clip_range):
    unclipped, clipped = clipped_terms(logprobs, old_logprobs, advantages, clip_range)
    return ((torch.maximum(unclipped, clipped) * mask).sum(1) / mask.sum(1)).mean()


def policy_loss_over_padding(logprobs, old_logprobs, advantages, mask, clip_range):
    unclipped, clipped = clipped_terms(logprobs, old_logprobs, advantages, clip_range)
    return torch.maximum(unclipped, clipped).mean()


def policy_loss_ratio_of_logprobs(logprobs, old_logprobs, advantages, mask, clip_range):
    ratio = logprobs / old_logprobs
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return (torch.maximum(-advantages * ratio, clipped) * mask).sum() / mask.sum()


def policy_loss_detached(logprobs, old_logprobs, advantages, mask, clip_range):
    return policy_loss(logprobs.detach(), old_logprobs, advantages, mask, clip_range)[0]


POLICY_LOSS_MISTAKES = {
    "min instead of max (optimistic bound)": policy_loss_optimistic,
    "an objective, not a loss": policy_loss_without_minus,
    "mean of per-row means": policy_loss_mean_of_row_means,
    "averages over padding": policy_loss_over_padding,
    "ratio of log-probs": policy_loss_ratio_of_logprobs,
    "no gradient": policy_loss_detached,
}

BRADLEY_TERRY_MISTAKES = {
    "sign flipped": lambda chosen, rejected: -F.logsigmoid(rejected - chosen).mean(),
    "sum instead of mean": lambda chosen, rejected: -F.logsigmoid(chosen - rejected).sum(),
    "one loss per pair": lambda chosen, rejected: -F.logsigmoid(chosen - rejected),
    "log of sigmoid overflows": lambda chosen, rejected: -torch.log(torch.sigmoid(chosen - rejected)).mean(),
    "a Python number": lambda chosen, rejected: bradley_terry_loss(chosen, rejected).item(),
}

DPO_MISTAKES = {
    "no reference terms": lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * (pc - pr)),
    "mean instead of per-pair": lambda pc, pr, rc, rr, beta: dpo_loss(pc, pr, rc, rr, beta)[0].mean(),
    "beta outside the sigmoid": lambda pc, pr, rc, rr, beta: -beta * F.logsigmoid((pc - pr) - (rc - rr)),
    "reference pair swapped": lambda pc, pr, rc, rr, beta: -F.logsigmoid(beta * ((pc - pr) - (rr - rc))),
    "log of sigmoid overflows": lambda pc, pr, rc, rr, beta: -torch.log(torch.sigmoid(beta * ((pc - pr) - (rc - rr)))),
}


def rewards_with_score_at(columns, scores, kl, kl_coef, response_mask, sign=-1.0):
    rewards = sign * kl_coef * kl * response_mask
    rewards[torch.arange(len(scores)), columns] += scores
    return rewards


def last_real_column(attention_mask):
    columns = torch.arange(1, attention_mask.shape[1] + 1)  # 1-based, so a padded column (0) never wins
    return (attention_mask * columns).argmax(dim=1)


PER_TOKEN_REWARD_MISTAKES = {
    "score at the first pad": lambda s, kl, c, am, rm: rewards_with_score_at(
        (last_real_column(am) + 1).clamp(max=kl.shape[1] - 1), s, kl, c, rm
    ),
    "score at attention_mask.sum() - 1": lambda s, kl, c, am, rm: rewards_with_score_at(
        am.sum(1).long() - 1, s, kl, c, rm
    ),
    "score in the last column": lambda s, kl, c, am, rm: rewards_with_score_at(
        torch.full((len(s),), kl.shape[1] - 1), s, kl, c, rm
    ),
    "KL as a bonus": lambda s, kl, c, am, rm: rewards_with_score_at(last_real_column(am), s, kl, c, rm, sign=1.0),
    "score replaces the KL term": lambda s, kl, c, am, rm: torch.where(
        torch.nn.functional.one_hot(last_real_column(am), kl.shape[1]).bool(),
        s[:, None].expand_as(kl),
        -c * kl * rm,
    ),
}


def rloo_leaving_nothing_out(scores, group_size):
    groups = scores.view(-1, group_size)
    return (groups - groups.mean(1, keepdim=True)).flatten()


def rloo_dividing_by_k(scores, group_size):
    groups = scores.view(-1, group_size)
    return (groups - (groups.sum(1, keepdim=True) - groups) / group_size).flatten()


def rloo_interleaved_groups(scores, group_size):
    groups = scores.view(group_size, -1).T  # (P, k) if the samples were laid out sample-major: they are not
    advantages = groups - (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return advantages.T.flatten()


def rloo_batch_baseline(scores, group_size):
    return scores - (scores.sum() - scores) / (len(scores) - 1)


RLOO_MISTAKES = {
    "baseline includes the sample itself": rloo_leaving_nothing_out,
    "divides by k": rloo_dividing_by_k,
    "interleaved groups": rloo_interleaved_groups,
    "batch-wide baseline": rloo_batch_baseline,
    "grpo instead of rloo": lambda scores, group_size: group_advantages(scores, group_size, "grpo"),
}

CHECKERS = {
    "gae": (exercises.check_gae, gae, GAE_MISTAKES),
    "policy_loss": (exercises.check_policy_loss, policy_loss, POLICY_LOSS_MISTAKES),
    "bradley_terry": (exercises.check_bradley_terry_loss, bradley_terry_loss, BRADLEY_TERRY_MISTAKES),
    "dpo": (exercises.check_dpo_loss, dpo_loss, DPO_MISTAKES),
    "per_token_rewards": (exercises.check_per_token_rewards, compute_rewards, PER_TOKEN_REWARD_MISTAKES),
    "rloo": (
        exercises.check_rloo_advantages,
        lambda scores, group_size: group_advantages(scores, group_size, "rloo"),
        RLOO_MISTAKES,
    ),
}

MISTAKES = [(checker, mistake) for checker, (_, _, mistakes) in CHECKERS.items() for mistake in mistakes]


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checker", list(CHECKERS))
def test_the_library_function_passes(checker, capsys):
    check, library_function, _ = CHECKERS[checker]
    assert check(library_function) is True
    assert "cases passed" in capsys.readouterr().out


@pytest.mark.parametrize("checker", list(CHECKERS))
def test_every_checker_has_at_least_three_mistakes_to_reject(checker):
    assert len(CHECKERS[checker][2]) >= 3


@pytest.mark.parametrize(("checker", "mistake"), MISTAKES)
def test_a_typical_mistake_is_rejected_with_a_message(checker, mistake):
    check, _, mistakes = CHECKERS[checker]
    with pytest.raises(AssertionError) as failure:
        check(mistakes[mistake])
    message = str(failure.value)
    assert message.startswith(f"check_{checker}" if checker != "bradley_terry" else "check_bradley_terry_loss")
    assert "failed on case" in message and "Inputs:" in message


def test_the_message_names_the_entry_the_expected_value_and_the_returned_one():
    with pytest.raises(AssertionError) as failure:
        exercises.check_gae(GAE_MISTAKES["ignores the mask"])
    message = str(failure.value)
    # The first two cases have no padding, so ignoring the mask first shows on the right-padded case.
    assert "failed on case 4 of 6" in message
    assert "advantages[1, 0] should be" in message and "but your function returned" in message
    assert "mask =" in message and "[1, 0, 0, 0, 0]" in message
    assert "Expected advantages ('.' = padding, not compared):" in message


def test_a_wrong_formula_gets_the_case_hint_and_a_wrong_return_type_gets_none():
    with pytest.raises(AssertionError, match=r"\nHint: loss = -log sigmoid\(chosen - rejected\): small when"):
        exercises.check_bradley_terry_loss(BRADLEY_TERRY_MISTAKES["sign flipped"])
    with pytest.raises(AssertionError) as failure:
        exercises.check_policy_loss(POLICY_LOSS_MISTAKES["no gradient"])
    assert "carries no gradient back to `logprobs`" in str(failure.value)
    assert "Hint:" not in str(failure.value)


def test_a_sign_flip_is_caught_on_the_first_case():
    with pytest.raises(AssertionError, match=r"case 1 of 4: one pair.*\nloss should be 0\.3133 but .* 1\.3133"):
        exercises.check_bradley_terry_loss(BRADLEY_TERRY_MISTAKES["sign flipped"])


def test_a_wrong_shape_is_named():
    with pytest.raises(AssertionError, match=r"losses should have shape \(3,\) .* returned shape \(\)"):
        exercises.check_dpo_loss(DPO_MISTAKES["mean instead of per-pair"])


def test_values_outside_the_mask_are_not_compared():
    def gae_with_garbage_in_padding(rewards, values, mask, gamma, lam):
        advantages, returns = gae(rewards, values, mask, gamma, lam)
        padding = mask == 0
        return advantages.masked_fill(padding, float("nan")), returns.masked_fill(padding, 123.0)

    assert exercises.check_gae(gae_with_garbage_in_padding) is True


def test_a_tuple_is_checked_on_its_first_element():
    def loss_with_logs(chosen, rejected):
        return bradley_terry_loss(chosen, rejected), {"accuracy": (chosen > rejected).float().mean()}

    assert exercises.check_bradley_terry_loss(loss_with_logs) is True


def test_not_implemented_prints_a_hint_and_returns_false(capsys):
    def unfinished(*args):
        raise NotImplementedError

    for check in (exercises.check_gae, exercises.check_dpo_loss, exercises.check_rloo_advantages):
        assert check(unfinished) is False
        printed = capsys.readouterr().out
        assert "NotImplementedError" in printed and "Hint:" in printed


def test_a_crash_names_the_case_and_keeps_the_cause():
    def crashes_on_padding(rewards, values, mask, gamma, lam):
        if not bool(mask.all()):
            raise IndexError("index 5 is out of bounds")
        return gae(rewards, values, mask, gamma, lam)

    with pytest.raises(AssertionError, match="raised IndexError: index 5 is out of bounds\non case 4 of 6") as failure:
        exercises.check_gae(crashes_on_padding)
    assert isinstance(failure.value.__cause__, IndexError)


def test_changing_an_input_in_place_is_refused():
    def modifies_kl(scores, kl, kl_coef, attention_mask, response_mask):
        rewards = compute_rewards(scores, kl, kl_coef, attention_mask, response_mask)
        kl.mul_(-kl_coef)
        return rewards

    with pytest.raises(AssertionError, match="changed its input `kl` in place"):
        exercises.check_per_token_rewards(modifies_kl)


def test_the_checkers_are_called_with_float32_tensors():
    seen = []

    def records_dtypes(*args):
        seen.extend(a.dtype for a in args if isinstance(a, torch.Tensor))
        return policy_loss(*args)

    exercises.check_policy_loss(records_dtypes)
    assert seen and set(seen) == {torch.float32}


def test_the_expected_answers_do_not_come_from_the_library():
    # The checkers are only trustworthy if their references are written independently: no module of
    # the exercises package imports rlhf_core; relative imports stay inside the package.
    package = Path(exercises.__file__).parent
    siblings = {path.stem for path in package.glob("*.py")}
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert not any("rlhf_core" in name for name in imported if name), path.name
        relative = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 0]
        assert all(node.level == 1 and node.module in siblings for node in relative), path.name
