"""The four-model PPO loop: each step of one iteration, the iteration as those steps in order, the
fixes of the maths review, resume (also after Ctrl-C), the NaN guard."""

import copy
import os
import signal
from dataclasses import fields

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from rlhf_core import ppo, world
from rlhf_core.batching import last_token_index, pack, position_ids_from_mask
from rlhf_core.errors import CourseError
from rlhf_core.generation import Generation, generate
from rlhf_core.logprobs import forward_logits, token_logprobs_from_logits
from rlhf_core.models import load_causal_lm
from rlhf_core.reward_model import normalization, score_batch
from rlhf_core.rlhf import (
    PPOConfig,
    PPOModels,
    Rollout,
    ValueModel,
    compute_rewards,
    kl_controller,
    per_token_rewards,
    ppo_iteration,
    score,
    update_epochs,
    value_only_parameters,
)
from rlhf_core.rlhf_trainer import PPOTrainer
from rlhf_core.training import NonFiniteLossError


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
def four_models(base_model, tokenizer):
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
    return policy, reference, reward_model, ValueModel.from_reward_model(reward_model)


def models_of(four_models, tokenizer) -> PPOModels:
    return PPOModels(*four_models, tokenizer, last_token_score)


def steps_2_to_4(models: PPOModels, batch: Generation, config: PPOConfig, kl_coef: float) -> Rollout:
    """Score, per-token rewards and advantages of a given batch, through the module's step functions."""
    mask = batch.response_mask.float()
    scores = score(models, batch, config)
    kl = ppo.kl_estimate(scores.logprobs, scores.ref_logprobs, config.kl_estimator) * mask
    rewards = per_token_rewards(scores.penalised_scores, kl, kl_coef, batch.attention_mask, mask)
    advantages, returns = ppo.gae(rewards, scores.values, mask, config.gamma, config.lam)
    advantages = ppo.masked_whiten(advantages, mask) if config.whiten_advantages else advantages
    return Rollout(**vars(scores), batch=batch, kl=kl, rewards=rewards, advantages=advantages, returns=returns)


TENSOR_FIELDS = [f.name for f in fields(Rollout) if f.name != "batch"]


# ----- the steps -----------------------------------------------------------------------------------
def test_rewards_on_a_hand_built_example():
    # two rows, left-padded prompt of width 2, responses of length 3 and 1 (then padding)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    response_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]]).float()
    kl = torch.tensor([[9.0, 9.0, 0.2, -0.1, 0.4], [9.0, 9.0, 1.0, 9.0, 9.0]]) * response_mask
    rewards = per_token_rewards(torch.tensor([2.0, -1.0]), kl, 0.5, attention_mask, response_mask)
    assert torch.allclose(rewards, torch.tensor([[0.0, 0.0, -0.1, 0.05, -0.2 + 2.0], [0.0, 0.0, -0.5 - 1.0, 0.0, 0.0]]))
    assert compute_rewards is per_token_rewards  # the name the exercise checkers use


def test_score_lands_on_the_last_real_token_for_every_length(four_models, any_tokenizer):
    models = models_of(four_models, any_tokenizer)
    prompts = world.sample_prompts(6, seed=0)
    batch = generate(
        models.policy, any_tokenizer, prompts, max_new_tokens=40, generator=torch.Generator().manual_seed(0)
    )
    assert len(set(batch.response_lengths.tolist())) > 2  # really different lengths
    data = steps_2_to_4(models, batch, PPOConfig(kl_coef=0.0), kl_coef=0.0)
    last = last_token_index(batch.attention_mask)
    for row in range(len(prompts)):
        nonzero = torch.nonzero(data.rewards[row]).flatten().tolist()
        assert nonzero == [last[row].item()]
        assert data.rewards[row, last[row]] == pytest.approx(data.penalised_scores[row].item())
        assert batch.response_mask[row, last[row]] == 1


