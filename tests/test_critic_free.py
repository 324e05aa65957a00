"""The critic-free loop (GRPO, Dr. GRPO, RLOO): the loss aggregations and the KL term against plain
per-token formulas, each step of one iteration, the trainer's three models, resume and Ctrl-C, the
config's validation and published defaults."""

from __future__ import annotations

import copy
import math
import os
import signal
from dataclasses import fields

import pytest
import torch
import torch.nn as nn
from transformers import GPT2Config, GPT2ForSequenceClassification

from rlhf_core import world
from rlhf_core.batching import last_token_index, position_ids_from_mask
from rlhf_core.critic_cost import GradientMoments, policy_gradient, training_memory
from rlhf_core.errors import CourseError
from rlhf_core.generation import generate
from rlhf_core.grpo import (
    METHOD_DEFAULTS,
    CriticFreeConfig,
    critic_free_iteration,
    critic_free_loss,
    group_advantages,
    repeat_prompts,
    score,
    sequence_rewards,
    token_weights,
)
from rlhf_core.grpo_trainer import CriticFreeTrainer
from rlhf_core.iteration_loop import seconds_per_iteration
from rlhf_core.logprobs import response_logprobs
from rlhf_core.models import load_causal_lm
from rlhf_core.rlhf import PPOConfig, ValueModel


def last_token_score(reward_model, input_ids, attention_mask):
    """A plain reward head read at the last real token (the reward-model module has its own)."""
    hidden = reward_model.transformer(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
    ).last_hidden_state
    last = last_token_index(attention_mask)
    return reward_model.score(hidden[torch.arange(len(last)), last]).squeeze(-1)


@pytest.fixture(scope="module")
def base_model(tiny_profile):
    return load_causal_lm(tiny_profile.base_model)


@pytest.fixture
def three_models(base_model, tokenizer):
    """Policy and reference from the shipped base model (it writes EOS), a random reward head."""
    policy = copy.deepcopy(base_model)
    reference = copy.deepcopy(base_model).requires_grad_(False)
    config = GPT2Config(
        **{
            k: v
            for k, v in base_model.config.to_dict().items()
            if k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "eos_token_id", "bos_token_id")
        },
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(1)
    reward_model = GPT2ForSequenceClassification(config).eval()
    return policy, reference, reward_model


def _trainer(three_models, tokenizer, **overrides) -> CriticFreeTrainer:
    policy, reference, reward_model = (copy.deepcopy(m) for m in three_models)
    settings = dict(
        iterations=4,
        prompts_per_iteration=3,
        group_size=2,
        minibatch_size=3,
        ppo_epochs=2,
        max_new_tokens=6,
        checkpoint_every=1,
        sample_every=1,
        seed=5,
    )
    config = CriticFreeConfig(**{**settings, **overrides})
    return CriticFreeTrainer(
        policy, reference, reward_model, tokenizer, world.sample_prompts(30, seed=4), config, last_token_score
    )


# ----- the loss: aggregations and the KL term, against plain per-token loops -------------------------
def random_minibatch(seed: int = 0):
    """Log-probs of 4 responses of lengths 5, 1, 3 and 7 in 8 columns (left and right padding), advantages
    constant per response; garbage on padding, which must change nothing."""
    generator = torch.Generator().manual_seed(seed)
    B, T = 4, 8
    mask = torch.zeros(B, T)
    for row, (start, length) in enumerate([(0, 5), (4, 1), (2, 3), (1, 7)]):
        mask[row, start : start + length] = 1.0
    old_logprobs = -torch.rand(B, T, generator=generator, dtype=torch.float64) * 3 - 0.1
    # large moves on some tokens so that clipping acts on both sides
    logprobs = old_logprobs + torch.randn(B, T, generator=generator, dtype=torch.float64) * 0.4
    ref_logprobs = old_logprobs + torch.randn(B, T, generator=generator, dtype=torch.float64) * 0.5
    advantages = torch.tensor([1.5, -0.7, 0.3, -2.0], dtype=torch.float64)[:, None] * mask
    for tensor in (old_logprobs, logprobs, ref_logprobs):
        tensor[mask == 0] = 0.0  # log-probs are 0 outside the response, as the course computes them
    advantages[mask == 0] = float("nan")  # padding must never leak into the loss
    return logprobs.requires_grad_(True), old_logprobs, ref_logprobs, advantages, mask


