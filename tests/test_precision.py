"""Mixed precision (``rlhf_core.precision``), tested on a CPU.

What a CPU can show: the choice (argument, ``RLHF_PRECISION``, auto) and its one-line errors; fp32
changes nothing, bit for bit, against a plainly written step; bfloat16 autocast (which torch runs on
a CPU) drives an SFT step, a DPO step and a PPO iteration with 16-bit matmuls while log-probs, values,
scores and losses stay float32; fp16's loss scaling (``training.backward_and_step``) unscales before
clipping and skips a step whose gradients overflowed. Speed is a GPU question: ``tests/gpu/``.
"""

import copy
import os

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from rlhf_core import precision, world
from rlhf_core.__main__ import main
from rlhf_core.dpo import DPOConfig, pair_logps, train_dpo
from rlhf_core.errors import CourseError
from rlhf_core.generation import generate
from rlhf_core.models import load_causal_lm
from rlhf_core.precision import (
    accelerate_mixed_precision,
    autocast,
    grad_scaler,
    precision_setting,
    resolve_precision,
)
from rlhf_core.reward_model import score_batch
from rlhf_core.rlhf import PPOConfig, ValueModel
from rlhf_core.rlhf_trainer import PPOTrainer
from rlhf_core.sft import SFTConfig, sft_batch, sft_loss, train_sft
from rlhf_core.training import backward_and_step

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def no_precision_variable(monkeypatch):
    monkeypatch.delenv("RLHF_PRECISION", raising=False)


@pytest.fixture(scope="module")
def base_model(tiny_profile):
    return load_causal_lm(tiny_profile.base_model)


def records(n: int, seed: int) -> list[dict]:
    return [{"prompt": r.prompt, "response": r.response} for r in world.sample_reviews(n, seed=seed)]


def pairs(n: int, seed: int) -> list[dict]:
    return [
        {"prompt": good.prompt, "chosen": good.response, "rejected": bad.response}
        for good, bad in zip(
            world.sample_reviews(n, seed=seed, mood=0.8), world.sample_reviews(n, seed=seed + 100, mood=-0.8)
        )
    ]


class DtypeSpy:
    """Records the dtype the LM head's matmul ran in: bfloat16 under autocast, float32 without."""

    def __init__(self, model):
        self.dtypes = set()
        model.lm_head.register_forward_hook(lambda module, inputs, output: self.dtypes.add(output.dtype))


# ----- the choice -----------------------------------------------------------------------------------
def test_argument_then_variable_then_auto(monkeypatch):
    assert resolve_precision(None, CPU) == "fp32"  # auto on a CPU
    monkeypatch.setenv("RLHF_PRECISION", "BF16 ")
    assert resolve_precision(None, CPU) == "bf16"
    assert resolve_precision("fp32", CPU) == "fp32"  # the argument wins
    monkeypatch.setenv("RLHF_PRECISION", "")  # set but empty: as if unset
    assert resolve_precision(None, "cpu") == "fp32"


def test_auto_on_cuda_is_bf16_where_the_card_has_it_else_fp16(monkeypatch):
    cuda = torch.device("cuda")  # only the device type is read: no CUDA needed
    monkeypatch.setattr(precision, "_native_bf16", lambda: True)
    assert resolve_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(precision, "_native_bf16", lambda: False)  # a T4
    assert resolve_precision(None, cuda) == "fp16" and resolve_precision("fp16", cuda) == "fp16"
    assert resolve_precision("auto", torch.device("mps")) == "fp32"


def test_bad_choices_are_one_line_course_errors(monkeypatch):
    with pytest.raises(CourseError, match=r"^precision 'half': not a precision; use one of auto, fp32, bf16, fp16"):
        resolve_precision("half", CPU)
    monkeypatch.setenv("RLHF_PRECISION", "fp8")
    with pytest.raises(CourseError, match=r"RLHF_PRECISION=fp8: .* \(or unset RLHF_PRECISION\)$"):
        resolve_precision(None, CPU)
    with pytest.raises(CourseError, match="needs a CUDA device and this run is on cpu") as error:
        resolve_precision("fp16", CPU)
    assert "\n" not in str(error.value)
    with pytest.raises(CourseError, match="fp16"):
        train_sft(
            torch.nn.Linear(2, 2),
            None,
            records(40, 0),
            SFTConfig(steps=1, batch_size=8, heldout_records=8),
            progress=False,
            precision="fp16",
        )