def test_missing_eos_is_penalised_and_both_scores_are_kept(four_models, tokenizer):
    models = models_of(four_models, tokenizer)
    batch = generate(
        models.policy,
        tokenizer,
        world.sample_prompts(8, seed=1),
        max_new_tokens=12,
        generator=torch.Generator().manual_seed(0),
    )
    assert not batch.ended.all() and batch.ended.any()
    plain = last_token_score(models.reward_model, batch.input_ids, batch.attention_mask)
    scores = score(models, batch, PPOConfig(missing_eos_penalty=1.5))
    assert torch.allclose(scores.reward_model_scores, plain, atol=1e-6)
    assert torch.allclose(scores.penalised_scores, plain - 1.5 * (~batch.ended).float(), atol=1e-6)


def test_sampling_temperature_matches_the_logprob_temperature(base_model, tokenizer):
    """Tokens drawn at temperature tau follow softmax(logits / tau): the distribution whose
    log-probs PPO uses. Checked on the first response token of one prompt, 8000 draws."""
    temperature, draws = 1.6, 8000
    prompt = world.sample_prompts(1, seed=2)[0]
    batch = generate(
        base_model,
        tokenizer,
        [prompt] * draws,
        max_new_tokens=1,
        temperature=temperature,
        generator=torch.Generator().manual_seed(0),
    )
    frequencies = torch.bincount(batch.input_ids[:, -1], minlength=len(tokenizer)).float() / draws
    with torch.no_grad():
        logits = forward_logits(base_model, batch.input_ids[:1], batch.attention_mask[:1])
    probabilities = torch.softmax(logits[0, -2] / temperature, -1)
    at_temperature_one = torch.softmax(logits[0, -2], -1)
    total_variation = 0.5 * (frequencies - probabilities).abs().sum()
    assert total_variation < 0.05
    assert 0.5 * (frequencies - at_temperature_one).abs().sum() > 3 * total_variation
    # and the log-prob function uses the same scaling
    logprobs = token_logprobs_from_logits(logits, batch.input_ids[:1], temperature)
    assert logprobs[0, -1] == pytest.approx(torch.log(probabilities[batch.input_ids[0, -1]]).item(), abs=1e-5)


def test_rollout_scoring_does_not_depend_on_padding(four_models, any_tokenizer):
    models = models_of(four_models, any_tokenizer)
    prompts = world.sample_prompts(5, seed=3)
    generated = generate(models.policy, any_tokenizer, prompts, 8, generator=torch.Generator().manual_seed(1))
    # the same sequences laid out right-padded, with one extra column of padding
    rows = [generated.input_ids[i][generated.attention_mask[i].bool()].tolist() for i in range(5)]
    prompt_lengths = [int((generated.attention_mask[i] - generated.response_mask[i]).sum()) for i in range(5)]
    right = pack(
        [r[:p] for r, p in zip(rows, prompt_lengths)],
        [r[p:] + [] for r, p in zip(rows, prompt_lengths)],
        any_tokenizer.pad_token_id,
        padding_side="right",
    )
    pad_column = torch.full((5, 1), any_tokenizer.pad_token_id)
    relaid = Generation(
        torch.cat([right.input_ids, pad_column], 1),
        torch.cat([right.attention_mask, 0 * pad_column], 1),
        torch.cat([right.response_mask, 0 * pad_column], 1),
        ended=generated.ended,
        prompts=generated.prompts,
        responses=generated.responses,
    )
    config = PPOConfig(kl_coef=0.1)
    a = steps_2_to_4(models, generated, config, 0.1)
    b = steps_2_to_4(models, relaid, config, 0.1)
    assert torch.allclose(a.reward_model_scores, b.reward_model_scores, atol=1e-5)
    assert torch.allclose(a.penalised_scores, b.penalised_scores, atol=1e-5)
    for name in ("logprobs", "ref_logprobs", "values", "kl", "rewards", "advantages", "returns"):
        for row in range(5):
            left_values = getattr(a, name)[row][generated.response_mask[row].bool()]
            right_values = getattr(b, name)[row][relaid.response_mask[row].bool()]
            assert torch.allclose(left_values, right_values, atol=1e-5), name


