"""DPO: the loss against its formulas, the log-probs it is built on, and real training runs."""

import copy
import math

import pytest
import torch

from rlhf_core.batching import encode_pairs
from rlhf_core.dpo import (
    DPOConfig,
    dpo_loss,
    encode_preference_batch,
    pair_logps,
    precompute_reference_logps,
    reference_logps_for_rows,
    train_dpo,
    used_rows,
)
from rlhf_core.logprobs import sequence_logprobs
from rlhf_core.loop import batch_rows
from rlhf_core.models import load_causal_lm
from rlhf_core.training import NonFiniteLossError
from rlhf_core.world import ReviewWorld


def world_pairs(n: int, seed: int) -> list[dict]:
    """Preference pairs from the world: a positive review is preferred to a negative one."""
    world = ReviewWorld(seed)
    pairs = []
    for _ in range(n):
        prompt = world.prompt()
        pairs.append({"prompt": prompt, "chosen": world.response(0.8), "rejected": world.response(-0.8)})
    return pairs


@pytest.fixture(scope="module")
def base_model(tiny_profile):
    return load_causal_lm(tiny_profile.base_model)


def _random_logps(generator, size=7):
    return [-30 * torch.rand(size, generator=generator, dtype=torch.float64) for _ in range(4)]


def test_dpo_loss_matches_the_per_example_formulas():
    generator = torch.Generator().manual_seed(0)
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = _random_logps(generator)
    beta = 0.3
    sigmoid_losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, "sigmoid"
    )
    ipo_losses, _, _ = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, "ipo")
    assert sigmoid_losses.shape == ipo_losses.shape == (7,)
    for i in range(7):
        h = (float(policy_chosen[i]) - float(policy_rejected[i])) - (float(ref_chosen[i]) - float(ref_rejected[i]))
        assert float(sigmoid_losses[i]) == pytest.approx(-math.log(1 / (1 + math.exp(-beta * h))), rel=1e-9)
        assert float(ipo_losses[i]) == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-9)
        # the implicit reward: beta * log(pi / pi_ref), beta log Z left out
        assert float(chosen_rewards[i]) == pytest.approx(beta * (float(policy_chosen[i]) - float(ref_chosen[i])))
        assert float(rejected_rewards[i]) == pytest.approx(beta * (float(policy_rejected[i]) - float(ref_rejected[i])))
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, "hinge?")


def test_sigmoid_loss_is_stable_for_huge_margins():
    big = torch.tensor([1e4, -1e4])
    losses, _, _ = dpo_loss(big, -big, torch.zeros(2), torch.zeros(2), beta=1.0)
    assert torch.isfinite(losses).all()
    assert float(losses[0]) == pytest.approx(0.0, abs=1e-12) and float(losses[1]) == pytest.approx(2e4)


