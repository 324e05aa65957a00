"""`python -m rlhf_core bench`, the padding-free batches it measures, and pretraining's plateau stop."""

import copy
import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from rlhf_core.batching import (
    encode_pairs,
    length_buckets,
    length_sorted_minibatches,
    pack,
    per_row_in_buckets,
    used_columns,
)
from rlhf_core.bench import STAGES
from rlhf_core.bench_measure import flop_counter, measure_peak_flops
from rlhf_core.bench_trl import TRL_PPO_PYTHON, dpo_trainer, ppo_against_trl024, reward_model_trainer
from rlhf_core.config import REPO_DIR, get_profile
from rlhf_core.dpo import DPOConfig, encode_preference_batch, pair_logps
from rlhf_core.logprobs import sequence_logprobs
from rlhf_core.loop import batch_rows
from rlhf_core.pretrain import PretrainConfig, at_plateau, bucketed_language_model_loss, language_model_loss, pretrain
from rlhf_core.reward_model import RewardModelConfig, encode_for_scoring, reward_model_from_policy, train_reward_model
from rlhf_core.training import cosine_with_warmup
from rlhf_core.world import ReviewWorld


def world_pairs(n: int, seed: int) -> list[dict]:
    """Pairs of world responses of many lengths (long and short reviews of both moods)."""
    world = ReviewWorld(seed)
    return [
        {
            "prompt": world.prompt(),
            "chosen": world.response(0.8, n_sentences=1 + i % 6),
            "rejected": world.response(-0.8, n_sentences=1 + (i * 5) % 6),
        }
        for i in range(n)
    ]


def rounded(length: int, multiple: int = 8) -> int:
    return math.ceil(length / multiple) * multiple