def test_immediate_eos_is_a_valid_response(four_models, tokenizer):
    eos = tokenizer.eos_token_id
    batch = pack([[5, 6, 7], [8, 9]], [[eos], [10, 11, eos]], tokenizer.pad_token_id, padding_side="left")
    empty = Generation(
        batch.input_ids,
        batch.attention_mask,
        batch.response_mask,
        ended=torch.tensor([True, True]),
        prompts=["a", "b"],
        responses=["", " x"],
    )
    data = steps_2_to_4(models_of(four_models, tokenizer), empty, PPOConfig(), 0.1)
    assert torch.isfinite(data.advantages).all() and torch.isfinite(data.returns).all()
    assert data.rewards[0].nonzero().flatten().tolist() == [batch.input_ids.shape[1] - 1]


# ----- one iteration ---------------------------------------------------------------------------------
def _trainer(four_models, tokenizer, **overrides):
    policy, reference, reward_model, value_model = (copy.deepcopy(m) for m in four_models)
    settings = dict(
        iterations=4,
        prompts_per_iteration=6,
        minibatch_size=3,
        ppo_epochs=2,
        max_new_tokens=6,
        checkpoint_every=1,
        sample_every=1,
        seed=5,
    )
    config = PPOConfig(**{**settings, **overrides})
    if config.shared_value_trunk:
        value_model = ValueModel.on_policy_trunk(policy)
    return PPOTrainer(
        policy,
        reference,
        reward_model,
        value_model,
        tokenizer,
        world.sample_prompts(30, seed=4),
        config,
        last_token_score,
    )


def test_ppo_iteration_is_its_steps_in_order(four_models, tokenizer):
    """With no update epochs the weights stay put, so the rollout an iteration used can be rebuilt
    from its steps: sampling with the state's generator, then steps 2-4."""
    trainer = _trainer(four_models, tokenizer, ppo_epochs=0)
    prompts = world.sample_prompts(6, seed=11)
    record, data = ppo_iteration(trainer.models, prompts, trainer.config, trainer.state)
    config = trainer.config
    resampled = generate(
        trainer.policy,
        tokenizer,
        prompts,
        config.max_new_tokens,
        config.temperature,
        torch.Generator().manual_seed(config.seed + 1),
    )
    assert torch.equal(resampled.input_ids, data.batch.input_ids)
    rebuilt = steps_2_to_4(trainer.models, data.batch, config, record["kl_coef"])
    for name in TENSOR_FIELDS:
        assert torch.equal(getattr(rebuilt, name), getattr(data, name)), name
    assert record["iteration"] == trainer.iteration == 1


def test_one_iteration_logs_every_metric_and_moves_only_the_trained_models(four_models, tokenizer):
    trainer = _trainer(four_models, tokenizer)
    reference_before = copy.deepcopy(trainer.reference.state_dict())
    policy_before = copy.deepcopy(trainer.policy.state_dict())
    record = trainer.step()
    for key in (
        "reward_model_score",
        "penalised_score",
        "gold",
        "kl",
        "kl_coef",
        "entropy",
        "length",
        "eos_fraction",
        "clipfrac",
        "approx_kl",
        "value_loss",
        "policy_loss",
        "vf_clipfrac",
        "explained_variance",
        "seconds_generate",
        "seconds_score",
        "seconds_train",
    ):
        assert key in record, key
    assert all(torch.equal(v, trainer.reference.state_dict()[k]) for k, v in reference_before.items())
    assert any(not torch.equal(v, trainer.policy.state_dict()[k]) for k, v in policy_before.items())
    assert trainer.samples and "response" in trainer.samples[0]


