"""The TRL arms of ``python -m rlhf_core bench --against trl``.

TRL is an optional extra (``pip install -e ".[bench]"``, the current 1.x line) and is imported here
only, inside the functions that need it: nothing on ``rlhf_core``'s own code path imports it.

Equal settings: TRL's ``DPOTrainer`` and ``RewardTrainer`` start from the same weights as ours,
read the same pairs (the same texts, EOS appended to every response as ours does), take the same
pairs per optimizer step, beta, learning rate, warmup, weight decay and clipping, in the same
precision, with the reference log-probs precomputed for DPO in both arms. Their batches are ours:
the training set handed to TRL is our batches' rows, step after step, read in order. TRL 1.x has
no PPO trainer: ``ppo_against_trl024`` runs the PPO comparison with TRL 0.24 in its own
environment (``rlhf_core/bench_trl_ppo.py`` documents how to build it).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from .config import REPO_DIR, Profile
from .errors import CourseError
from .loop import batch_rows
from .precision import resolve_precision

TRL_PPO_PYTHON = "RLHF_TRL_PPO_PYTHON"  # the Python of the TRL 0.24 environment (default: .venv-trl024 in the repo)


def trl_version() -> str | None:
    """TRL's version, or None when it is not installed."""
    try:
        return importlib.import_module("trl").__version__
    except ImportError:
        return None


def require_trl():
    """The ``trl`` module, or a one-line error saying how to install it."""
    version = trl_version()
    if version is None:
        raise CourseError(
            "--against trl: TRL is not installed; install the bench extra with "
            'pip install -e ".[bench]" (or leave --against out)'
        )
    if int(version.split(".")[0]) < 1:
        raise CourseError(
            f"--against trl: TRL {version} is installed, the bench compares with the 1.x line; "
            f'pip install -e ".[bench]" upgrades it'
        )
    return importlib.import_module("trl")


def ordered_rows(pairs: list[dict], config) -> list[dict]:
    """Our batches' pairs, step after step (``loop.batch_rows``): read in order, TRL draws our batches."""
    return [
        pairs[i]
        for step in range(config.total_steps(len(pairs)))
        for i in batch_rows(step, len(pairs), config.batch_size, config.seed)
    ]


def _training_arguments(config, steps: int, device: torch.device, folder: str) -> dict:
    """The TrainingArguments both TRL arms share: our optimizer settings and precision, no saving,
    no printing, no dataloader workers, batches read in order."""
    precision = resolve_precision(None, device)
    return {
        "output_dir": folder,
        "per_device_train_batch_size": config.batch_size,
        "max_steps": steps,
        "learning_rate": config.learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": config.warmup_steps,
        "weight_decay": config.weight_decay,
        "max_grad_norm": config.max_grad_norm,
        "seed": config.seed,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "use_cpu": device.type == "cpu",
        "logging_steps": steps,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "max_length": None,
    }


def _ticker():
    """A ``TrainerCallback`` calling its ``tick`` (set before each run) at each optimizer step's end.
    (``transformers``' trainer machinery and ``datasets`` are imported only when the bench meets TRL:
    every other command starts faster without them.)"""

    class Ticker(importlib.import_module("transformers").TrainerCallback):
        def __init__(self):
            self.tick = lambda: None

        def on_step_end(self, args, state, control, **kwargs):
            self.tick()

    return Ticker()


def _dataset(rows: list[dict]):
    """The pairs as a ``datasets.Dataset`` of prompt, chosen and rejected texts."""
    return importlib.import_module("datasets").Dataset.from_list(
        [{key: row[key] for key in ("prompt", "chosen", "rejected")} for row in rows]
    )


def _in_order(trainer_class):
    """``trainer_class`` reading its training set in order (our batches), without printing its logs."""

    class InOrder(trainer_class):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    def build(*args, **kwargs):
        trainer = InOrder(*args, **kwargs)
        trainer.remove_callback(importlib.import_module("transformers.trainer_callback").PrinterCallback)
        return trainer

    return build