def plain_loss(
    logprobs, old_logprobs, ref_logprobs, advantages, mask, aggregation, max_new_tokens, clip_range, kl_coef, kl_in
):
    """One token at a time: PPO's clipped term (and the k3 KL) with the aggregation written out."""
    B, T = mask.shape
    rows = []
    for i in range(B):
        terms, kls = [], []
        for t in range(T):
            if mask[i, t] == 0:
                continue
            ratio = torch.exp(logprobs[i, t] - old_logprobs[i, t])
            clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
            terms.append(torch.maximum(-advantages[i, t] * ratio, -advantages[i, t] * clipped))
            log_r = ref_logprobs[i, t] - logprobs[i, t]
            kls.append(torch.exp(log_r) - 1 - log_r)
        rows.append((torch.stack(terms), torch.stack(kls)))
    n_tokens = sum(len(terms) for terms, _ in rows)

    def aggregate(index):
        if aggregation == "token":  # sum over all tokens / their number
            return sum(row[index].sum() for row in rows) / n_tokens
        if aggregation == "sequence":  # mean over responses of each response's token mean
            return sum(row[index].mean() for row in rows) / B
        return sum(row[index].sum() for row in rows) / (B * max_new_tokens)  # constant normaliser

    loss = aggregate(0)
    if kl_in == "loss":
        loss = loss + kl_coef * aggregate(1)
    return loss


@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
@pytest.mark.parametrize("kl_in", ["reward", "loss"])
def test_loss_aggregations_match_plain_per_token_formulas(aggregation, kl_in):
    logprobs, old_logprobs, ref_logprobs, advantages, mask = random_minibatch()
    config = CriticFreeConfig(loss_aggregation=aggregation, kl_in=kl_in, kl_coef=0.3, clip_range=0.2, max_new_tokens=10)
    loss, stats = critic_free_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, config)
    (gradient,) = torch.autograd.grad(loss, logprobs)
    plain_logprobs = logprobs.detach().clone().requires_grad_(True)
    expected = plain_loss(
        plain_logprobs, old_logprobs, ref_logprobs, advantages, mask, aggregation, 10, 0.2, 0.3, kl_in
    )
    (expected_gradient,) = torch.autograd.grad(expected, plain_logprobs)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-12, atol=1e-12)
    ratio = torch.exp(logprobs - old_logprobs).detach()
    assert 0 < stats["clipfrac"] < 1  # the example exercises clipping
    assert stats["clipfrac"] == pytest.approx(float(((ratio - 1).abs() > 0.2)[mask > 0].double().mean()))


def test_the_aggregations_differ_and_weigh_tokens_as_documented():
    mask = torch.tensor([[1.0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])  # lengths 4, 2, 1: N = 7, B = 3
    token = token_weights(mask, "token", 8)
    sequence = token_weights(mask, "sequence", 8)
    constant = token_weights(mask, "constant", 8)
    assert torch.allclose(token[mask > 0], torch.full((7,), 1 / 7))
    assert torch.allclose(sequence.sum(-1), torch.full((3,), 1 / 3))  # each response weighs 1 / B
    assert torch.allclose(sequence[2, 3], torch.tensor(1 / 3)) and torch.allclose(sequence[0, 0], torch.tensor(1 / 12))
    assert torch.allclose(constant[mask > 0], torch.full((7,), 1 / 24))
    for weights in (token, sequence, constant):
        assert (weights[mask == 0] == 0).all()
    with pytest.raises(CourseError, match="unknown loss_aggregation 'mean'"):
        token_weights(mask, "mean", 8)


def test_the_kl_term_is_beta_times_the_weighted_k3_estimate():
    logprobs, old_logprobs, ref_logprobs, advantages, mask = random_minibatch(seed=3)
    for aggregation in ("token", "sequence", "constant"):
        in_loss = CriticFreeConfig(loss_aggregation=aggregation, kl_in="loss", kl_coef=0.25, max_new_tokens=10)
        in_reward = CriticFreeConfig(loss_aggregation=aggregation, kl_in="reward", kl_coef=0.25, max_new_tokens=10)
        with_kl, stats = critic_free_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, in_loss)
        without_kl, _ = critic_free_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, in_reward)
        log_r = ref_logprobs - logprobs.detach()
        k3 = torch.exp(log_r) - 1 - log_r  # pi_ref / pi - 1 - log(pi_ref / pi), Schulman's k3
        weights = token_weights(mask, aggregation, 10)
        expected = (k3 * weights)[mask > 0].sum()
        torch.testing.assert_close(stats["kl_loss"], expected)
        torch.testing.assert_close(with_kl - without_kl, 0.25 * expected)


