"""LoRA policies through peft (``rlhf_core.lora``): adapters are all that trains, pi_ref is the policy with
its adapters off (the base model's numbers exactly, no second copy), merged saves read by plain
transformers, checkpoints that resume, the memory counts (``rlhf_core.memory``) against plain formulas,
the ``--lora`` command line, the configs' LoRA defaults, and the gpt2-medium / gpt2-large profiles on
reduced-depth stand-ins of their real width and vocabulary."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

from rlhf_core import lora, stages, world
from rlhf_core.__main__ import main
from rlhf_core.config import get_profile
from rlhf_core.dpo import DPOConfig, precompute_reference_logps, train_dpo
from rlhf_core.errors import CourseError
from rlhf_core.generation import generate
from rlhf_core.grpo import CriticFreeConfig
from rlhf_core.grpo_trainer import CriticFreeTrainer
from rlhf_core.logprobs import response_logprobs
from rlhf_core.memory import (
    counted_four_model_loop,
    four_model_memory,
    measure_four_model_loop,
    memory_markdown,
    memory_table,
)
from rlhf_core.models import load_causal_lm, load_reward_model, save_reward_model
from rlhf_core.reward_model import (
    RewardModelConfig,
    encode_for_scoring,
    reward_model_from_policy,
    score_batch,
    train_reward_model,
)
from rlhf_core.rlhf import PPOConfig, ValueModel
from rlhf_core.rlhf_trainer import PPOTrainer
from rlhf_core.sft import SFTConfig, train_sft
from rlhf_core.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).parent / "gpu"))
from standins import build_gpt2_standin  # noqa: E402

RANK = 8


@pytest.fixture(scope="module")
def base(tiny_profile):
    """The shipped tiny base model (it writes EOS): never changed, every test wraps a copy."""
    return load_causal_lm(tiny_profile.base_model)


@pytest.fixture(scope="module")
def prompts():
    return [review.prompt for review in world.sample_reviews(16, seed=3)]


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(before: dict, model) -> set[str]:
    return {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}


def adapter_names(model) -> set[str]:
    return {name for name, _ in model.named_parameters() if "lora_" in name}


def tiny_ppo_config(**changes) -> PPOConfig:
    settings = dict(
        iterations=2,
        prompts_per_iteration=8,
        minibatch_size=4,
        ppo_epochs=1,
        max_new_tokens=8,
        lora_rank=RANK,
        policy_learning_rate=3e-3,
        value_learning_rate=1e-2,
        sample_every=0,
        checkpoint_every=1,
    )
    return PPOConfig(**{**settings, **changes})


def random_reward_model(base):
    torch.manual_seed(0)  # the reward model's random head: the same in every trainer of a test
    return reward_model_from_policy(base)


def lora_ppo_trainer(base, tokenizer, prompts, config: PPOConfig) -> PPOTrainer:
    """The four models as ``stages.build_ppo_trainer`` builds them under LoRA."""
    policy = lora.add_lora(copy.deepcopy(base), RANK)
    if config.shared_value_trunk:
        value_model, reward_model, score_fn = ValueModel.on_policy_trunk(policy), random_reward_model(base), score_batch
    else:
        value_model, reward_model = lora.value_and_reward_models(random_reward_model(base), RANK)
        score_fn = lora.adapters_off_score(score_batch)
    return PPOTrainer(
        policy, lora.AdapterOffReference(policy), reward_model, value_model, tokenizer, prompts, config, score_fn
    )


# ----- the adapters and the reference --------------------------------------------------------------
def test_add_lora_adapts_the_attention_and_starts_as_the_model_it_wraps(base):
    policy = lora.add_lora(copy.deepcopy(base), RANK)
    config = base.config
    d = config.n_embd
    # per block: c_attn (d -> 3d) and attn.c_proj (d -> d), each r * (d_in + d_out): the plain count
    expected = config.n_layer * RANK * ((d + 3 * d) + (d + d))
    trainable = [name for name, p in policy.named_parameters() if p.requires_grad]
    assert set(trainable) == adapter_names(policy) and len(trainable) == 4 * config.n_layer
    assert sum(p.numel() for p in lora.lora_parameters(policy)) == expected
    assert lora.is_lora(policy) and not lora.is_lora(base)
    ids = torch.randint(base.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():  # B = 0: the LoRA model is the model it wraps
        assert torch.equal(
            policy(input_ids=ids, attention_mask=mask).logits, base(input_ids=ids, attention_mask=mask).logits
        )
    again = lora.add_lora(copy.deepcopy(base), RANK)  # the adapters' random A comes from the seed
    assert all(torch.equal(a, b) for a, b in zip(lora.lora_parameters(policy), lora.lora_parameters(again)))
    with pytest.raises(CourseError, match="rank=0"):
        lora.add_lora(copy.deepcopy(base), 0)
    with pytest.raises(CourseError, match="already has LoRA"):
        lora.add_lora(policy, RANK)


def test_the_reference_is_the_base_model_and_holds_nothing_of_its_own(base, tokenizer, prompts):
    policy = lora.add_lora(copy.deepcopy(base), RANK)
    reference = lora.AdapterOffReference(policy)
    assert list(reference.parameters()) == [] and reference.state_dict() == {} and list(reference.children()) == []
    policy.train()
    reference.eval().requires_grad_(False).to("cpu")  # what the trainers do to a reference
    assert policy.training and all(p.requires_grad for p in lora.lora_parameters(policy))
    assert reference.config is policy.config and reference.device == torch.device("cpu")
    batch = generate(base, tokenizer, prompts, 12, generator=torch.Generator().manual_seed(0))
    sampled = (batch.input_ids, batch.attention_mask, batch.response_mask)
    with torch.no_grad():
        expected = response_logprobs(base, *sampled)
        assert torch.equal(response_logprobs(reference, *sampled), expected)
        for parameter in lora.lora_parameters(policy):  # the adapters move: the policy changes, pi_ref not
            parameter.add_(0.05 * torch.randn_like(parameter))
        assert not torch.allclose(response_logprobs(policy, *sampled), expected, atol=1e-3)
        assert torch.equal(response_logprobs(reference, *sampled), expected)
    assert not response_logprobs(reference, *sampled).requires_grad  # pi_ref is frozen, whatever the caller
    with pytest.raises(CourseError, match="needs a LoRA policy"):
        lora.AdapterOffReference(base)


def test_a_merged_save_loads_in_plain_transformers_with_the_same_logits(base, tmp_path):
    policy = lora.add_lora(copy.deepcopy(base), RANK)
    with torch.no_grad():
        for parameter in lora.lora_parameters(policy):
            parameter.add_(0.02 * torch.randn_like(parameter))
    lora.save_model(policy, tmp_path / "merged")
    files = {path.name for path in (tmp_path / "merged").iterdir()}
    assert {"config.json", "model.safetensors"} <= files and not any("adapter" in name for name in files)
    plain = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()  # no peft involved
    assert not lora.is_lora(plain) and type(plain) is GPT2LMHeadModel
    ids = torch.randint(base.config.vocab_size, (4, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = policy(input_ids=ids, attention_mask=mask).logits
        assert not torch.allclose(expected, base(input_ids=ids, attention_mask=mask).logits, atol=1e-3)
        assert torch.allclose(plain(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5)
    assert lora.is_lora(policy)  # the merge happened on a copy: the policy still trains its adapters


# ----- each trainer with a LoRA policy ---------------------------------------------------------------
def test_a_lora_ppo_step_trains_the_adapters_only_and_neither_pi_ref_nor_the_reward_moves(base, tokenizer, prompts):
    trainer = lora_ppo_trainer(base, tokenizer, prompts, tiny_ppo_config())
    reward_model = random_reward_model(base)  # the same weights, never wrapped: what the scores must stay
    # the value model: adapters on the reward model's own trunk, a head that starts as its normalised score
    assert trainer.value_model.trunk is trainer.reward_model.model.transformer
    assert list(trainer.reward_model.parameters()) == []  # the reward model is that model, adapters off
    policy_before, value_before = snapshot(trainer.policy), snapshot(trainer.value_model)
    batch = generate(base, tokenizer, prompts, 12, generator=torch.Generator().manual_seed(0))
    sampled = (batch.input_ids, batch.attention_mask, batch.response_mask)
    with torch.no_grad():
        base_logprobs = response_logprobs(base, *sampled)
        scores = score_batch(reward_model, batch.input_ids, batch.attention_mask)
        head = trainer.value_model.head  # gain 1, bias 0 before fit_normalization: the score itself
        assert torch.equal(head.weight, reward_model.score.weight) and float(head.bias) == 0.0
    trainer.step()
    assert changed(policy_before, trainer.policy) == adapter_names(trainer.policy)
    assert changed(value_before, trainer.value_model) == adapter_names(trainer.value_model) | {
        "head.weight",
        "head.bias",
    }
    with torch.no_grad():  # pi_ref and the reward model did not move while the policy and the value model trained
        assert torch.equal(response_logprobs(trainer.reference, *sampled), base_logprobs)
        assert not torch.allclose(response_logprobs(trainer.policy, *sampled), base_logprobs, atol=1e-4)
        assert torch.equal(trainer.score_fn(trainer.reward_model, batch.input_ids, batch.attention_mask), scores)


def test_the_value_head_can_sit_on_the_policys_lora_trunk_instead(base, tokenizer, prompts):
    trainer = lora_ppo_trainer(base, tokenizer, prompts, tiny_ppo_config(shared_value_trunk=True))
    assert trainer.value_model.trunk is trainer.policy.transformer
    value_before = snapshot(trainer.value_model)
    trainer.step()
    assert {name for name in changed(value_before, trainer.value_model) if "lora_" not in name} == {
        "head.weight",
        "head.bias",
    }


def test_an_interrupted_lora_ppo_run_resumes_to_the_same_adapters(base, tokenizer, prompts, tmp_path):
    config = tiny_ppo_config()
    whole = lora_ppo_trainer(base, tokenizer, prompts, config)
    whole.train(progress=False)
    first = lora_ppo_trainer(base, tokenizer, prompts, config)
    first.train(checkpoint_dir=tmp_path, progress=False, stop_after_iterations=1)
    saved = {path.name for path in tmp_path.iterdir()}
    assert lora.ADAPTER_FILE in saved and "model.safetensors" not in saved  # the adapters only
    state = torch.load(tmp_path / "training_state.pt", weights_only=True)
    # the value model's adapters and head; its frozen trunk is the reward model's, already on disk
    assert set(state["extra"]["value_model"]) == adapter_names(first.value_model) | {"head.weight", "head.bias"}
    resumed = lora_ppo_trainer(base, tokenizer, prompts, config)
    resumed.train(checkpoint_dir=tmp_path, progress=False)
    assert resumed.iteration == whole.iteration == 2
    for a, b in zip(lora.lora_parameters(resumed.policy), lora.lora_parameters(whole.policy)):
        assert torch.equal(a, b)
    assert torch.equal(resumed.value_model.head.weight, whole.value_model.head.weight)
    assert [r["gold"] for r in resumed.history] == [r["gold"] for r in whole.history]


def test_a_lora_critic_free_step_trains_the_adapters_only(base, tokenizer, prompts):
    policy = lora.add_lora(copy.deepcopy(base), RANK)
    config = CriticFreeConfig(
        iterations=1, prompts_per_iteration=4, group_size=2, minibatch_size=4, ppo_epochs=1, max_new_tokens=8
    )
    trainer = CriticFreeTrainer(
        policy,
        lora.AdapterOffReference(policy),
        reward_model_from_policy(base),
        tokenizer,
        prompts,
        config,
        score_batch,
    )
    before = snapshot(policy)
    record = trainer.step()
    assert changed(before, policy) == adapter_names(policy)
    assert record["kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollout: pi = pi_ref with adapters at B = 0
    assert len(trainer.state.optimizer.param_groups[0]["params"]) == len(adapter_names(policy))


def preference_records(prompts) -> list[dict]:
    return [
        {
            "prompt": p,
            "chosen": " A wonderful film.",
            "rejected": " A dull film, boring.",
            "chosen_ended": True,
            "rejected_ended": True,
        }
        for p in prompts
    ]


def test_lora_dpo_steps_train_the_adapters_against_the_base_models_log_probs(base, tokenizer, prompts):
    policy = lora.add_lora(copy.deepcopy(base), RANK)
    reference = lora.AdapterOffReference(policy)
    records = preference_records(prompts)
    expected = precompute_reference_logps(base, tokenizer, records, 8)
    computed = precompute_reference_logps(reference, tokenizer, records, 8)
    assert all(torch.equal(a, b) for a, b in zip(computed, expected))
    before = snapshot(policy)
    config = DPOConfig(
        steps=3, batch_size=4, warmup_steps=1, eval_every=0, checkpoint_every=0, lora_rank=RANK, learning_rate=2e-3
    )
    _, history = train_dpo(policy, reference, tokenizer, records[:12], records[12:], config, progress=False)
    assert changed(before, policy) == adapter_names(policy)
    assert history[-1]["heldout_reward_margin"] > 0  # the chosen response gained on pi_ref
    again = precompute_reference_logps(reference, tokenizer, records, 8)
    assert all(torch.equal(a, b) for a, b in zip(again, expected))


def test_lora_sft_trains_the_adapters_and_saves_a_plain_model(base, tokenizer, prompts, tmp_path):
    model = lora.add_lora(copy.deepcopy(base), RANK)
    records = [{"prompt": p, "response": " The film was great and I loved it."} for p in prompts]
    before = snapshot(model)
    config = SFTConfig(
        steps=3, batch_size=4, warmup_steps=1, heldout_records=4, eval_every=0, lora_rank=RANK, learning_rate=1e-2
    )
    model, history = train_sft(model, tokenizer, records, config, out_dir=tmp_path, progress=False)
    assert changed(before, model) == adapter_names(model)
    assert history[-1]["heldout_loss"] < history[0]["heldout_loss"]
    saved = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert not any("adapter" in path.name for path in tmp_path.iterdir())
    ids = torch.tensor([tokenizer(prompts[0] + " The film was great")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(saved(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_a_lora_reward_model_trains_adapters_and_head_resumes_and_saves_a_plain_model(
    base, tokenizer, prompts, tmp_path
):
    records = [
        {
            "prompt": prompt,
            "chosen": " I loved it, a wonderful film.",
            "rejected": " Dull, and far too long.",
            "chosen_gold": 1.0,
            "rejected_gold": -1.0,
        }
        for prompt in prompts
    ]
    train, heldout = records[:12], records[12:]
    config = RewardModelConfig(
        steps=4, batch_size=4, learning_rate=1e-2, warmup_steps=1, eval_every=0, checkpoint_every=2, lora_rank=RANK
    )

    def fresh():  # the surgery, then adapters on the trunk and the fresh head trained in full
        return lora.add_lora(random_reward_model(base), RANK, trainable_modules=("score",))

    model = fresh()
    before = snapshot(model)
    model, history = train_reward_model(model, tokenizer, train, heldout, config, progress=False)
    head = {name for name in before if "modules_to_save" in name}  # peft's trained copy of the head
    assert head and changed(before, model) == adapter_names(model) | head  # the trunk's weights never move
    assert history[-1]["heldout_loss"] < history[0]["heldout_loss"]

    # interrupted after 2 steps: the checkpoint holds the adapters and the head, and resuming ends where
    # the uninterrupted run ended
    train_reward_model(fresh(), tokenizer, train, heldout, config, progress=False, out_dir=tmp_path, stop_after_steps=2)
    resumed, _ = train_reward_model(fresh(), tokenizer, train, heldout, config, progress=False, out_dir=tmp_path)
    expected = model.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in resumed.state_dict().items())

    # merged and saved: a plain GPT2ForSequenceClassification with the same scores
    merged = lora.merged_copy(model)
    assert type(merged) is GPT2ForSequenceClassification
    save_reward_model(merged, tmp_path / "saved", tokenizer)
    loaded = load_reward_model(tmp_path / "saved")
    batch = encode_for_scoring(tokenizer, prompts[:4], [" I loved it.", " Dull.", " Fine.", " Long and dull."])
    with torch.no_grad():
        scores = score_batch(model, batch.input_ids, batch.attention_mask)
        assert torch.allclose(score_batch(loaded, batch.input_ids, batch.attention_mask), scores, atol=1e-5)
        assert not torch.allclose(score_batch(random_reward_model(base), batch.input_ids, batch.attention_mask), scores)


def test_the_stages_train_lora_sft_and_reward_model_and_build_lora_ppo_from_them(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path))
    full = get_profile("tiny", quick=True)
    profile = full.with_overrides(lora_rank=RANK)
    assert stages.sft_dir(profile) != stages.sft_dir(full)  # the config holds the rank: never one cache folder
    entry = stages.ensure_sft(profile, progress=False)
    assert entry.config["lora_rank"] == RANK
    assert not any("adapter" in path.name for path in entry.folder.iterdir())
    sft_model = GPT2LMHeadModel.from_pretrained(entry.folder)  # the merged SFT model, plain
    # a LoRA reward model when asked (tiny's default stays full: RewardModelConfig.for_profile), merged when saved
    reward_entry = stages.ensure_reward_model(
        profile, config=RewardModelConfig.for_profile(profile, lora_rank=RANK), progress=False
    )
    assert reward_entry.config["lora_rank"] == RANK
    assert not any("adapter" in path.name for path in reward_entry.folder.iterdir())
    assert type(GPT2ForSequenceClassification.from_pretrained(reward_entry.folder)) is GPT2ForSequenceClassification
    trainer = stages.build_ppo_trainer(profile, progress=False)
    assert trainer.config.lora_rank == RANK and not trainer.config.shared_value_trunk
    assert isinstance(trainer.reference, lora.AdapterOffReference) and trainer.reference.policy is trainer.policy
    assert isinstance(trainer.reward_model, lora.AdapterOffReference)  # and the value model's adapters on it
    assert trainer.value_model.trunk is trainer.reward_model.model.transformer
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(trainer.reference(input_ids=ids).logits, sft_model(input_ids=ids).logits)


# ----- the configs -----------------------------------------------------------------------------------
def test_every_trainer_config_takes_the_profiles_rank_and_a_lora_learning_rate():
    full, tiny = get_profile("tiny"), get_profile("tiny").with_overrides(lora_rank=RANK)
    pairs = [  # (config, its learning rate, LoRA's scale of it): 10x; PPO's a third of that (rlhf.LORA_PPO_SCALE)
        (SFTConfig, "learning_rate", 10),
        (PPOConfig, "policy_learning_rate", 10 / 3),
        (DPOConfig, "learning_rate", 10),
        (CriticFreeConfig, "learning_rate", 10 / 3),  # PPO's policy learning rate: one frontier
    ]
    for config_class, rate, scale in pairs:
        with_lora, without = config_class.for_profile(tiny), config_class.for_profile(full)
        assert (with_lora.lora_rank, without.lora_rank) == (RANK, 0)
        assert getattr(with_lora, rate) == pytest.approx(scale * getattr(without, rate))
        assert config_class.for_profile(full, lora_rank=4).lora_rank == 4  # an override wins
        assert getattr(config_class.for_profile(full, lora_rank=4), rate) == pytest.approx(getattr(with_lora, rate))
    # the reward model: LoRA on the hub profiles; on tiny only when asked (a LoRA reward model stays at chance there)
    medium = get_profile("gpt2-medium")
    assert RewardModelConfig.for_profile(tiny).lora_rank == 0
    assert RewardModelConfig.for_profile(medium).lora_rank == RANK
    assert RewardModelConfig.for_profile(medium).learning_rate == pytest.approx(
        10 * RewardModelConfig.for_profile(medium, lora_rank=0).learning_rate
    )
    assert RewardModelConfig.for_profile(full, lora_rank=4).lora_rank == 4
    lora_ppo, full_ppo = PPOConfig.for_profile(tiny), PPOConfig.for_profile(full)
    assert lora_ppo.value_learning_rate == pytest.approx(10 / 3 * full_ppo.value_learning_rate)
    assert not lora_ppo.shared_value_trunk  # the value model: adapters on the reward model's weights
    assert full_ppo.length_sorted_minibatches and not lora_ppo.length_sorted_minibatches  # see PPOConfig.for_profile


# ----- memory ----------------------------------------------------------------------------------------
def test_the_four_model_loop_holds_about_10_models_in_full_and_at_most_2_2_with_lora(base):
    """Measured on real models after a real step, against the plain formula of the module docstring."""
    d, W = base.config.n_embd, sum(p.numel() for p in base.parameters())  # noqa: N806 (one model's weights)
    A = base.config.n_layer * RANK * ((d + 3 * d) + (d + d))  # noqa: N806 (the adapters)
    head, score = d + 1, d  # the value head (with bias) and the reward model's score (without)
    full = measure_four_model_loop("tiny", 0)
    lora_loop = measure_four_model_loop("tiny", RANK)
    # full: 4 models (the value model: the reward model's trunk + a head), 2 trained, 2 moments each
    full_expected = (4 * W + score + head) + (2 * W + head) + 2 * (2 * W + head)
    # LoRA: the base (also pi_ref), the reward model, the policy's adapters, the value model's adapters
    # (on the reward model's trunk: the same shapes) and its head; those train, with 2 moments each
    lora_expected = (2 * W + score + 2 * A + head) + (2 * A + head) + 2 * (2 * A + head)
    # the alternative: a head on the policy's trunk, no adapters of the value model's own
    shared_expected = (2 * W + score + A + head) + (A + head) + 2 * (A + head)
    assert full.multiple == pytest.approx(full_expected / W, rel=1e-4)
    assert lora_loop.multiple == pytest.approx(lora_expected / W, rel=1e-4)
    assert 9.9 < full.multiple < 10.1 and lora_loop.multiple <= 2.2
    assert lora_loop.by_model["reference"] == {"parameters": 0, "gradients": 0, "optimizer_state": 0}
    for measured in (full, lora_loop):  # the count from shapes on the meta device agrees
        counted = counted_four_model_loop("tiny", measured.lora_rank)
        assert counted.multiple == pytest.approx(measured.multiple, rel=1e-4)
    assert four_model_memory("tiny", RANK) == pytest.approx(lora_expected / W, rel=1e-6)
    shared = counted_four_model_loop("tiny", RANK, shared_value_trunk=True)
    assert shared.multiple == pytest.approx(shared_expected / W, rel=1e-6) and shared.multiple < lora_loop.multiple


def test_the_memory_table_of_the_hub_shapes_is_counted_without_weights():
    rows = {row["profile"]: row for row in memory_table()}
    assert [rows[name]["parameters"] for name in ("gpt2", "gpt2-medium", "gpt2-large")] == [
        124_439_808,  # the hub models' published sizes
        354_823_168,
        774_030_080,
    ]
    for row in rows.values():
        assert row["full_multiple"] == pytest.approx(10.0, abs=0.01) and row["lora_multiple"] < 2.05
        assert row["full_fp32_gib"] == pytest.approx(row["parameters"] * 4 * row["full_multiple"] / 2**30, abs=0.01)
        assert row["lora_bf16_gib"] == pytest.approx(row["lora_fp32_gib"] / 2, abs=0.01)
        assert row["lora_fp32_fits_t4"] and row["lora_bf16_fits_t4"]
        for label in ("full_fp32", "full_bf16", "lora_fp32", "lora_bf16"):
            assert row[f"{label}_fits_t4"] == (row[f"{label}_gib"] <= 15)
    assert rows["gpt2-medium"]["full_fp32_fits_t4"] and not rows["gpt2-large"]["full_fp32_fits_t4"]
    assert memory_markdown(list(rows.values())).count("\n") == 4


# ----- the command line ------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", ["0", "-3"])
def test_a_bad_lora_rank_is_one_line_and_exit_status_2(rank, capsys, tmp_path):
    assert main(["run", "--lora-rank", rank, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith(f"--lora-rank {rank}:") and "--lora-rank 8" in error
    assert not (tmp_path / "out").exists()  # checked before any stage ran


# ----- gpt2-medium and gpt2-large, on reduced-depth stand-ins of their width and vocabulary -----------
HUB_SHAPES = {"gpt2-medium": (1024, 16), "gpt2-large": (1280, 20)}
VARIABLES = {"gpt2-medium": "RLHF_GPT2_MEDIUM_MODEL", "gpt2-large": "RLHF_GPT2_LARGE_MODEL"}


@pytest.fixture(scope="module")
def hub_standins(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hub_standins")
    return {
        name: build_gpt2_standin(folder / name, n_layer=1, n_embd=width, n_head=heads, vocab_size=50257, n_positions=64)
        for name, (width, heads) in HUB_SHAPES.items()
    }


@pytest.mark.parametrize("name", list(HUB_SHAPES))
def test_the_bigger_hub_profiles_run_lora_ppo_and_dpo_steps_on_their_stand_ins(name, hub_standins, monkeypatch):
    for variable in ("RLHF_GPT2_MODEL", *VARIABLES.values()):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv(VARIABLES[name], str(hub_standins[name]))
    profile = get_profile(name)
    width, heads = HUB_SHAPES[name]
    assert (profile.n_embd, profile.n_head, profile.vocab_size, profile.n_layer) == (width, heads, 50257, 1)
    assert profile.base_model == str(hub_standins[name]) and profile.lora_rank == RANK
    assert get_profile("gpt2").base_model == "gpt2"  # each profile reads its own variable only
    ppo_config = PPOConfig.for_profile(profile)
    assert ppo_config.lora_rank == RANK and not ppo_config.shared_value_trunk
    assert ppo_config.policy_learning_rate == pytest.approx(10 / 3 * PPOConfig.for_profile("gpt2").policy_learning_rate)

    tokenizer = load_tokenizer(profile.tokenizer)
    base = load_causal_lm(profile.base_model)
    prompts = [review.prompt for review in world.sample_reviews(8, seed=5)]
    config = tiny_ppo_config(  # two updates: B moves in the first (it starts at 0, so A has no gradient), A then
        iterations=1, prompts_per_iteration=4, ppo_epochs=2, policy_learning_rate=ppo_config.policy_learning_rate
    )
    trainer = lora_ppo_trainer(base, tokenizer, prompts, config)
    before = snapshot(trainer.policy)
    trainer.step()
    assert changed(before, trainer.policy) == adapter_names(trainer.policy)

    policy = lora.add_lora(copy.deepcopy(base), RANK)
    records = preference_records(prompts)
    dpo_config = DPOConfig.for_profile(profile, steps=2, batch_size=2, warmup_steps=1, eval_every=0, checkpoint_every=0)
    assert dpo_config.lora_rank == RANK
    before = snapshot(policy)
    train_dpo(
        policy, lora.AdapterOffReference(policy), tokenizer, records[:4], records[4:6], dpo_config, progress=False
    )
    assert changed(before, policy) == adapter_names(policy)
    merged = lora.merged_copy(policy)
    assert type(merged) is GPT2LMHeadModel and merged.config.n_embd == width


def test_the_bigger_profiles_say_which_variable_is_wrong(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_GPT2_LARGE_MODEL", str(tmp_path))
    with pytest.raises(CourseError, match=f"RLHF_GPT2_LARGE_MODEL={tmp_path}: no config.json there"):
        get_profile("gpt2-large")
    monkeypatch.delenv("RLHF_GPT2_MEDIUM_MODEL", raising=False)
    medium = get_profile("gpt2-medium")
    assert (medium.base_model, medium.n_embd, medium.n_layer, medium.lora_rank) == ("gpt2-medium", 1024, 24, RANK)