def test_contexts_scaler_and_accelerate_words():
    with autocast(CPU, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(CPU, "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not grad_scaler(CPU, "bf16").is_enabled() and not grad_scaler(CPU, "fp32").is_enabled()
    assert [accelerate_mixed_precision(p) for p in ("fp32", "bf16", "fp16")] == ["no", "bf16", "fp16"]


def test_precision_setting_sets_the_variable_for_a_block_only(monkeypatch):
    with precision_setting("bf16"):
        assert os.environ["RLHF_PRECISION"] == "bf16" and resolve_precision(None, CPU) == "bf16"
    assert "RLHF_PRECISION" not in os.environ
    monkeypatch.setenv("RLHF_PRECISION", "fp32")
    with precision_setting(None):
        assert os.environ["RLHF_PRECISION"] == "fp32"
    with precision_setting("bf16"):
        pass
    assert os.environ["RLHF_PRECISION"] == "fp32"


# ----- the step -----------------------------------------------------------------------------------
def _regression(seed: int = 0):
    """A small model and a fixed batch: (model, inputs, targets)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    generator = torch.Generator().manual_seed(seed)
    return model, torch.randn(16, 6, generator=generator), torch.randn(16, 1, generator=generator)


def _loss(model, inputs, targets) -> torch.Tensor:
    return ((model(inputs) - targets) ** 2).mean()


def test_a_plain_step_is_the_old_zero_grad_backward_clip_step_bit_for_bit():
    model, inputs, targets = _regression()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=0.1)
    for _ in range(3):
        norm = backward_and_step(_loss(model, inputs, targets), optimizer, None, model.parameters(), 0.05)
        # the same step written out, as every trainer did before backward_and_step
        reference_optimizer.zero_grad(set_to_none=True)
        _loss(reference, inputs, targets).backward()
        expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        reference_optimizer.step()
        assert torch.equal(norm, expected) and norm > 0.05  # clipping was active
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        assert torch.equal(mine, theirs)


def test_groups_are_clipped_each_on_its_own():
    model, inputs, targets = _regression()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    norms = backward_and_step(_loss(model, inputs, targets), optimizer, None, [first, second], 1e-3)
    assert norms.shape == (2,)
    _, reference_inputs, reference_targets = _regression()
    reference = copy.deepcopy(model)
    reference.zero_grad()
    _loss(reference, reference_inputs, reference_targets).backward()
    for group, norm, layer in zip((first, second), norms, (0, 2)):
        unclipped = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in reference[layer].parameters()))
        assert norm.item() == pytest.approx(unclipped.item(), rel=1e-5)
        clipped = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in group))
        assert clipped.item() == pytest.approx(1e-3, rel=1e-3)  # each group at the limit, not the two together


def test_loss_scaling_unscales_before_clipping_and_skips_an_overflow():
    """An enabled scaler (what fp16 uses; torch runs one on a CPU too) gives the very update of no
    scaling: the loss times 2**k, the gradients divided by 2**k before their norm is taken and clipped
    (a power of two scales exactly). A step whose gradients overflowed is skipped, the scale halved."""
    model, inputs, targets = _regression()
    scaled = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scaled_optimizer = torch.optim.SGD(scaled.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    norm = backward_and_step(_loss(model, inputs, targets), optimizer, None, model.parameters(), 0.05)
    scaled_norm = backward_and_step(_loss(scaled, inputs, targets), scaled_optimizer, scaler, scaled.parameters(), 0.05)
    assert torch.equal(norm, scaled_norm) and norm > 0.05  # the true norm, and clipping was active
    for mine, theirs in zip(model.parameters(), scaled.parameters()):
        assert torch.equal(mine, theirs)

    before = [p.clone() for p in scaled.parameters()]
    overflowing = _loss(scaled, inputs, targets) * float("inf")
    norm = backward_and_step(overflowing, scaled_optimizer, scaler, scaled.parameters(), 0.05)
    assert not torch.isfinite(norm)
    assert all(torch.equal(p, q) for p, q in zip(scaled.parameters(), before))  # the step was skipped
    assert scaler.get_scale() == 2.0**9  # and the scale halved


# ----- the trainers under bfloat16 autocast ---------------------------------------------------------------
def test_fp32_is_the_default_on_a_cpu_bit_for_bit(base_model, tokenizer):
    config = SFTConfig(steps=3, batch_size=8, heldout_records=8, eval_every=0, learning_rate=1e-3, warmup_steps=1)
    default, _ = train_sft(copy.deepcopy(base_model), tokenizer, records(48, 1), config, progress=False)
    explicit, _ = train_sft(
        copy.deepcopy(base_model), tokenizer, records(48, 1), config, progress=False, precision="fp32"
    )
    for (name, mine), theirs in zip(default.named_parameters(), explicit.parameters()):
        assert torch.equal(mine, theirs), name


def test_an_sft_step_in_bf16_keeps_float32_weights_and_loss(base_model, tokenizer):
    batch = sft_batch(tokenizer, *zip(*[(r["prompt"], r["response"]) for r in records(8, 2)]))
    spy = DtypeSpy(model := copy.deepcopy(base_model))
    with autocast(CPU, "bf16"):
        mixed = sft_loss(model, batch)
    exact = sft_loss(base_model, batch)
    assert spy.dtypes == {torch.bfloat16} and mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(exact.item(), rel=0.02)  # bfloat16: ~3 significant digits
    config = SFTConfig(steps=2, batch_size=8, heldout_records=8, eval_every=1, learning_rate=1e-3, warmup_steps=1)
    model, history = train_sft(model, tokenizer, records(48, 3), config, progress=False, precision="bf16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in history[1:])
    assert history[-1]["heldout_loss"] == pytest.approx(history[0]["heldout_loss"], rel=0.1)


def test_a_dpo_step_in_bf16_has_float32_log_probs(base_model, tokenizer):
    policy, reference = copy.deepcopy(base_model), copy.deepcopy(base_model)
    spy = DtypeSpy(policy)
    with torch.no_grad():
        exact_chosen, _ = pair_logps(policy, tokenizer, pairs(4, 1))
        with autocast(CPU, "bf16"):
            chosen, rejected = pair_logps(policy, tokenizer, pairs(4, 1))
    assert chosen.dtype == rejected.dtype == torch.float32 and torch.bfloat16 in spy.dtypes
    assert torch.allclose(chosen, exact_chosen, rtol=0.03)
    config = DPOConfig(steps=2, batch_size=4, eval_every=1, checkpoint_every=0, learning_rate=1e-3, warmup_steps=1)
    policy, history = train_dpo(
        policy, reference, tokenizer, pairs(8, 2), pairs(4, 3), config, progress=False, precision="bf16"
    )
    assert history[0]["heldout_loss"] == pytest.approx(0.6931, abs=0.01)  # pi = pi_ref, up to bfloat16 rounding
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in history[1:])


def test_a_ppo_iteration_in_bf16_keeps_every_reading_float32(base_model, tokenizer):
    policy, reference = copy.deepcopy(base_model), copy.deepcopy(base_model)
    config = GPT2Config(
        **{
            k: v
            for k, v in base_model.config.to_dict().items()
            if k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
        },
        num_labels=1,
    )
    torch.manual_seed(1)
    reward_model = GPT2ForSequenceClassification(config).eval()
    spy = DtypeSpy(policy)
    ppo_config = PPOConfig(iterations=1, prompts_per_iteration=6, minibatch_size=3, ppo_epochs=1, max_new_tokens=8)
    trainer = PPOTrainer(
        policy,
        reference,
        reward_model,
        ValueModel.from_reward_model(reward_model),
        tokenizer,
        world.sample_prompts(12, seed=0),
        ppo_config,
        score_batch,
        precision="bf16",
    )
    assert trainer.state.precision == "bf16" and not trainer.state.scaler.is_enabled()
    record = trainer.step()
    assert spy.dtypes == {torch.bfloat16}  # rollout, scoring and update all ran under autocast
    assert all(torch.isfinite(torch.tensor(value)) for value in record.values())
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    with autocast(CPU, "bf16"), torch.no_grad():
        batch = generate(policy, tokenizer, world.sample_prompts(4, seed=1), 8)
        values = trainer.value_model(batch.input_ids, batch.attention_mask)
        scores = score_batch(reward_model, batch.input_ids, batch.attention_mask)
    assert values.dtype == scores.dtype == torch.float32


def test_generation_runs_under_the_variable(base_model, tokenizer, monkeypatch):
    spy = DtypeSpy(model := copy.deepcopy(base_model))
    generate(model, tokenizer, ["The film"], 4)
    assert spy.dtypes == {torch.float32}
    monkeypatch.setenv("RLHF_PRECISION", "bf16")
    batch = generate(model, tokenizer, ["The film"], 4)
    assert spy.dtypes == {torch.float32, torch.bfloat16} and batch.input_ids.shape[1] > 2


# ----- the command line ---------------------------------------------------------------------------
@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("RLHF_CACHE_DIR", str(folder))
    for name in ("RLHF_PROFILE", "RLHF_DEVICE", "RLHF_QUICK"):
        monkeypatch.delenv(name, raising=False)
    return folder


def _one_line(capsys) -> str:
    printed = capsys.readouterr()
    lines = printed.err.splitlines()
    assert printed.out == "" and len(lines) == 1 and "Traceback" not in printed.err, printed.err
    return lines[0]


def test_the_command_line_checks_precision_before_any_stage(empty_cache, tmp_path, monkeypatch, capsys):
    out = ["run", "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert main([*out, "--precision", "fp16"]) == 2
    assert _one_line(capsys) == (
        "--precision fp16: float16 with loss scaling needs a CUDA device and this run is on "
        "cpu; use --precision fp32 (or bf16), or leave --precision out"
    )
    assert main([*out, "--precision", "half"]) == 2
    assert "argument --precision: invalid choice: 'half'" in _one_line(capsys)
    monkeypatch.setenv("RLHF_PRECISION", "fp8")
    assert main(out) == 2
    assert _one_line(capsys).startswith("RLHF_PRECISION=fp8: not a precision;")
    assert not empty_cache.exists() and not (tmp_path / "out").exists()
    assert main(["run", "--help"]) == 0
    assert "--precision {auto,fp32,bf16,fp16}" in capsys.readouterr().out