def test_sequence_rewards_subtract_the_summed_kl_only_when_it_is_in_the_reward():
    scores = torch.tensor([1.0, -0.5])
    kl = torch.tensor([[0.1, 0.2, 0.0], [0.5, -0.1, 0.3]])
    torch.testing.assert_close(sequence_rewards(scores, kl, 0.5, "reward"), torch.tensor([1.0 - 0.15, -0.5 - 0.35]))
    torch.testing.assert_close(sequence_rewards(scores, kl, 0.5, "loss"), scores)


# ----- one iteration ---------------------------------------------------------------------------------
def test_repeat_prompts_puts_each_prompts_samples_on_consecutive_rows():
    assert repeat_prompts(["a", "b", "c"], 2) == ["a", "a", "b", "b", "c", "c"]


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "rloo"])
def test_the_iteration_is_its_steps_in_order(three_models, tokenizer, method):
    """With no update epochs the weights stay put, so the rollout an iteration used can be rebuilt from
    its steps; every token of a response carries that response's group advantage, padding carries 0."""
    trainer = _trainer(
        three_models, tokenizer, ppo_epochs=0, method=method, max_new_tokens=32, **METHOD_DEFAULTS[method]
    )
    prompts = world.sample_prompts(3, seed=11)
    record, data = critic_free_iteration(trainer.models, prompts, trainer.config, trainer.state)
    config = trainer.config
    resampled = generate(
        trainer.policy,
        tokenizer,
        repeat_prompts(prompts, 2),
        config.max_new_tokens,
        config.temperature,
        torch.Generator().manual_seed(config.seed + 1),
    )
    assert torch.equal(resampled.input_ids, data.batch.input_ids)
    assert data.batch.prompts == [prompts[0], prompts[0], prompts[1], prompts[1], prompts[2], prompts[2]]
    scores = score(trainer.models, data.batch, config)
    for name in ("logprobs", "ref_logprobs", "reward_model_scores", "penalised_scores"):
        assert torch.equal(getattr(scores, name), getattr(data, name)), name
    mask = data.batch.response_mask.float()
    kl = (scores.logprobs - scores.ref_logprobs) * mask
    torch.testing.assert_close(data.kl, kl)
    rewards = sequence_rewards(scores.penalised_scores, kl, config.kl_coef, config.kl_in)
    assert torch.equal(data.rewards, rewards)
    advantages = group_advantages(rewards, 2, method)  # (B,)
    assert len(set(data.batch.response_lengths.tolist())) > 1  # responses of different lengths
    for row in range(len(data.batch)):
        real = mask[row] > 0
        assert torch.equal(data.advantages[row][real], advantages[row].expand(int(real.sum())))
        assert (data.advantages[row][~real] == 0).all()
    assert record["iteration"] == trainer.iteration == 1
    assert record["advantage_std"] == pytest.approx(float(advantages.std()))


def test_one_iteration_logs_every_metric_and_trains_only_the_policy(three_models, tokenizer):
    trainer = _trainer(three_models, tokenizer, kl_in="loss")
    frozen_before = [copy.deepcopy(m.state_dict()) for m in (trainer.reference, trainer.reward_model)]
    policy_before = copy.deepcopy(trainer.policy.state_dict())
    record = trainer.step()
    for key in (
        "iteration",
        "reward_model_score",
        "penalised_score",
        "gold",
        "kl",
        "kl_coef",
        "length",
        "eos_fraction",
        "policy_loss",
        "clipfrac",
        "approx_kl",
        "entropy",
        "advantage_std",
        "kl_loss",
        "seconds_generate",
        "seconds_score",
        "seconds_train",
    ):
        assert key in record, key
    for model, before in zip((trainer.reference, trainer.reward_model), frozen_before):
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert any(not torch.equal(v, trainer.policy.state_dict()[k]) for k, v in policy_before.items())
    assert trainer.samples and {"response", "gold", "advantage"} <= set(trainer.samples[0])
    assert "kl_loss" not in _trainer(three_models, tokenizer, kl_in="reward").step()  # only where it applies


def test_the_trainer_holds_three_models_and_trains_one(three_models, tokenizer):
    trainer = _trainer(three_models, tokenizer)
    modules = [f.name for f in fields(trainer) if isinstance(getattr(trainer, f.name), nn.Module)]
    assert modules == ["policy", "reference", "reward_model"]
    assert not any(isinstance(getattr(trainer, name), ValueModel) for name in modules)
    optimised = {id(p) for group in trainer.state.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in trainer.policy.parameters()}
    assert not any(p.requires_grad for p in trainer.reference.parameters())
    assert not any(p.requires_grad for p in trainer.reward_model.parameters())