def arm(trainer):
    """The bench's arm of a TRL trainer built here: one ``train()`` call (the same batches every
    time), ticking after each optimizer step."""
    ticker = next(callback for callback in trainer.callback_handler.callbacks if hasattr(callback, "tick"))

    def run(tick) -> None:
        ticker.tick = tick
        trainer.train()

    return run


def dpo_trainer(policy, tokenizer, pairs: list[dict], config):
    """TRL's DPOTrainer at our DPO ``config`` (steps, batch size, beta, sigmoid loss), the reference
    log-probs precomputed, on the pairs of our batches in our order."""
    trl = require_trl()
    if config.loss_type != "sigmoid":
        raise CourseError(f"the bench compares the sigmoid DPO loss, not {config.loss_type!r}")
    device = next(policy.parameters()).device
    rows = ordered_rows(pairs, config)
    dataset = _dataset(rows)
    arguments = _training_arguments(config, config.total_steps(len(pairs)), device, tempfile.mkdtemp())
    return _in_order(trl.DPOTrainer)(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(policy),
        processing_class=tokenizer,
        train_dataset=dataset,
        callbacks=[_ticker()],
        args=trl.DPOConfig(**arguments, beta=config.beta, loss_type=["sigmoid"], precompute_ref_log_probs=True),
    )


def reward_model_trainer(reward_model, tokenizer, pairs: list[dict], config):
    """TRL's RewardTrainer at our reward-model ``config``, from the same head and backbone, on the
    pairs of our batches in our order."""
    trl = require_trl()
    device = next(reward_model.parameters()).device
    rows = ordered_rows(pairs, config)
    dataset = _dataset(rows)
    model = copy.deepcopy(reward_model)
    model.config.pad_token_id = tokenizer.pad_token_id  # TRL pools at the last non-pad token
    arguments = _training_arguments(config, config.total_steps(len(pairs)), device, tempfile.mkdtemp())
    return _in_order(trl.RewardTrainer)(
        model=model,
        processing_class=tokenizer,
        train_dataset=dataset,
        callbacks=[_ticker()],
        args=trl.RewardConfig(**arguments),
    )


def trl_ppo_python() -> Path:
    """The Python of the TRL 0.24 environment: ``$RLHF_TRL_PPO_PYTHON``, else ``.venv-trl024`` in the repo."""
    return Path(os.environ.get(TRL_PPO_PYTHON) or REPO_DIR / ".venv-trl024" / "bin" / "python")


def ppo_against_trl024(profile: Profile, config) -> dict:
    """Our PPO iteration against TRL 0.24's, both timed in the TRL 0.24 environment
    (``rlhf_core.bench_trl_ppo``, interleaved); ``{"skipped": why}`` when that environment is missing."""
    python = trl_ppo_python()
    if not python.exists():
        return {
            "skipped": f"no TRL 0.24 environment at {python}: build it as rlhf_core/bench_trl_ppo.py says, "
            f"or set {TRL_PPO_PYTHON}"
        }
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "ppo.json"
        command = [
            str(python),
            "-m",
            "rlhf_core.bench_trl_ppo",
            "--profile",
            profile.name,
            "--json",
            str(out),
            "--repeats",
            str(config.repeats),
            "--prompts",
            str(config.ppo_prompts),
            "--max-new-tokens",
            str(config.max_new_tokens),
            "--epochs",
            str(config.ppo_epochs),
            "--minibatch-size",
            str(config.ppo_minibatch_size),
            "--threads",
            str(config.threads or 0),
        ]
        finished = subprocess.run(
            command, cwd=REPO_DIR, capture_output=True, text=True, env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
        )
        if finished.returncode != 0 or not out.exists():
            last = (finished.stderr.strip().splitlines() or ["no output"])[-1]
            return {"skipped": f"the TRL 0.24 run failed ({python}): {last}"}
        return json.loads(out.read_text())