def test_logged_scores_say_which_one_is_penalised(four_models, tokenizer):
    """The reward model's score is logged apart from the missing-EOS-penalised score PPO maximises;
    the first is what measure_policy reports as ``reward``."""
    trainer = _trainer(four_models, tokenizer, max_new_tokens=24, missing_eos_penalty=1.5)
    prompts = world.sample_prompts(8, seed=1)
    record, data = ppo_iteration(trainer.models, prompts, trainer.config, trainer.state)
    batch = data.batch
    assert 0 < record["eos_fraction"] < 1
    plain = last_token_score(trainer.reward_model, batch.input_ids, batch.attention_mask).mean().item()
    assert record["reward_model_score"] == pytest.approx(plain, abs=1e-6)
    assert record["penalised_score"] == pytest.approx(plain - 1.5 * (1 - record["eos_fraction"]), abs=1e-6)
    assert "reward" not in record
    trainer.step()
    assert {"reward_model_score", "penalised_score", "gold"} <= set(trainer.samples[-1])


def test_adaptive_kl_coefficient_moves(four_models, tokenizer):
    trainer = _trainer(four_models, tokenizer, adaptive_kl=True, kl_target=1e-6, kl_horizon=10)
    before = trainer.state.kl_controller.value
    trainer.step()
    assert trainer.state.kl_controller.value != before


def test_adaptive_kl_defaults_act_within_a_run():
    """Ziegler et al.'s controller with the default horizon (10 iterations' samples: K_beta = 0.1)
    moves beta by far more than the 4% the old 10,000-sample horizon allowed in 30 iterations."""
    config = PPOConfig(adaptive_kl=True)
    assert kl_controller(config).horizon == 10 * config.prompts_per_iteration
    assert kl_controller(PPOConfig(adaptive_kl=True, prompts_per_iteration=16)).horizon == 160
    assert kl_controller(PPOConfig(adaptive_kl=True, kl_horizon=128)).horizon == 128
    assert isinstance(kl_controller(PPOConfig()), ppo.FixedKLController)
    high, low = kl_controller(config), kl_controller(config)
    for _ in range(30):
        high.update(2 * config.kl_target, config.prompts_per_iteration)  # error clipped to +0.2
        low.update(0.0, config.prompts_per_iteration)  # error -1 clipped to -0.2
    assert high.value == pytest.approx(config.kl_coef * (1 + 0.2 * 0.1) ** 30, rel=1e-12)
    assert low.value == pytest.approx(config.kl_coef * (1 - 0.2 * 0.1) ** 30, rel=1e-12)
    assert high.value > 1.5 * config.kl_coef and low.value < 0.6 * config.kl_coef


def test_ppo_config_for_profile_validates(tiny_profile, monkeypatch):
    monkeypatch.setenv("RLHF_PROFILE", "tiny")
    assert PPOConfig.for_profile() == PPOConfig.for_profile("tiny") == PPOConfig.for_profile(tiny_profile)
    gpt2 = PPOConfig.for_profile("gpt2", kl_coef=0.3)
    assert (gpt2.policy_learning_rate, gpt2.max_new_tokens, gpt2.kl_coef) == (1.41e-5, 48, 0.3)
    with pytest.raises(TypeError, match="kl_coeff"):
        PPOConfig.for_profile(tiny_profile, kl_coeff=0.1)
    with pytest.raises(CourseError, match="kl_estimator='k4'"):
        PPOConfig.for_profile(tiny_profile, kl_estimator="k4")
    with pytest.raises(CourseError, match="kl_horizon=0"):
        PPOConfig(kl_horizon=0)


# ----- fixes of the maths review -------------------------------------------------------------------
def test_value_model_from_a_frozen_reward_model_is_trainable(four_models, tokenizer):
    policy, reference, reward_model, _ = four_models
    frozen_reward_model = copy.deepcopy(reward_model).requires_grad_(False)
    value_model = ValueModel.from_reward_model(frozen_reward_model)
    assert all(p.requires_grad for p in value_model.parameters())
    assert not any(p.requires_grad for p in frozen_reward_model.parameters())  # the reward model stays frozen
    trainer = _trainer((policy, reference, frozen_reward_model, value_model), tokenizer)
    trunk_before = copy.deepcopy(trainer.value_model.trunk.state_dict())
    trainer.step()
    assert any(not torch.equal(v, trainer.value_model.trunk.state_dict()[k]) for k, v in trunk_before.items())
    with pytest.raises(CourseError, match="no trainable parameters"):
        _trainer((policy, reference, reward_model, copy.deepcopy(value_model).requires_grad_(False)), tokenizer)


