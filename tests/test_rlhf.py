"""The four-model PPO loop: rewards, KL, score placement, temperature, padding, resume, NaN guard."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from rlhf_core import world
from rlhf_core.batching import last_token_index, pack
from rlhf_core.generation import Generation, generate
from rlhf_core.logprobs import forward_logits, token_logprobs_from_logits
from rlhf_core.models import load_causal_lm
from rlhf_core.rlhf import (PPOConfig, PPOTrainer, ValueModel, compute_rewards, per_token_kl, score_rollout)
from rlhf_core.reward_model import normalization, score_batch
from rlhf_core.training import NonFiniteLossError


def last_token_score(reward_model, input_ids, attention_mask):
    """A plain reward head read at the last real token (the reward-model module has its own)."""
    from rlhf_core.batching import position_ids_from_mask
    hidden = reward_model.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                      position_ids=position_ids_from_mask(attention_mask)).last_hidden_state
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
    config = GPT2Config(**{k: v for k, v in base_model.config.to_dict().items()
                           if k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "eos_token_id",
                                    "bos_token_id")}, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(1)
    reward_model = GPT2ForSequenceClassification(config).eval()
    return policy, reference, reward_model, ValueModel.from_reward_model(reward_model)


def test_per_token_kl_estimators():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5]])
    assert torch.allclose(per_token_kl(logprobs, ref_logprobs, "k1"), torch.tensor([[0.5, -1.0, 0.0]]))
    k3 = per_token_kl(logprobs, ref_logprobs, "k3")
    expected = [(r - 1) - torch.log(torch.tensor(r)).item() for r in
                [torch.exp(torch.tensor(-0.5)).item(), torch.exp(torch.tensor(1.0)).item(), 1.0]]
    assert torch.allclose(k3, torch.tensor([expected]), atol=1e-6) and torch.all(k3 >= 0)
    with pytest.raises(ValueError):
        per_token_kl(logprobs, ref_logprobs, "k9")


def test_rewards_on_a_hand_built_example():
    # two rows, left-padded prompt of width 2, responses of length 3 and 1 (then padding)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    response_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]]).float()
    kl = torch.tensor([[9.0, 9.0, 0.2, -0.1, 0.4], [9.0, 9.0, 1.0, 9.0, 9.0]]) * response_mask
    rewards = compute_rewards(torch.tensor([2.0, -1.0]), kl, 0.5, attention_mask, response_mask)
    assert torch.allclose(rewards, torch.tensor([[0.0, 0.0, -0.1, 0.05, -0.2 + 2.0],
                                                 [0.0, 0.0, -0.5 - 1.0, 0.0, 0.0]]))


def test_score_lands_on_the_last_real_token_for_every_length(four_models, any_tokenizer):
    policy, reference, reward_model, value_model = four_models
    prompts = world.sample_prompts(6, seed=0)
    batch = generate(policy, any_tokenizer, prompts, max_new_tokens=40, generator=torch.Generator().manual_seed(0))
    assert len(set(batch.response_lengths.tolist())) > 2  # really different lengths
    data = score_rollout(batch, policy, reference, reward_model, value_model, last_token_score,
                         PPOConfig(kl_coef=0.0), kl_coef=0.0)
    last = last_token_index(batch.attention_mask)
    for row in range(len(prompts)):
        nonzero = torch.nonzero(data.rewards[row]).flatten().tolist()
        assert nonzero == [last[row].item()]
        assert data.rewards[row, last[row]] == pytest.approx(data.scores[row].item())
        assert batch.response_mask[row, last[row]] == 1


def test_missing_eos_is_penalised(four_models, tokenizer):
    policy, reference, reward_model, value_model = four_models
    batch = generate(policy, tokenizer, world.sample_prompts(8, seed=1), max_new_tokens=3,
                     generator=torch.Generator().manual_seed(0))
    assert not batch.ended.all()
    plain = last_token_score(reward_model, batch.input_ids, batch.attention_mask)
    data = score_rollout(batch, policy, reference, reward_model, value_model, last_token_score,
                         PPOConfig(missing_eos_penalty=1.5), kl_coef=0.1)
    assert torch.allclose(data.scores, plain - 1.5 * (~batch.ended).float(), atol=1e-6)


def test_sampling_temperature_matches_the_logprob_temperature(base_model, tokenizer):
    """Tokens drawn at temperature tau follow softmax(logits / tau): the distribution whose
    log-probs PPO uses. Checked on the first response token of one prompt, 8000 draws."""
    temperature, draws = 1.6, 8000
    prompt = world.sample_prompts(1, seed=2)[0]
    batch = generate(base_model, tokenizer, [prompt] * draws, max_new_tokens=1, temperature=temperature,
                     generator=torch.Generator().manual_seed(0))
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
    policy, reference, reward_model, value_model = four_models
    prompts = world.sample_prompts(5, seed=3)
    generated = generate(policy, any_tokenizer, prompts, 8, generator=torch.Generator().manual_seed(1))
    # the same sequences laid out right-padded, with one extra column of padding
    rows = [generated.input_ids[i][generated.attention_mask[i].bool()].tolist() for i in range(5)]
    prompt_lengths = [int((generated.attention_mask[i] - generated.response_mask[i]).sum()) for i in range(5)]
    right = pack([r[:p] for r, p in zip(rows, prompt_lengths)], [r[p:] + [] for r, p in zip(rows, prompt_lengths)],
                 any_tokenizer.pad_token_id, padding_side="right")
    pad_column = torch.full((5, 1), any_tokenizer.pad_token_id)
    relaid = Generation(torch.cat([right.input_ids, pad_column], 1), torch.cat([right.attention_mask, 0 * pad_column], 1),
                        torch.cat([right.response_mask, 0 * pad_column], 1), ended=generated.ended,
                        prompts=generated.prompts, responses=generated.responses)
    config = PPOConfig(kl_coef=0.1)
    a = score_rollout(generated, policy, reference, reward_model, value_model, last_token_score, config, 0.1)
    b = score_rollout(relaid, policy, reference, reward_model, value_model, last_token_score, config, 0.1)
    assert torch.allclose(a.scores, b.scores, atol=1e-5)
    for name in ("logprobs", "ref_logprobs", "values", "kl", "rewards", "advantages", "returns"):
        for row in range(5):
            left_values = getattr(a, name)[row][generated.response_mask[row].bool()]
            right_values = getattr(b, name)[row][relaid.response_mask[row].bool()]
            assert torch.allclose(left_values, right_values, atol=1e-5), name


def test_immediate_eos_is_a_valid_response(four_models, tokenizer):
    policy, reference, reward_model, value_model = four_models
    eos = tokenizer.eos_token_id
    batch = pack([[5, 6, 7], [8, 9]], [[eos], [10, 11, eos]], tokenizer.pad_token_id, padding_side="left")
    empty = Generation(batch.input_ids, batch.attention_mask, batch.response_mask, ended=torch.tensor([True, True]),
                       prompts=["a", "b"], responses=["", " x"])
    data = score_rollout(empty, policy, reference, reward_model, value_model, last_token_score, PPOConfig(), 0.1)
    assert torch.isfinite(data.advantages).all() and torch.isfinite(data.returns).all()
    assert data.rewards[0].nonzero().flatten().tolist() == [batch.input_ids.shape[1] - 1]


def _trainer(four_models, tokenizer, **overrides):
    policy, reference, reward_model, value_model = (copy.deepcopy(m) for m in four_models)
    config = PPOConfig(iterations=4, prompts_per_iteration=6, minibatch_size=3, ppo_epochs=2, max_new_tokens=6,
                       checkpoint_every=1, sample_every=1, seed=5, **overrides)
    return PPOTrainer(policy, reference, reward_model, value_model, tokenizer, world.sample_prompts(30, seed=4),
                      config, last_token_score)


def test_one_iteration_logs_every_metric_and_moves_only_the_trained_models(four_models, tokenizer):
    trainer = _trainer(four_models, tokenizer)
    reference_before = copy.deepcopy(trainer.reference.state_dict())
    policy_before = copy.deepcopy(trainer.policy.state_dict())
    record = trainer.step()
    for key in ("reward", "gold", "kl", "kl_coef", "entropy", "length", "eos_fraction", "clipfrac", "approx_kl",
                "value_loss", "policy_loss", "explained_variance", "seconds_generate", "seconds_score", "seconds_train"):
        assert key in record, key
    assert all(torch.equal(v, trainer.reference.state_dict()[k]) for k, v in reference_before.items())
    assert any(not torch.equal(v, trainer.policy.state_dict()[k]) for k, v in policy_before.items())
    assert trainer.samples and "response" in trainer.samples[0]


def test_adaptive_kl_coefficient_moves(four_models, tokenizer):
    trainer = _trainer(four_models, tokenizer, adaptive_kl=True, kl_target=1e-6, kl_horizon=10)
    before = trainer.kl_controller.value
    trainer.step()
    assert trainer.kl_controller.value != before


def test_interrupted_training_resumes_to_the_same_result(four_models, tokenizer, tmp_path):
    straight = _trainer(four_models, tokenizer)
    straight.train(progress=False)
    interrupted = _trainer(four_models, tokenizer)
    interrupted.train(checkpoint_dir=tmp_path / "run", progress=False, stop_after_iterations=2)
    torch.manual_seed(999)  # a new process: different global random state
    resumed = _trainer(four_models, tokenizer)
    resumed.train(checkpoint_dir=tmp_path / "run", progress=False)
    assert resumed.iteration == 4
    assert [h["reward"] for h in resumed.history] == [h["reward"] for h in straight.history]
    for name, tensor in straight.policy.state_dict().items():
        assert torch.equal(tensor, resumed.policy.state_dict()[name]), name
    for name, tensor in straight.value_model.state_dict().items():
        assert torch.equal(tensor, resumed.value_model.state_dict()[name]), name


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


def test_load_or_train_ppo_trains_once_then_reads_the_cache(tiny_profile):
    import shutil

    from rlhf_core.rlhf import load_or_train_ppo, ppo_dir

    config = PPOConfig.for_profile(tiny_profile, iterations=2, prompts_per_iteration=8, minibatch_size=4, ppo_epochs=1,
                                   max_new_tokens=8, checkpoint_every=1, seed=123)
    folder = ppo_dir(tiny_profile, config)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        policy, history, samples = load_or_train_ppo(tiny_profile, config, device="cpu", progress=False)
        assert [record["iteration"] for record in history] == [1, 2]
        for name in ("ppo_summary.json", "history.csv", "history.json", "policy/model.safetensors"):
            assert (folder / name).exists(), name
        assert not (folder / "checkpoint").exists()
        cached, cached_history, _ = load_or_train_ppo(tiny_profile, config, device="cpu", progress=False)
        assert cached_history == history
        for name, tensor in policy.state_dict().items():
            assert torch.equal(tensor, cached.state_dict()[name]), name
        other = PPOConfig.for_profile(tiny_profile, **{**config.__dict__, "kl_coef": 0.2})
        assert ppo_dir(tiny_profile, other) != folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