# ----- the trainer: resume, Ctrl-C -----------------------------------------------------------------
def assert_same_run(a: CriticFreeTrainer, b: CriticFreeTrainer) -> None:
    assert b.iteration == a.iteration
    assert [h["penalised_score"] for h in b.history] == [h["penalised_score"] for h in a.history]
    assert [h["policy_loss"] for h in b.history] == [h["policy_loss"] for h in a.history]
    assert b.samples == a.samples
    for name, tensor in a.policy.state_dict().items():
        assert torch.equal(tensor, b.policy.state_dict()[name]), name


def test_interrupted_training_resumes_bit_for_bit(three_models, tokenizer, tmp_path):
    straight = _trainer(three_models, tokenizer)
    straight.train(progress=False)
    interrupted = _trainer(three_models, tokenizer)
    interrupted.train(iterations=2, checkpoint_dir=tmp_path / "run", progress=False)
    torch.manual_seed(999)  # a new process: different global random state
    resumed = _trainer(three_models, tokenizer)
    resumed.train(checkpoint_dir=tmp_path / "run", progress=False)
    assert resumed.iteration == 4
    assert_same_run(straight, resumed)
    other = _trainer(three_models, tokenizer, kl_coef=0.2)
    with pytest.raises(CourseError, match="another config.*kl_coef"):
        other.train(checkpoint_dir=tmp_path / "run", progress=False)
    fresh = _trainer(three_models, tokenizer)
    fresh.train(iterations=1, checkpoint_dir=tmp_path / "run", resume=False, progress=False)
    assert fresh.iteration == 1 and len(fresh.history) == 1  # resume=False starts over


def test_ctrl_c_finishes_the_iteration_saves_and_says_where_to_resume(three_models, tokenizer, tmp_path, capsys):
    straight = _trainer(three_models, tokenizer)
    straight.train(progress=False)
    folder = tmp_path / "run"
    interrupted = _trainer(three_models, tokenizer, checkpoint_every=0)

    def score_and_press_ctrl_c_in_iteration_2(reward_model, input_ids, attention_mask):
        if interrupted.iteration == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return last_token_score(reward_model, input_ids, attention_mask)

    interrupted.score_fn = score_and_press_ctrl_c_in_iteration_2
    with pytest.raises(KeyboardInterrupt):
        interrupted.train(checkpoint_dir=folder, progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert interrupted.iteration == 2
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"interrupted at iteration 2, the next run resumes from {folder}"
    )
    resumed = _trainer(three_models, tokenizer, checkpoint_every=0)
    resumed.train(checkpoint_dir=folder, progress=False)
    assert_same_run(straight, resumed)


# ----- the config -----------------------------------------------------------------------------------
def test_for_profile_gives_each_methods_published_choices_on_ppos_budget(tiny_profile):
    ppo = PPOConfig.for_profile(tiny_profile)
    expected = {"grpo": ("loss", "sequence"), "dr_grpo": ("loss", "constant"), "rloo": ("reward", "token")}
    for method, (kl_in, aggregation) in expected.items():
        config = CriticFreeConfig.for_profile(tiny_profile, method=method)
        assert (config.method, config.kl_in, config.loss_aggregation) == (method, kl_in, aggregation)
        assert config.prompts_per_iteration * config.group_size == ppo.prompts_per_iteration == 64
        assert (config.prompts_per_iteration, config.group_size) == (16, 4)
        assert (config.iterations, config.learning_rate, config.kl_coef, config.max_new_tokens) == (
            ppo.iterations,
            ppo.policy_learning_rate,
            ppo.kl_coef,
            ppo.max_new_tokens,
        )
    assert CriticFreeConfig.for_profile(tiny_profile, method="rloo", kl_in="loss").kl_in == "loss"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "ppo"}, "method='ppo' is unknown"),
        ({"kl_in": "value"}, "kl_in='value' is unknown"),
        ({"loss_aggregation": "mean"}, "loss_aggregation='mean' is unknown"),
        ({"group_size": 1}, "group_size=1.*at least 2 samples per prompt"),
        ({"minibatch_size": 0}, "minibatch_size=0 must be at least 1"),
        ({"kl_coef": -0.1}, "kl_coef=-0.1 must not be negative"),
        ({"clip_range": 0.0}, "clip_range=0.0 must be positive"),
    ],
)
def test_bad_configs_raise_a_course_error(tiny_profile, overrides, message):
    with pytest.raises(CourseError, match=message):
        CriticFreeConfig(**overrides)
    method = {"method": overrides.pop("method")} if "method" in overrides else {}
    with pytest.raises(CourseError, match=message):
        CriticFreeConfig.for_profile(tiny_profile, **method, **overrides)


