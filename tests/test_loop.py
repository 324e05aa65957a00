"""The one training loop: it does what a plain hand-written loop does, resumes bit for bit, saves on
Ctrl-C, stops on a NaN with the step named; its batches are a pure function of the step; every
trainer's config is built by a validating ``for_profile``."""

import copy
import math
import os
import signal

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf_core.dpo import DPOConfig
from rlhf_core.loop import batch_rows, fingerprint, steps_done, steps_per_epoch, train_loop
from rlhf_core.pretrain import PretrainConfig
from rlhf_core.reward_model import RewardModelConfig
from rlhf_core.sft import SFTConfig
from rlhf_core.training import NonFiniteLossError, adamw, cosine_with_warmup

VOCAB = 50
RUN = dict(steps=6, learning_rate=1e-2, warmup_steps=2, max_grad_norm=0.5, name="toy", progress=False)


@pytest.fixture(scope="module")
def toy_model():
    """A one-layer GPT-2 of width 16: a real ``transformers`` model (checkpoints need one), fast."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def toy_loss(model):
    """The step's batch is drawn from the *global* random state: resuming must restore it."""

    def loss_on_step(step: int):
        ids = torch.randint(VOCAB, (4, 8))  # (B, T)
        return model(input_ids=ids, labels=ids).loss, {"tokens": ids.numel()}

    return loss_on_step


def toy_evaluate(model):
    ids = torch.arange(16).remainder(VOCAB).view(2, 8)

    def evaluate() -> dict:
        with torch.no_grad():
            return {"heldout_loss": model(input_ids=ids, labels=ids).loss.item()}

    return evaluate


def _run(model, tmp_path=None, **kwargs):
    torch.manual_seed(7)
    return train_loop(
        model,
        adamw(model, RUN["learning_rate"], 0.1),
        toy_loss(model),
        **{**RUN, **kwargs},
        checkpoint_dir=None if tmp_path is None else tmp_path / "checkpoint",
    )