def test_gradient_pushes_chosen_up_and_rejected_down(tokenizer):
    policy_chosen = torch.tensor([-10.0, -3.0], requires_grad=True)
    policy_rejected = torch.tensor([-12.0, -2.0], requires_grad=True)
    for loss_type in ("sigmoid", "ipo"):
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, torch.tensor([-11.0, -3.0]), torch.tensor([-11.0, -3.0]), 0.1, loss_type
        )
        assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad  # logging only
        chosen_grad, rejected_grad = torch.autograd.grad(losses.sum(), [policy_chosen, policy_rejected])
        assert (chosen_grad < 0).all() and (rejected_grad > 0).all(), loss_type  # descent raises chosen

    # The same on a real model: one gradient step raises log pi(chosen) - log pi(rejected).
    torch.manual_seed(0)
    from rlhf_core.config import get_profile
    from rlhf_core.models import new_model

    policy = new_model(get_profile("tiny"), len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    pairs = world_pairs(4, seed=3)
    before_chosen, before_rejected = pair_logps(policy, tokenizer, pairs)
    losses, _, _ = dpo_loss(before_chosen, before_rejected, before_chosen.detach(), before_rejected.detach(), 0.1)
    policy.zero_grad(set_to_none=True)
    losses.mean().backward()
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter -= 0.05 * parameter.grad
        after_chosen, after_rejected = pair_logps(policy, tokenizer, pairs)
    gained = (after_chosen - after_rejected) - (before_chosen - before_rejected).detach()
    assert (gained > 0).all(), gained


def test_pair_logps_sum_response_tokens_padding_and_batching_invariant(any_tokenizer, random_tiny_model):
    pairs = world_pairs(3, seed=5)
    pairs[1]["chosen"] = " Good."  # very different lengths: lots of padding in the stacked batch
    right_chosen, right_rejected = pair_logps(random_tiny_model, any_tokenizer, pairs, padding_side="right")
    left_chosen, left_rejected = pair_logps(random_tiny_model, any_tokenizer, pairs, padding_side="left")
    torch.testing.assert_close(left_chosen, right_chosen, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(left_rejected, right_rejected, atol=1e-4, rtol=1e-5)
    # one stacked forward = separate forwards of chosen and rejected, and = sums of token log-probs
    for key, stacked in [("chosen", right_chosen), ("rejected", right_rejected)]:
        batch = encode_pairs(any_tokenizer, [p["prompt"] for p in pairs], [p[key] for p in pairs])
        separate = sequence_logprobs(random_tiny_model, batch.input_ids, batch.attention_mask, batch.response_mask)
        torch.testing.assert_close(stacked, separate, atol=1e-4, rtol=1e-5)
    assert (right_chosen < 0).all()


def test_a_response_cut_at_the_length_limit_gets_no_eos(tokenizer):
    pair = world_pairs(1, seed=7)[0]
    ended = encode_preference_batch(tokenizer, [pair])
    cut = encode_preference_batch(tokenizer, [{**pair, "chosen_ended": False}])
    assert int(cut.response_mask[0].sum()) == int(ended.response_mask[0].sum()) - 1
    assert int(cut.response_mask[1].sum()) == int(ended.response_mask[1].sum())  # rejected: unchanged
    last = int(ended.attention_mask[0].sum()) - 1
    assert int(ended.input_ids[0, last]) == tokenizer.eos_token_id


def test_reference_precomputation_equals_on_the_fly(tokenizer, random_tiny_model):
    pairs = world_pairs(5, seed=11)
    precomputed_chosen, precomputed_rejected = precompute_reference_logps(
        random_tiny_model, tokenizer, pairs, batch_size=2
    )
    with torch.no_grad():
        chosen, rejected = pair_logps(random_tiny_model, tokenizer, pairs)
    assert precomputed_chosen.shape == (5,)
    torch.testing.assert_close(precomputed_chosen, chosen, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(precomputed_rejected, rejected, atol=1e-4, rtol=1e-5)


def test_batches_cover_every_pair_once_per_epoch():
    config = DPOConfig(batch_size=4, epochs=3, seed=2)
    assert config.total_steps(10) == 9
    for epoch in range(3):
        rows = [row for step in range(3 * epoch, 3 * epoch + 3) for row in batch_rows(step, 10, 4, config.seed)]
        assert sorted(rows) == list(range(10))  # the last batch of an epoch holds what is left
    assert batch_rows(0, 10, 4, config.seed) != batch_rows(3, 10, 4, config.seed)  # a new order each epoch
    assert DPOConfig(steps=5).total_steps(1000) == 5


def test_short_dpo_run_learns_the_world_preference_and_leaves_the_reference_alone(base_model, tokenizer):
    """Chosen: a positive review, rejected: a negative one. A few steps on 16 pairs generalise to
    32 held-out prompts; the reference and its log-probs do not move."""
    policy, reference = copy.deepcopy(base_model), copy.deepcopy(base_model)
    reference_state = {name: tensor.clone() for name, tensor in reference.state_dict().items()}
    train, heldout = world_pairs(16, seed=1), world_pairs(32, seed=2)
    ref_before = precompute_reference_logps(reference, tokenizer, heldout)
    config = DPOConfig(
        steps=8, batch_size=8, learning_rate=2e-3, warmup_steps=2, eval_every=4, checkpoint_every=0, beta=0.1
    )
    policy, history = train_dpo(policy, reference, tokenizer, train, heldout, config, progress=False)

    start, end = history[0], history[-1]
    assert start["step"] == 0 and start["heldout_loss"] == pytest.approx(math.log(2), abs=1e-5)  # pi = pi_ref
    assert start["heldout_reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert end["step"] == 8 and len(history) == 9
    # measured on CPU: held-out loss 0.69 -> 0.54, margin 0 -> 0.53, accuracy 0 -> 0.88
    assert end["heldout_loss"] < start["heldout_loss"] - 0.08
    assert end["heldout_reward_margin"] > 0.25
    assert end["heldout_accuracy"] >= 0.75
    assert all(math.isfinite(h["loss"]) and 0 <= h["accuracy"] <= 1 for h in history[1:])
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, reference_state[name]), name
    ref_after = precompute_reference_logps(reference, tokenizer, heldout)
    assert torch.equal(ref_before[0], ref_after[0]) and torch.equal(ref_before[1], ref_after[1])
    assert not torch.equal(policy.lm_head.weight, reference.lm_head.weight)


def test_ipo_run_moves_towards_its_target_margin(base_model, tokenizer):
    policy, reference = copy.deepcopy(base_model), copy.deepcopy(base_model)
    train = world_pairs(8, seed=4)
    config = DPOConfig(
        loss_type="ipo",
        beta=0.5,
        steps=4,
        batch_size=8,
        learning_rate=1e-3,
        warmup_steps=1,
        eval_every=0,
        checkpoint_every=0,
    )
    policy, history = train_dpo(policy, reference, tokenizer, train, train, config, progress=False)
    # h starts at 0: the loss (0 - 1/(2 beta))^2 = 1 and falls as the margin grows towards 1/(2 beta)
    assert history[0]["heldout_loss"] == pytest.approx(1.0, abs=1e-4)
    assert history[-1]["heldout_loss"] < 0.8 and history[-1]["heldout_reward_margin"] > 0


def test_interrupted_dpo_resumes_bit_exact(tmp_path, base_model, tokenizer):
    train, heldout = world_pairs(12, seed=8), world_pairs(4, seed=9)
    config = DPOConfig(
        steps=6, batch_size=4, learning_rate=1e-3, warmup_steps=2, eval_every=3, checkpoint_every=2, seed=3
    )  # 3 steps per epoch: the run crosses an epoch
    seen = []

    def run(folder: str, **options):  # a fresh copy of the base model as policy and as reference, each call
        return train_dpo(
            copy.deepcopy(base_model),
            copy.deepcopy(base_model),
            tokenizer,
            train,
            heldout,
            config,
            out_dir=tmp_path / folder,
            progress=False,
            **options,
        )

    uninterrupted, full_history = run("a", callback=seen.append)
    assert seen == full_history[1:]  # the callback gets every step's record
    _, partial_history = run("b", stop_after_steps=3)
    assert len(partial_history) == 4 and (tmp_path / "b" / "checkpoint" / "training_state.pt").exists()
    torch.manual_seed(12345)  # the disconnect scrambles the global random state
    resumed, resumed_history = run("b")
    assert resumed_history == full_history
    expected = uninterrupted.state_dict()
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert not (tmp_path / "b" / "checkpoint").exists() and (tmp_path / "b" / "dpo_summary.json").exists()
    reloaded = load_causal_lm(tmp_path / "b")
    assert torch.equal(reloaded.lm_head.weight, resumed.lm_head.weight)


def test_nan_guard_and_shared_weights_are_refused(base_model, tokenizer):
    pairs = world_pairs(4, seed=10)
    config = DPOConfig(steps=2, batch_size=4, checkpoint_every=0)
    broken = copy.deepcopy(base_model)
    with torch.no_grad():
        broken.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="DPO loss is nan at step 0"):
        train_dpo(broken, copy.deepcopy(base_model), tokenizer, pairs, [], config, progress=False)
    policy = copy.deepcopy(base_model)
    with pytest.raises(ValueError, match="share weights"):
        train_dpo(policy, policy, tokenizer, pairs, [], config, progress=False)


def test_used_rows_are_the_rows_the_batches_visit():
    config = DPOConfig(batch_size=4, steps=2, seed=1)  # 8 of 10 pairs: less than an epoch
    assert used_rows(10, config) == sorted(batch_rows(0, 10, 4, seed=1) + batch_rows(1, 10, 4, seed=1))
    assert len(used_rows(10, config)) == 8
    assert used_rows(10, DPOConfig(batch_size=4, epochs=2)) == list(range(10))


def test_a_short_run_needs_only_the_reference_log_probs_of_the_pairs_it_visits(base_model, tokenizer):
    """The reference log-probs computed for the visited rows only (NaN elsewhere), or all of them
    passed in by the caller: the same run, bit for bit."""
    train, heldout = world_pairs(12, seed=13), world_pairs(4, seed=14)
    config = DPOConfig(steps=2, batch_size=4, learning_rate=1e-3, warmup_steps=1, eval_every=0, checkpoint_every=0)
    rows = used_rows(len(train), config)
    assert len(rows) == 8
    lazy_chosen, lazy_rejected = reference_logps_for_rows(base_model, tokenizer, train, rows)
    assert torch.isnan(lazy_chosen).sum() == 4 and not torch.isnan(lazy_chosen[rows]).any()
    full = precompute_reference_logps(base_model, tokenizer, train)
    torch.testing.assert_close(lazy_chosen[rows], full[0][rows], atol=1e-4, rtol=1e-5)

    lazy_policy, lazy_history = train_dpo(
        copy.deepcopy(base_model), copy.deepcopy(base_model), tokenizer, train, heldout, config, progress=False
    )
    given_policy, given_history = train_dpo(
        copy.deepcopy(base_model),
        copy.deepcopy(base_model),
        tokenizer,
        train,
        heldout,
        config,
        progress=False,
        reference_logps=full,
        heldout_reference_logps=precompute_reference_logps(base_model, tokenizer, heldout),
    )
    assert [h["loss"] for h in lazy_history[1:]] == pytest.approx([h["loss"] for h in given_history[1:]], abs=1e-5)
    for (name, tensor), other in zip(lazy_policy.state_dict().items(), given_policy.state_dict().values()):
        torch.testing.assert_close(tensor, other, atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="aligned"):
        train_dpo(
            copy.deepcopy(base_model),
            copy.deepcopy(base_model),
            tokenizer,
            train,
            heldout,
            config,
            progress=False,
            reference_logps=(full[0][:5], full[1][:5]),
        )