# ----- the bench command -----------------------------------------------------------------------------
def test_bench_quick_writes_every_stage_with_a_fraction_of_the_peak(tmp_path):
    out = tmp_path / "bench.json"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RLHF_PROFILE": "tiny"}
    finished = subprocess.run(
        [sys.executable, "-m", "rlhf_core", "bench", "--quick", "--json", str(out)],
        cwd=REPO_DIR,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["device"] and results["peak_flops"] > 0 and "FlopCounterMode" in results["flops_counted_by"]
    assert set(results["stages"]) == set(STAGES) == {"sft", "reward_model", "dpo", "ppo", "grpo", "generation"}
    for name, stage in results["stages"].items():
        assert 0 < stage["seconds_min"] <= stage["seconds"] <= stage["seconds_max"], name
        assert 0 < stage["fraction_of_peak"] <= 1, name
        assert "trl_seconds" not in stage  # measured only with --against trl
    assert set(results["stages"]["ppo"]["phases"]) == {"generate", "score", "train"}
    assert results["stages"]["generation"]["tokens_per_second"] > 0
    assert results["stages"]["generation"]["transformers_ms_per_decode_step"] > 0
    assert "| dpo, s per optimizer step |" in finished.stdout


def test_bench_refuses_a_json_path_that_is_a_folder(tmp_path):
    finished = subprocess.run(
        [sys.executable, "-m", "rlhf_core", "bench", "--quick", "--json", str(tmp_path)],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert finished.returncode == 2
    assert finished.stderr.strip().count("\n") == 0 and "--json" in finished.stderr


def test_against_trl_without_trl_says_how_to_install_it():
    blocked = (
        "import sys; sys.modules['trl'] = None; from rlhf_core.__main__ import main; "
        "sys.exit(main(['bench', '--quick', '--against', 'trl']))"
    )  # as if TRL were not installed
    finished = subprocess.run(
        [sys.executable, "-c", blocked], cwd=REPO_DIR, capture_output=True, text=True, timeout=120
    )
    assert finished.returncode == 2
    assert finished.stderr.strip().count("\n") == 0 and 'pip install -e ".[bench]"' in finished.stderr


def test_ppo_against_trl_024_is_skipped_without_its_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(TRL_PPO_PYTHON, str(tmp_path / "no-such-python"))
    result = ppo_against_trl024(get_profile("tiny"), None)
    assert "skipped" in result and "bench_trl_ppo.py" in result["skipped"]


def test_flop_counter_counts_the_cpu_attention_kernel():
    """4 B H S L D FLOPs for softmax(Q K^T) V (two batched matmuls of 2 B H S L D each); plain
    FlopCounterMode does not know the CPU kernel and counts nothing."""
    batch, heads, length, dim = 2, 4, 16, 32
    q, k, v = (torch.randn(batch, heads, length, dim) for _ in range(3))
    plain = torch.utils.flop_counter.FlopCounterMode(display=False)
    with plain:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    counter = flop_counter()
    with counter:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert plain.get_total_flops() == 0
    assert counter.get_total_flops() == 4 * batch * heads * length * length * dim


def test_measured_peak_is_a_positive_rate():
    assert measure_peak_flops(torch.device("cpu"), torch.float32, 128, repeats=2) > 1e6


# ----- no work on padding ----------------------------------------------------------------------------
def test_length_buckets_group_rows_by_their_rounded_length():
    lengths = [3, 17, 8, 9, 40, 16, 1, 24, 25]
    buckets = length_buckets(lengths, 8)
    assert sorted(row for rows in buckets.values() for row in rows) == list(range(len(lengths)))
    assert list(buckets) == sorted(buckets)
    for width, rows in buckets.items():
        assert all(rounded(lengths[row]) == width for row in rows)
    assert buckets == {8: [0, 2, 6], 16: [3, 5], 24: [1, 7], 32: [8], 40: [4]}


def test_repacked_moves_real_tokens_left_whatever_the_padding():
    left = pack([[5, 6], [7]], [[8, 9, 11], [10]], pad_id=1, padding_side="left")
    repacked = left.repacked([1, 0], 8)
    assert repacked.input_ids.tolist() == [[7, 10, 0, 0, 0, 0, 0, 0], [5, 6, 8, 9, 11, 0, 0, 0]]
    assert repacked.attention_mask.tolist() == [[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert repacked.response_mask.tolist() == [[0, 1, 0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0]]
    assert left.repacked([0], 5).input_ids.tolist() == [[5, 6, 8, 9, 11]]  # narrower than the batch


@pytest.mark.parametrize("side", ["left", "right"])
def test_buckets_give_the_one_pass_log_probs_and_gradients(any_tokenizer, random_tiny_model, side):
    pairs = world_pairs(12, seed=3)
    batch = encode_pairs(any_tokenizer, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs], padding_side=side)
    model = copy.deepcopy(random_tiny_model)
    whole = sequence_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_mask)  # (B,)
    whole.sum().backward()
    whole_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    in_buckets = per_row_in_buckets(
        batch, lambda rows: sequence_logprobs(model, rows.input_ids, rows.attention_mask, rows.response_mask)
    )
    in_buckets.sum().backward()
    assert len(length_buckets(batch.attention_mask.sum(-1).tolist(), 8)) > 2  # really split
    torch.testing.assert_close(in_buckets, whole, atol=1e-4, rtol=1e-5)
    for grad, expected in zip((p.grad for p in model.parameters()), whole_grads):
        torch.testing.assert_close(grad, expected, atol=1e-4, rtol=1e-3)


def _widths_seen(module: torch.nn.Module) -> tuple[list[tuple[int, int]], object]:
    """The (rows, columns) of every batch ``module`` runs, and the hook's handle."""
    shapes: list[tuple[int, int]] = []

    def record(module, args, kwargs) -> None:
        shapes.append(tuple(kwargs["attention_mask"].shape))

    handle = module.register_forward_pre_hook(record, with_kwargs=True)
    return shapes, handle


def test_a_pair_is_not_padded_to_its_other_response_nor_to_the_longest_pair(tokenizer, random_tiny_model):
    pairs = world_pairs(16, seed=4)
    batch = encode_preference_batch(tokenizer, pairs)
    lengths = batch.attention_mask.sum(-1).tolist()
    shapes, handle = _widths_seen(random_tiny_model.transformer)
    with torch.no_grad():
        pair_logps(random_tiny_model, tokenizer, pairs)
    handle.remove()
    computed = sum(rows * columns for rows, columns in shapes)
    assert computed == sum(rounded(length) for length in lengths)  # each row at its own rounded length
    assert computed < 0.8 * batch.input_ids.numel()  # one (2B, T) batch: a fifth more, at least


def test_a_rows_log_prob_does_not_depend_on_the_rows_beside_it(tokenizer, random_tiny_model):
    """Bit for bit: the reference log-probs of a few pairs equal the same pairs' within many."""
    pairs = world_pairs(16, seed=5)
    short = [pairs[0], pairs[6]]  # one- and two-sentence responses
    few = encode_preference_batch(tokenizer, short).input_ids.shape[1]
    assert few < encode_preference_batch(tokenizer, pairs).input_ids.shape[1]  # one batch would be wider
    with torch.no_grad():
        alone = pair_logps(random_tiny_model, tokenizer, short)
        among = pair_logps(random_tiny_model, tokenizer, pairs)
    assert torch.equal(alone[0], among[0][[0, 6]]) and torch.equal(alone[1], among[1][[0, 6]])


def test_a_reward_model_step_runs_no_row_wider_than_it_needs(tokenizer, random_tiny_model):
    pairs = world_pairs(8, seed=6)
    reward_model = reward_model_from_policy(random_tiny_model)
    shapes, handle = _widths_seen(reward_model.transformer)
    config = RewardModelConfig(steps=1, batch_size=8, eval_every=0, checkpoint_every=0)
    train_reward_model(reward_model, tokenizer, pairs, [], config, progress=False)
    handle.remove()
    prompts = [p["prompt"] for p in pairs]
    batch = encode_for_scoring(
        tokenizer, prompts + prompts, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    )  # the step's 2n texts, padded to one width
    computed = sum(rows * columns for rows, columns in shapes)
    assert computed == sum(rounded(length) for length in batch.attention_mask.sum(-1).tolist())
    assert computed < 0.8 * batch.input_ids.numel()


def test_bucketed_language_model_loss_is_the_padded_batch_loss(tokenizer, random_tiny_model):
    texts = [ReviewWorld(7).review().prompt + ReviewWorld(i).review().response for i in range(10)]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    batch = pack(ids, [[] for _ in ids], tokenizer.pad_token_id)
    expected = language_model_loss(random_tiny_model, batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(bucketed_language_model_loss(random_tiny_model, batch), expected, atol=1e-5, rtol=1e-5)


# ----- pretraining stops at its plateau ---------------------------------------------------------------
def test_at_plateau_against_a_plain_rule():
    config = PretrainConfig(plateau_evaluations=2, plateau_min_improvement=0.01)

    def history(losses):
        return [{"step": 10 * i, "validation_loss": loss} for i, loss in enumerate(losses)]

    def plain(losses):  # no loss of the last two is 1% below the best before them
        return len(losses) > 2 and all(loss > 0.99 * min(losses[:-2]) for loss in losses[-2:])

    for losses in (
        [5.0, 3.0, 2.0, 1.99],
        [5.0, 2.0, 1.99, 1.985],
        [5.0, 2.0, 1.99, 1.97],
        [5.0, 2.0, 2.1, 2.2],
        [5.0],
        [5.0, 4.0],
    ):
        assert at_plateau(history(losses), config) == plain(losses), losses
    assert not at_plateau(history([5.0, 2.0, 2.1, 2.2]), PretrainConfig())  # 0: never stops early


RUN = PretrainConfig(
    steps=12,
    batch_size=8,
    learning_rate=3e-3,
    warmup_steps=2,
    n_train_reviews=400,
    n_validation_reviews=64,
    eval_every=4,
    checkpoint_every=0,
    seed=1,
)


def _same_weights(model, other) -> None:
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, other.state_dict()[name]), name


def test_pretraining_stops_at_the_plateau_with_the_weights_of_a_plain_run(tmp_path, tiny_profile, tokenizer):
    """Found at the first evaluation (an impossible 90% gain asked), with no cooldown: the weights a
    plain run has after 4 steps. A plateau never found: sliced to the end, bit for bit."""
    plain, _ = pretrain(tiny_profile, tmp_path / "plain", RUN, tokenizer=tokenizer, progress=False, stop_after_steps=4)
    stopped, summary = pretrain(
        tiny_profile,
        tmp_path / "stopped",
        replace(RUN, plateau_evaluations=1, plateau_min_improvement=0.9, plateau_cooldown=0.0),
        tokenizer=tokenizer,
        progress=False,
    )
    assert summary["finished"] and summary["plateau_step"] == 4 and summary["steps"] == 4
    assert (tmp_path / "stopped" / "model.safetensors").exists()
    _same_weights(stopped, plain)

    whole, _ = pretrain(tiny_profile, tmp_path / "whole", RUN, tokenizer=tokenizer, progress=False)
    sliced, summary = pretrain(
        tiny_profile,
        tmp_path / "sliced",
        replace(RUN, plateau_evaluations=1, plateau_min_improvement=-1.0),
        tokenizer=tokenizer,
        progress=False,
    )
    assert summary["steps"] == RUN.steps and summary["plateau_step"] is None
    assert [row["step"] for row in summary["history"]] == list(range(RUN.steps + 1))
    _same_weights(sliced, whole)


def test_after_the_plateau_a_cooldown_anneals_and_resumes_bit_for_bit(tmp_path, tiny_profile, tokenizer):
    """Plateau at step 4, cooldown 0.5: the run ends at step 6, the learning rate's cosine planned for
    6 steps from step 5 on; interrupted in the cooldown, it resumes to the same weights."""
    config = replace(RUN, plateau_evaluations=1, plateau_min_improvement=0.9, plateau_cooldown=0.5)
    model, summary = pretrain(tiny_profile, tmp_path / "a", config, tokenizer=tokenizer, progress=False)
    assert summary["finished"] and summary["plateau_step"] == 4 and summary["steps"] == 6
    lrs = {row["step"]: row["lr"] for row in summary["history"] if "lr" in row}
    for step in (1, 4):
        assert lrs[step] == pytest.approx(cosine_with_warmup(step - 1, RUN.steps, RUN.warmup_steps, RUN.learning_rate))
    for step in (5, 6):
        assert lrs[step] == pytest.approx(cosine_with_warmup(step - 1, 6, RUN.warmup_steps, RUN.learning_rate))
    _, partial = pretrain(tiny_profile, tmp_path / "b", config, tokenizer=tokenizer, progress=False, stop_after_steps=5)
    assert not partial["finished"] and partial["step"] == 5
    resumed, summary = pretrain(tiny_profile, tmp_path / "b", config, tokenizer=tokenizer, progress=False)
    assert summary["steps"] == 6
    _same_weights(resumed, model)


def test_the_small_profile_stops_at_its_plateau_and_tiny_runs_its_steps():
    small, tiny = PretrainConfig.for_profile("small"), PretrainConfig.for_profile("tiny")
    assert small.plateau_evaluations > 0 and small.eval_every * small.plateau_evaluations <= 500
    assert tiny.plateau_evaluations == 0 and tiny.steps == get_profile("tiny").pretrain_steps


# ----- equal settings against TRL (only where the bench extra is installed) ---------------------------
def _first_logged(trainer) -> dict:
    trainer.args.logging_steps = 1
    trainer.train()
    return trainer.state.log_history[0]


def test_trl_arms_see_our_batches_and_tokens(tokenizer, random_tiny_model):
    """TRL's first step reads our first batch: the same reward-model loss from the same start, and the
    same log-probs of the chosen responses for DPO (so the same tokens)."""
    pytest.importorskip("trl", minversion="1.0")
    pairs = world_pairs(16, seed=8)
    reward_model = reward_model_from_policy(random_tiny_model)
    config = RewardModelConfig(steps=1, batch_size=8, eval_every=0, checkpoint_every=0, seed=2)
    _, history = train_reward_model(copy.deepcopy(reward_model), tokenizer, pairs, [], config, progress=False)
    trl_logged = _first_logged(reward_model_trainer(reward_model, tokenizer, pairs, config))
    assert trl_logged["loss"] == pytest.approx(history[0]["loss"], abs=1e-4)

    config = DPOConfig(steps=1, batch_size=8, max_response_tokens=None, eval_every=0, checkpoint_every=0, seed=2)
    rows = batch_rows(0, len(pairs), 8, seed=2)
    with torch.no_grad():
        chosen, _ = pair_logps(random_tiny_model, tokenizer, [pairs[i] for i in rows])
    trl_logged = _first_logged(dpo_trainer(random_tiny_model, tokenizer, pairs, config))
    assert trl_logged["logps/chosen"] == pytest.approx(float(chosen.mean()), abs=1e-3)


def test_length_sorted_minibatches_cover_every_row_once_with_similar_lengths():
    lengths = torch.tensor([30, 5, 17, 9, 40, 12, 33, 8, 25, 21, 6, 38])
    minibatches = length_sorted_minibatches(lengths, 4, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(minibatches).tolist()) == list(range(12)) and [len(m) for m in minibatches] == [4, 4, 4]
    assert sorted(tuple(sorted(lengths[m].tolist())) for m in minibatches) == [
        (5, 6, 8, 9),
        (12, 17, 21, 25),
        (30, 33, 38, 40),
    ]  # the shortest four, the next four, the longest four
    left = pack([[5, 6], [7]], [[8], [10]], pad_id=1, padding_side="left")
    assert used_columns(left.attention_mask[1:]) == slice(1, 3) and used_columns(left.attention_mask) == slice(0, 3)