def test_a_shared_value_trunk_is_clipped_once(four_models, tokenizer):
    """The policy's gradient (its trunk included) and the value head's are each clipped to
    max_grad_norm once: clipping the shared trunk again with the head would shrink its step."""
    policy, reference, reward_model, _ = (copy.deepcopy(m) for m in four_models)
    value_model = ValueModel.on_policy_trunk(policy)
    config = PPOConfig(
        prompts_per_iteration=6,
        minibatch_size=6,
        ppo_epochs=1,
        max_new_tokens=6,
        max_grad_norm=1e-3,
        shared_value_trunk=True,
        seed=5,
    )
    trainer = PPOTrainer(
        policy,
        reference,
        reward_model,
        value_model,
        tokenizer,
        world.sample_prompts(30, seed=4),
        config,
        last_token_score,
    )
    head = value_only_parameters(policy, value_model)
    assert [id(p) for p in head] == [id(value_model.head.weight), id(value_model.head.bias)]
    # a first iteration gives a rollout and a value head that is no longer zero (so the trunk gets value gradient)
    _, data = ppo_iteration(trainer.models, world.sample_prompts(6, seed=9), config, trainer.state)
    update_epochs(policy, value_model, trainer.state.optimizer, data, config, torch.Generator().manual_seed(0), 2)

    def gradient_norm(parameters) -> float:  # the gradients of the one minibatch step, as clipped
        return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in parameters if p.grad is not None)))

    assert gradient_norm(policy.parameters()) == pytest.approx(1e-3, rel=1e-4)
    assert gradient_norm(head) == pytest.approx(1e-3, rel=1e-4)
    assert value_model.head.weight.grad.abs().sum() > 0


def padded_rollout(data: Rollout, left: int, right: int, pad_id: int) -> Rollout:
    """The same rollout with ``left`` padding columns added before every row and ``right`` after."""

    def pad(tensor: torch.Tensor, value=0) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (left, right), value=value)

    batch = data.batch
    padded_batch = Generation(
        pad(batch.input_ids, pad_id),
        pad(batch.attention_mask),
        pad(batch.response_mask),
        prompt_width=batch.prompt_width + left,
        ended=batch.ended,
        prompts=batch.prompts,
        responses=batch.responses,
    )
    per_token = {name: pad(getattr(data, name)) for name in TENSOR_FIELDS if getattr(data, name).dim() == 2}
    per_row = {name: getattr(data, name) for name in TENSOR_FIELDS if getattr(data, name).dim() == 1}
    return Rollout(**per_token, **per_row, batch=padded_batch)