def test_unknown_overrides_are_named(tiny_profile):
    with pytest.raises(TypeError, match="no field 'kl_in_loss'"):
        CriticFreeConfig.for_profile(tiny_profile, kl_in_loss=True)


# ----- the measurements of chapter 08 ---------------------------------------------------------------
def test_policy_gradient_is_the_gradient_of_the_first_clipped_step(three_models, tokenizer):
    policy = three_models[0]
    batch = generate(policy, tokenizer, world.sample_prompts(4, seed=2), 6, 1.0, torch.Generator().manual_seed(0))
    mask = batch.response_mask.float()
    advantages = torch.tensor([1.0, -0.5, 0.25, 2.0])[:, None] * mask
    gradient = policy_gradient(policy, batch, advantages, temperature=1.0)
    assert all(p.grad is None for p in policy.parameters())
    config = CriticFreeConfig(loss_aggregation="token", kl_in="reward")
    logprobs = response_logprobs(policy, batch.input_ids, batch.attention_mask, batch.response_mask)
    loss, _ = critic_free_loss(logprobs, logprobs.detach(), logprobs.detach(), advantages, mask, config)
    loss.backward()
    expected = torch.cat([p.grad.reshape(-1) for p in policy.parameters()])
    torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-7)


def test_gradient_moments_match_numpy_style_statistics():
    gradients = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.7
    moments = GradientMoments()
    for g in gradients:
        moments.add(g)
    mean = gradients.mean(0)
    noise = float(((gradients - mean) ** 2).sum(1).sum() / 5)  # trace of the unbiased covariance
    assert moments.noise == pytest.approx(noise)
    assert moments.signal == pytest.approx(float(mean @ mean) - noise / 6)
    assert moments.signal_to_noise == pytest.approx((float(mean @ mean) - noise / 6) / noise)


def test_training_memory_counts_parameters_gradients_and_adam_state_once(three_models):
    policy, reference, reward_model = three_models
    value_model = ValueModel.on_policy_trunk(policy)  # shares the policy's transformer
    optimizer = torch.optim.AdamW(list(policy.parameters()) + list(value_model.head.parameters()))
    loss = (
        policy(input_ids=torch.tensor([[1, 2, 3]])).logits.sum()
        + value_model(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long)).sum()
    )
    loss.backward()
    optimizer.step()
    memory = training_memory({"policy": policy, "reference": reference, "value": value_model}, optimizer)
    policy_bytes = sum(p.numel() * 4 for p in policy.parameters())
    head_bytes = sum(p.numel() * 4 for p in value_model.head.parameters())
    assert memory["policy"]["parameters"] == memory["policy"]["gradients"] == policy_bytes
    assert memory["policy"]["optimizer_state"] == 2 * policy_bytes + 4 * len(list(policy.parameters()))  # + step
    assert memory["reference"] == {"parameters": policy_bytes, "gradients": 0, "optimizer_state": 0}
    assert memory["value"]["parameters"] == head_bytes  # the shared trunk counted once, with the policy


def test_bf16_autocast_runs_an_iteration_with_float32_losses(three_models, tokenizer):
    """The mixed-precision path (``rlhf_core.precision``), tried on the CPU's bfloat16 autocast: the loop
    runs, and what it accumulates (log-probs, losses) stays float32 and finite."""
    trainer = _trainer(three_models, tokenizer)
    trainer.precision = "bf16"
    trainer.__post_init__()  # rebuild the state with the new precision
    record = trainer.step()
    assert trainer.state.precision == "bf16"
    assert all(math.isfinite(record[name]) for name in ("policy_loss", "kl", "entropy", "reward_model_score"))


def test_seconds_per_iteration_is_the_mean_of_the_three_phases():
    history = [
        {"iteration": 1, "seconds_generate": 0.5, "seconds_score": 0.25, "seconds_train": 1.0, "gold": 0.3},
        {"iteration": 2, "seconds_generate": 0.25, "seconds_score": 0.5, "seconds_train": 2.0, "gold": 0.4},
    ]
    assert seconds_per_iteration(history) == pytest.approx((1.75 + 2.75) / 2)
    assert seconds_per_iteration([]) is None