def _same_weights(model, other):
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_the_loop_does_what_a_plain_loop_does(toy_model):
    """Weights, losses, learning rates and gradient norms of a plain hand-written loop, bit for bit."""
    model, plain = copy.deepcopy(toy_model), copy.deepcopy(toy_model)
    records = []
    history = _run(model, callback=records.append)

    torch.manual_seed(7)
    decay = [p for p in plain.parameters() if p.dim() >= 2]
    no_decay = [p for p in plain.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}])
    for step in range(RUN["steps"]):
        lr = cosine_with_warmup(step, RUN["steps"], RUN["warmup_steps"], RUN["learning_rate"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = torch.randint(VOCAB, (4, 8))
        loss = plain(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in plain.parameters()]))
        torch.nn.utils.clip_grad_norm_(plain.parameters(), RUN["max_grad_norm"])
        optimizer.step()
        row = history[step]
        assert row["step"] == step + 1 and row["lr"] == lr and row["loss"] == loss.item() and row["tokens"] == 32
        assert row["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-5)
    assert _same_weights(model, plain)
    assert records == history  # the callback saw every record, in order
    assert not model.training  # left in eval mode


def test_adamw_decays_matrices_only_and_skips_frozen_parameters(toy_model):
    model = copy.deepcopy(toy_model)
    model.transformer.wpe.requires_grad_(False)
    optimizer = adamw(model, 1e-3, 0.01, betas=(0.9, 0.95))
    decayed, free = optimizer.param_groups
    names = {id(p): name for name, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.01 and free["weight_decay"] == 0.0 and decayed["betas"] == (0.9, 0.95)
    assert {names[id(p)] for p in decayed["params"]} == {
        name for name, p in model.named_parameters() if p.dim() == 2 and name != "transformer.wpe.weight"
    }
    assert all(names[id(p)].endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")) for p in free["params"])
    assert len(decayed["params"]) + len(free["params"]) == len([p for p in model.parameters() if p.requires_grad])


def test_evaluation_cadence_and_row_zero(toy_model):
    model = copy.deepcopy(toy_model)
    history = _run(model, evaluate=toy_evaluate(model), eval_every=4, steps=10)
    assert [row["step"] for row in history] == list(range(11))
    assert [row["step"] for row in history if "heldout_loss" in row] == [0, 4, 8, 10]  # before, every 4, last
    assert "loss" not in history[0]
    only_at_the_end = _run(copy.deepcopy(toy_model), evaluate=toy_evaluate(model), eval_every=0, steps=3)
    assert [row["step"] for row in only_at_the_end if "heldout_loss" in row] == [0, 3]


def test_an_interrupted_run_resumes_bit_for_bit(tmp_path, toy_model):
    evaluate_kwargs = dict(eval_every=2, checkpoint_every=2)
    uninterrupted = copy.deepcopy(toy_model)
    full = _run(uninterrupted, evaluate=toy_evaluate(uninterrupted), **evaluate_kwargs)

    model = copy.deepcopy(toy_model)
    partial = _run(model, tmp_path, evaluate=toy_evaluate(model), stop_after_steps=3, **evaluate_kwargs)
    assert steps_done(partial) == 3 and partial == full[:4]
    torch.manual_seed(12345)  # the disconnect scrambles the global random state: resume must restore it
    model = copy.deepcopy(toy_model)  # a fresh process: the starting weights again
    resumed = _run(model, tmp_path, evaluate=toy_evaluate(model), **evaluate_kwargs)
    assert resumed == full
    assert _same_weights(model, uninterrupted)


def test_a_checkpoint_of_another_identity_is_not_resumed(tmp_path, toy_model):
    _run(copy.deepcopy(toy_model), tmp_path, identity={"config": 1}, stop_after_steps=3)
    with pytest.warns(UserWarning, match="another config or other data"):
        history = _run(copy.deepcopy(toy_model), tmp_path, identity={"config": 2})
    assert [row["step"] for row in history] == list(range(1, RUN["steps"] + 1))  # started over
    # ignored, not destroyed (no checkpoint was due in the second run): the first config resumes from it
    assert steps_done(_run(copy.deepcopy(toy_model), tmp_path, identity={"config": 1}, stop_after_steps=0)) == 3


def test_ctrl_c_saves_a_checkpoint_at_a_step_boundary_and_the_next_run_resumes(tmp_path, toy_model, capsys):
    uninterrupted = copy.deepcopy(toy_model)
    full = _run(uninterrupted)

    def press_ctrl_c(record):
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C or a notebook's interrupt button sends

    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        _run(copy.deepcopy(toy_model), tmp_path, callback=press_ctrl_c)
    assert signal.getsignal(signal.SIGINT) is handler_before  # the usual Ctrl-C is back
    expected = f"toy: interrupted at step 3 of 6; the next run resumes from {tmp_path / 'checkpoint'}"
    assert capsys.readouterr().out.strip() == expected  # one line
    state = torch.load(tmp_path / "checkpoint" / "training_state.pt", weights_only=True)
    assert state["step"] == 3

    torch.manual_seed(12345)
    model = copy.deepcopy(toy_model)
    assert _run(model, tmp_path) == full
    assert _same_weights(model, uninterrupted)


def test_a_second_ctrl_c_stops_at_once(tmp_path, toy_model):
    def press_twice(record):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        _run(copy.deepcopy(toy_model), tmp_path, callback=press_twice)
    assert not (tmp_path / "checkpoint").exists()  # no time to save: the user insisted


def test_a_nan_loss_stops_with_the_step_named(toy_model):
    model = copy.deepcopy(toy_model)
    loss_on_step = toy_loss(model)

    def poisoned(step):
        loss, stats = loss_on_step(step)
        return (loss * float("nan") if step == 2 else loss), stats

    with pytest.raises(NonFiniteLossError, match="toy loss is nan at step 2"):
        train_loop(model, adamw(model, 1e-3, 0.0), poisoned, **RUN)


def test_batches_are_a_pure_function_of_the_step():
    for drop_last, expected_steps in ((False, 5), (True, 4)):
        assert steps_per_epoch(35, 8, drop_last) == expected_steps
        epoch = [batch_rows(step, 35, 8, seed=3, drop_last=drop_last) for step in range(expected_steps)]
        rows = [row for batch in epoch for row in batch]
        assert len(rows) == len(set(rows)) == (32 if drop_last else 35)  # each row at most once per epoch
        assert [len(batch) for batch in epoch][-1] == (8 if drop_last else 3)  # the smaller last batch, or none
    assert batch_rows(5, 35, 8, seed=3) == batch_rows(5, 35, 8, seed=3)
    assert batch_rows(5, 35, 8, seed=3) != batch_rows(0, 35, 8, seed=3)  # a new epoch, a new order
    assert batch_rows(0, 35, 8, seed=3) != batch_rows(0, 35, 8, seed=4)
    # the permutation of epoch e is torch.randperm seeded with seed * 100_003 + e (the course's order)
    order = torch.randperm(35, generator=torch.Generator().manual_seed(3 * 100_003 + 1)).tolist()
    assert batch_rows(6, 35, 8, seed=3) == order[8:16]
    with pytest.raises(ValueError, match="no batch"):
        batch_rows(0, 5, 8, seed=0, drop_last=True)


def test_fingerprint_tells_data_apart():
    records = [{"prompt": "A", "chosen": "B", "rejected": "C"}]
    assert fingerprint(records) == fingerprint([dict(reversed(records[0].items()))])  # key order does not matter
    assert fingerprint(records) != fingerprint([{**records[0], "chosen": "b"}])
    assert fingerprint([records, []]) != fingerprint([[], records])  # which split a record is in matters


@pytest.mark.parametrize("config_class", [PretrainConfig, SFTConfig, RewardModelConfig, DPOConfig])
def test_every_trainer_config_is_built_by_a_validating_for_profile(config_class):
    default = config_class.for_profile("tiny")
    changed = config_class.for_profile("tiny", seed=5, warmup_steps=3)
    assert (changed.seed, changed.warmup_steps) == (5, 3)
    assert config_class.for_profile("tiny") == default  # the defaults were not changed in place
    with pytest.raises(TypeError, match="'warmup'"):
        config_class.for_profile("tiny", warmup=0.05)  # warmup is counted in steps: warmup_steps
    assert isinstance(default.warmup_steps, int) and hasattr(default, "steps")


def test_the_reward_model_warms_up_over_the_same_steps_as_before():
    """The warmup was 5% of the steps, rounded: 8 of the tiny profile's 170 (2 epochs of 2697 pairs)."""
    config = RewardModelConfig.for_profile("tiny")
    assert config.total_steps(2697) == 170 and config.warmup_steps == max(1, round(0.05 * 170))
    assert RewardModelConfig.for_profile("tiny", steps=12).total_steps(2697) == 12
    assert math.isclose(cosine_with_warmup(config.warmup_steps - 1, 170, config.warmup_steps, 1.0), 1.0)