@pytest.mark.parametrize("length_sorted", [True, False])
def test_update_epochs_ignore_padding_columns(four_models, tokenizer, length_sorted):
    """Extra padding columns around a rollout leave the update unchanged: minibatches are cut to the
    columns they use (and positions come from the attention mask), whichever way rows are grouped."""
    config = PPOConfig(
        prompts_per_iteration=8,
        minibatch_size=3,
        ppo_epochs=2,
        max_new_tokens=40,
        length_sorted_minibatches=length_sorted,
    )
    trainer = _trainer(four_models, tokenizer, **vars(config))
    _, data = ppo_iteration(trainer.models, world.sample_prompts(8, seed=3), config, trainer.state)
    assert len(set(data.batch.response_lengths.tolist())) > 2  # ragged: rows need different columns
    updated = []
    for rollout in (data, padded_rollout(data, left=5, right=7, pad_id=tokenizer.pad_token_id)):
        policy, value_model = copy.deepcopy(trainer.policy), copy.deepcopy(trainer.value_model)
        optimizer = torch.optim.AdamW([*policy.parameters(), *value_model.parameters()], lr=1e-3)
        stats = update_epochs(policy, value_model, optimizer, rollout, config, torch.Generator().manual_seed(0), 2)
        updated.append((policy, value_model, stats))
    (policy_a, value_a, stats_a), (policy_b, value_b, stats_b) = updated
    for a, b in zip([*policy_a.parameters(), *value_a.parameters()], [*policy_b.parameters(), *value_b.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert stats_a["policy_loss"] == pytest.approx(stats_b["policy_loss"], abs=1e-5)
    moved = any(not torch.equal(a, b) for a, b in zip(policy_a.parameters(), trainer.policy.parameters()))
    assert moved  # the update did something


# ----- the trainer: resume, Ctrl-C, NaN ------------------------------------------------------------
def assert_same_run(a: PPOTrainer, b: PPOTrainer) -> None:
    assert b.iteration == a.iteration
    assert [h["penalised_score"] for h in b.history] == [h["penalised_score"] for h in a.history]
    assert b.samples == a.samples
    for name, tensor in a.policy.state_dict().items():
        assert torch.equal(tensor, b.policy.state_dict()[name]), name
    for name, tensor in a.value_model.state_dict().items():
        assert torch.equal(tensor, b.value_model.state_dict()[name]), name


@pytest.mark.parametrize(
    "settings",
    [{}, {"adaptive_kl": True, "kl_target": 0.5, "kl_horizon": 12}, {"shared_value_trunk": True}],
    ids=["default", "adaptive", "shared"],
)
def test_interrupted_training_resumes_to_the_same_result(four_models, tokenizer, tmp_path, settings):
    straight = _trainer(four_models, tokenizer, **settings)
    straight.train(progress=False)
    interrupted = _trainer(four_models, tokenizer, **settings)
    interrupted.train(checkpoint_dir=tmp_path / "run", progress=False, stop_after_iterations=2)
    torch.manual_seed(999)  # a new process: different global random state
    resumed = _trainer(four_models, tokenizer, **settings)
    resumed.train(checkpoint_dir=tmp_path / "run", progress=False)
    assert resumed.iteration == 4
    assert_same_run(straight, resumed)
    if settings.get("adaptive_kl"):
        assert resumed.state.kl_controller.value == straight.state.kl_controller.value != 0.05
        assert [h["kl_coef"] for h in resumed.history] == [h["kl_coef"] for h in straight.history]
    fresh = _trainer(four_models, tokenizer)
    fresh.train(iterations=1, checkpoint_dir=tmp_path / "run", resume=False, progress=False)
    assert fresh.iteration == 1 and len(fresh.history) == 1  # resume=False starts over


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_saves_whole_iterations_and_resumes_to_the_same_result(
    four_models, tokenizer, tmp_path, capsys, presses
):
    """Ctrl-C during iteration 2: one press finishes it, saves and re-raises; a second press stops
    at once and saves nothing, so the next run resumes from the last checkpoint (iteration 1)."""
    straight = _trainer(four_models, tokenizer)
    straight.train(progress=False)
    folder = tmp_path / "run"
    interrupted = _trainer(four_models, tokenizer, checkpoint_every=0 if presses == 1 else 1)

    def score_and_press_ctrl_c_in_iteration_2(reward_model, input_ids, attention_mask):
        if interrupted.iteration == 1:
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
        return last_token_score(reward_model, input_ids, attention_mask)

    interrupted.score_fn = score_and_press_ctrl_c_in_iteration_2
    with pytest.raises(KeyboardInterrupt):
        interrupted.train(checkpoint_dir=folder, progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the usual Ctrl-C is back
    line = capsys.readouterr().out.strip().splitlines()[-1]
    if presses == 1:
        assert interrupted.iteration == 2
        assert line == f"interrupted at iteration 2, the next run resumes from {folder}"
    else:
        assert line == (
            f"interrupted inside iteration 2, nothing saved: the next run resumes from the last checkpoint in {folder}"
        )
    resumed = _trainer(four_models, tokenizer)
    resumed.load(folder)
    assert resumed.iteration == (2 if presses == 1 else 1)
    resumed.train(checkpoint_dir=folder, progress=False)
    assert_same_run(straight, resumed)


def test_a_checkpoint_of_another_config_is_refused_in_one_line(four_models, tokenizer, tmp_path):
    _trainer(four_models, tokenizer).train(iterations=1, checkpoint_dir=tmp_path / "run", progress=False)
    other = _trainer(four_models, tokenizer, kl_coef=0.5, ppo_epochs=1)
    with pytest.raises(CourseError, match=r"another config \(kl_coef, ppo_epochs differ\)"):
        other.train(checkpoint_dir=tmp_path / "run", progress=False)
    saving_less_often = _trainer(four_models, tokenizer, checkpoint_every=2)  # bookkeeping only: it resumes
    saving_less_often.train(iterations=2, checkpoint_dir=tmp_path / "run", progress=False)
    assert saving_less_often.iteration == 2


def test_nan_anywhere_stops_the_run_naming_it(four_models, tokenizer):
    trainer = _trainer(four_models, tokenizer)
    trainer.score_fn = lambda rm, ids, mask: torch.full((ids.shape[0],), float("nan"))
    with pytest.raises(NonFiniteLossError, match="reward-model score is nan at iteration 1"):
        trainer.step()
    trainer = _trainer(four_models, tokenizer)
    with torch.no_grad():
        trainer.value_model.head.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match="loss is nan|loss is inf"):
        trainer.step()


# ----- the value model and measurement -------------------------------------------------------------
def test_shared_trunk_value_head(four_models, tokenizer):
    policy = four_models[0]
    value_model = ValueModel.on_policy_trunk(policy)
    assert value_model.trunk is policy.transformer
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(value_model(ids, torch.ones_like(ids)), torch.zeros(1, 3))


def test_value_model_starts_as_the_normalised_reward_model(four_models):
    reward_model = copy.deepcopy(four_models[2])
    reward_model.config.reward_gain, reward_model.config.reward_bias = 2.5, -0.75
    value_model = ValueModel.from_reward_model(reward_model)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    assert normalization(reward_model) == (2.5, -0.75)
    # the value before token t is the normalised reward model's reading of the prefix that ends at t - 1
    for end in range(1, ids.shape[1]):
        expected = score_batch(reward_model, ids[:, :end], mask[:, :end])  # (1,)
        assert torch.allclose(value_model(ids, mask)[0, end], expected[0], atol=1e-5)


def test_measure_policy_scores_the_sampled_tokens_three_ways(four_models, tokenizer):
    from rlhf_core.evaluation import measure_policy
    from rlhf_core.gold import gold_scores
    from rlhf_core.reward_model import score_texts

    policy, reference, reward_model, _ = four_models
    prompts = world.sample_prompts(12, seed=8)
    same = measure_policy(policy, policy, reward_model, tokenizer, prompts, max_new_tokens=12, seed=3, batch_size=5)
    assert same.kl == 0.0 and len(same.responses) == 12
    assert same.gold == pytest.approx(float(gold_scores(prompts, same.responses, same.ended).mean()))
    texts = score_texts(reward_model, tokenizer, prompts, same.responses, ended=same.ended)
    assert same.rewards == pytest.approx(texts, abs=1e-4)  # decoded text re-encodes to the sampled tokens
    torch.manual_seed(3)
    far = copy.deepcopy(reference)
    for parameter in far.parameters():
        parameter.data.add_(0.5 * torch.randn_like(parameter))
    moved = measure_policy(policy, far, reward_model, tokenizer, prompts, max_new_tokens=12, seed=3, batch_size=5)
    assert moved.responses == same.responses  # same seed, same policy: the same samples
    assert moved.kl > 1.0  # a sequence-level KL to a distant reference is large and positive
