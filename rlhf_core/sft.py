"""Supervised fine-tuning (SFT): stage 1 of RLHF, imitating demonstrations.

Before any reward, the pretrained model is taught to *imitate* good behaviour: it is trained with
the ordinary next-token loss on (prompt, response) demonstrations written by people (Stiennon et
al., 2020, "Learning to summarize from human feedback", fine-tune on reference summaries; Ouyang
et al., 2022, "Training language models to follow instructions with human feedback" (InstructGPT),
call it step 1, SFT on labeler demonstrations). Two details make it differ from pretraining:

- **Loss on the response only.** The prompt is given, not written by the model, so its tokens
  are not predicted. The usual way to say so (Hugging Face, TRL, most codebases) is a ``labels``
  tensor equal to ``input_ids`` with ``-100`` wherever no loss is wanted: on the prompt and on
  padding. ``-100`` is the ``ignore_index`` of ``torch.nn.functional.cross_entropy``:

      tokens:   The  film  was  fun  .   |  The  acting  was  great  .  <eos>  <pad>
      labels:   -100 -100 -100 -100 -100 |  The  acting  was  great  .  <eos>  -100

  (equivalently: a loss mask equal to ``response_mask``). The EOS *is* a label: the model must
  learn where a response ends, or it rambles until the length limit.
- **Shifted by one.** The logits at position t predict token t+1, so the loss pairs
  ``logits[:, :-1]`` with ``labels[:, 1:]``: the last prompt token's logits predict the first
  response token.

The loss is the mean over all response tokens of the batch (long responses weigh more, as in
Hugging Face's ``labels=`` loss). Training uses AdamW, linear warmup then cosine decay, gradient
clipping, the NaN guard and resumable checkpoints from ``rlhf_core.training``: an interrupted run
resumed with ``resume=True`` ends with the same weights, bit for bit on CPU, because the batch of
every step is a pure function of (seed, step) and all the rest is restored from the checkpoint.

What SFT can reach: a model that imitates the demonstrators perfectly writes like their *average*,
so its gold is (at best) the demonstrators' mean gold, the imitation ceiling. ``frozen_reference``
keeps a frozen copy of the SFT model: pi_ref, the anchor of RLHF's KL penalty.

``load_or_train_sft`` is what later chapters call: the profile's SFT model from
``cache_dir()/<profile>/sft`` (safetensors, plus ``sft_summary.json`` with the config and the loss
history), trained from the base model on the standard demonstrations when it is missing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .batching import TokenBatch, encode_responses, pack
from .config import Profile, cache_dir, get_profile, seed_everything, select_device
from .logprobs import forward_logits
from .models import disable_dropout, load_causal_lm
from .tokenizer import load_tokenizer
from .training import check_finite, cosine_with_warmup, load_checkpoint, save_checkpoint, set_learning_rate

IGNORE_INDEX = -100  # cross_entropy's default ignore_index: "no loss at this position"
SUMMARY_FILE = "sft_summary.json"


@dataclass(frozen=True)
class SFTConfig:
    epochs: float = 2.0  # passes over the training demonstrations (used when ``steps`` is None)
    steps: int | None = None  # optimiser steps; when set, overrides ``epochs``
    batch_size: int = 32  # demonstrations per optimiser step
    learning_rate: float = 1e-3  # peak AdamW learning rate (small models like it high; gpt2 wants ~5e-5)
    warmup_steps: int = 20  # linear warmup before the cosine decay
    weight_decay: float = 0.01  # AdamW decoupled weight decay on matrices (not biases, not LayerNorm)
    max_grad_norm: float = 1.0  # gradient clipping (global L2 norm)
    max_response_tokens: int = 96  # responses are cut to this many tokens before EOS is appended
    heldout_records: int = 256  # the last demonstrations, kept out of training for the held-out loss
    eval_every: int = 40  # steps between held-out losses (also measured before the first and after the last step)
    checkpoint_every: int = 100  # steps between resumable checkpoints when ``out_dir`` is given (0: never)
    seed: int = 0  # batch order (and every other random state)

    @classmethod
    def for_profile(cls, profile: Profile | str | None = None) -> "SFTConfig":
        """The defaults the course uses (and caches) for a profile."""
        profile = _profile(profile)
        if profile.name == "tiny":
            return cls()
        if profile.name == "small":
            return cls(learning_rate=5e-4)
        # gpt2: a 124M model pretrained on the web; a gentle learning rate, shorter responses
        return cls(batch_size=16, learning_rate=5e-5, warmup_steps=30, max_response_tokens=profile.max_new_tokens - 1,
                   eval_every=50)

    def total_steps(self, n_train: int) -> int:
        """Optimiser steps of the run for ``n_train`` training demonstrations."""
        if self.steps is not None:
            return self.steps
        return max(1, round(self.epochs * (n_train // self.batch_size)))


def _profile(profile: Profile | str | None) -> Profile:
    return profile if isinstance(profile, Profile) else get_profile(profile)


@dataclass
class SFTBatch(TokenBatch):
    labels: torch.Tensor  # (B, T) input_ids where the loss applies (response + EOS), -100 elsewhere


def sft_labels(batch: TokenBatch) -> torch.Tensor:
    """Labels for the next-token loss: the token ids on response tokens (EOS included), -100 on
    prompt tokens and padding. Found through ``response_mask``, never by comparing ids with the
    pad id (for GPT-2, pad == EOS, and the EOS must stay a label). (B, T)"""
    return batch.input_ids.masked_fill(batch.response_mask == 0, IGNORE_INDEX)


def sft_batch(tokenizer, prompts: Sequence[str], responses: Sequence[str], padding_side: str = "right",
              max_response_tokens: int | None = None) -> SFTBatch:
    """Prompts and responses as one padded batch (EOS appended to each response) with its labels."""
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    response_ids = encode_responses(tokenizer, responses, add_eos=True, max_tokens=max_response_tokens)
    return _pack_with_labels(prompt_ids, response_ids, tokenizer.pad_token_id, padding_side)


def _pack_with_labels(prompt_ids, response_ids, pad_id: int, padding_side: str = "right") -> SFTBatch:
    batch = pack(prompt_ids, response_ids, pad_id, padding_side)
    return SFTBatch(batch.input_ids, batch.attention_mask, batch.response_mask, sft_labels(batch))


def sft_loss(model, batch: SFTBatch) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens (the response and its EOS)."""
    logits = forward_logits(model, batch.input_ids, batch.attention_mask)  # (B, T, V)
    shifted_logits = logits[:, :-1, :]  # position t predicts token t + 1
    shifted_labels = batch.labels[:, 1:]  # (B, T-1)
    return F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.shape[-1]).float(),
                           shifted_labels.reshape(-1), ignore_index=IGNORE_INDEX)


def frozen_reference(model):
    """pi_ref: a deep copy of ``model`` that cannot change (no gradients, eval mode, no dropout).
    RLHF's KL penalty measures how far the policy drifts from it."""
    reference = copy.deepcopy(model)
    disable_dropout(reference)
    reference.requires_grad_(False)
    return reference.eval()


def _columns(records) -> tuple[list[str], list[str]]:
    """Prompts and responses of a ``datasets.Dataset`` or a list of dicts."""
    if hasattr(records, "column_names"):
        return list(records["prompt"]), list(records["response"])
    return [r["prompt"] for r in records], [r["response"] for r in records]


def data_fingerprint(prompts: Sequence[str], responses: Sequence[str]) -> str:
    """A short hash of the training text: a checkpoint only resumes on the data it was made on."""
    digest = hashlib.sha256()
    for prompt, response in zip(prompts, responses):
        digest.update(json.dumps([prompt, response]).encode())
    return digest.hexdigest()[:16]


def batch_rows(step: int, n_train: int, batch_size: int, seed: int) -> list[int]:
    """The training rows of ``step``: epoch e is a random permutation drawn from (seed, e) alone,
    cut into ``n_train // batch_size`` batches (the incomplete last one is dropped). A pure
    function of the step, so a resumed run draws the same batches."""
    per_epoch = n_train // batch_size
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[index * batch_size:(index + 1) * batch_size].tolist()


@torch.no_grad()
def heldout_loss(model, prompt_ids, response_ids, pad_id: int, batch_size: int = 128) -> float:
    """Mean response-token loss over held-out demonstrations (every response token weighs the same)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(prompt_ids), batch_size):
        batch = _pack_with_labels(prompt_ids[start:start + batch_size], response_ids[start:start + batch_size],
                                  pad_id).to(device)
        tokens = int((batch.labels[:, 1:] != IGNORE_INDEX).sum())
        total += sft_loss(model, batch).item() * tokens
        count += tokens
    model.train(was_training)
    return total / max(1, count)


def history_series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, for plotting: e.g. ``history_series(h, "heldout_loss")``."""
    rows = [row for row in history if row.get(key) is not None]
    return [row["step"] for row in rows], [row[key] for row in rows]


def train_sft(model, tokenizer, records, config: SFTConfig | None = None, out_dir: str | Path | None = None,
              resume: bool = True, progress: bool = True, stop_after_steps: int | None = None):
    """Fine-tune ``model`` (in place, on its own device) on demonstrations; returns ``(model, history)``.

    ``records``: a ``datasets.Dataset`` or a list of dicts with ``prompt`` and ``response`` (other
    columns, like ``gold``, are ignored). The last ``config.heldout_records`` are held out.

    ``history`` is a list of dicts, one per step: ``step`` (steps done), ``loss`` (train loss of the
    step's batch), ``lr``, ``grad_norm`` (before clipping), ``tokens`` (response tokens trained on so
    far) and, every ``eval_every`` steps, ``heldout_loss``. Row 0 (step 0) holds the held-out loss
    before training. ``history_series`` pulls one metric out for plotting.

    With ``out_dir``: a resumable checkpoint every ``config.checkpoint_every`` steps in
    ``out_dir/checkpoint`` (``resume=True`` continues from it), and at the end the model
    (safetensors), the tokenizer and ``sft_summary.json`` (config, history, timings) in ``out_dir``.
    ``stop_after_steps`` ends this call early after saving a checkpoint (to train in slices, or to
    test resuming); the history then stops short of the total.
    """
    config = config or SFTConfig()
    prompts, responses = _columns(records)
    n_heldout = config.heldout_records
    n_train = len(prompts) - n_heldout
    if n_train < config.batch_size:
        raise ValueError(f"{len(prompts)} demonstrations leave {n_train} for training after holding out "
                         f"{n_heldout}: fewer than one batch of {config.batch_size}")
    total_steps = config.total_steps(n_train)
    device = next(model.parameters()).device
    generator = seed_everything(config.seed)

    # Tokenize once: prompt ids, and response ids cut to max_response_tokens with EOS appended.
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = encode_responses(tokenizer, responses, add_eos=True, max_tokens=config.max_response_tokens)
    train_prompts, train_responses = prompt_ids[:n_train], response_ids[:n_train]
    heldout_prompts, heldout_responses = prompt_ids[n_train:], response_ids[n_train:]
    pad_id = tokenizer.pad_token_id

    disable_dropout(model)
    # Decay matrices only; biases and LayerNorm gains stay free (as in GPT-2 and nanoGPT).
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=config.learning_rate, betas=(0.9, 0.95))

    identity = {"config": asdict(config), "data": data_fingerprint(prompts, responses)}
    checkpoint = Path(out_dir) / "checkpoint" if out_dir is not None else None
    history: list[dict] = []
    start_step, tokens_seen = 0, 0
    if resume and checkpoint is not None and (checkpoint / "training_state.pt").exists():
        saved = torch.load(checkpoint / "training_state.pt", weights_only=True)["extra"].get("identity")
        if saved == identity:
            restored = load_checkpoint(checkpoint, model, optimizer, generator)
            start_step, history = restored["step"], restored["history"]
            tokens_seen = history[-1]["tokens"] if history else 0
        else:
            warnings.warn(f"the checkpoint in {checkpoint} was made with another config or other data: "
                          f"ignoring it and starting over")
    if not history and heldout_prompts:
        history.append({"step": 0, "tokens": 0,
                        "heldout_loss": heldout_loss(model, heldout_prompts, heldout_responses, pad_id)})

    started = time.perf_counter()
    bar = tqdm(range(start_step, total_steps), desc="SFT", disable=not progress, initial=start_step,
               total=total_steps)
    for step in bar:
        if stop_after_steps is not None and step - start_step >= stop_after_steps:
            if checkpoint is not None:
                save_checkpoint(checkpoint, model, optimizer, step, history, generator, {"identity": identity})
            bar.close()
            return model, history
        model.train()
        lr = cosine_with_warmup(step, total_steps, config.warmup_steps, config.learning_rate)
        set_learning_rate(optimizer, lr)
        rows = batch_rows(step, n_train, config.batch_size, config.seed)
        batch = _pack_with_labels([train_prompts[i] for i in rows], [train_responses[i] for i in rows],
                                  pad_id).to(device)
        loss = sft_loss(model, batch)
        check_finite(loss, "SFT loss", step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        check_finite(grad_norm, "SFT gradient norm", step)
        optimizer.step()
        tokens_seen += int(batch.response_mask.sum())
        record = {"step": step + 1, "loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm),
                  "tokens": tokens_seen}
        if heldout_prompts and ((step + 1) % config.eval_every == 0 or step + 1 == total_steps):
            record["heldout_loss"] = heldout_loss(model, heldout_prompts, heldout_responses, pad_id)
            check_finite(record["heldout_loss"], "SFT held-out loss", step)
        history.append(record)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (checkpoint is not None and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0
                and step + 1 < total_steps):
            save_checkpoint(checkpoint, model, optimizer, step + 1, history, generator, {"identity": identity})
    bar.close()
    model.eval()

    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        heldout = [row["heldout_loss"] for row in history if "heldout_loss" in row]
        summary = {
            "finished": True,
            "config": asdict(config),
            "data": identity["data"],
            "n_train": n_train,
            "n_heldout": len(heldout_prompts),
            "steps": total_steps,
            "heldout_loss_before": heldout[0] if heldout else None,
            "heldout_loss_after": heldout[-1] if heldout else None,
            "seconds_this_run": round(time.perf_counter() - started, 2),
            "history": history,
        }
        partial = out_dir / f"{SUMMARY_FILE}.{os.getpid()}.partial"
        partial.write_text(json.dumps(summary, indent=1))
        partial.replace(out_dir / SUMMARY_FILE)  # written last: its presence means "complete"
        if checkpoint.exists():
            shutil.rmtree(checkpoint)  # finished: the final weights replace the resumable state
    return model, history


# ----- the course's cached SFT model ------------------------------------------------------------
def sft_dir(profile: Profile | str | None = None) -> Path:
    """Where the profile's SFT model lives: ``cache_dir()/<profile>/sft``."""
    return cache_dir() / _profile(profile).name / "sft"


def load_sft_summary(folder: str | Path) -> dict | None:
    """The ``sft_summary.json`` of a finished run (config, history, ...), or None."""
    path = Path(folder) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.exists() else None


def is_cached_sft(folder: str | Path, config: SFTConfig, records=None) -> bool:
    """True when ``folder`` holds a finished SFT run made with exactly ``config`` (and, when
    ``records`` are given, on exactly those demonstrations)."""
    summary = load_sft_summary(folder)
    if summary is None or not summary.get("finished") or summary.get("config") != asdict(config):
        return False
    if records is not None and summary.get("data") != data_fingerprint(*_columns(records)):
        return False
    return (Path(folder) / "model.safetensors").exists()


def load_base_model(profile: Profile | str | None = None, device: torch.device | str | None = None):
    """The profile's pretrained base model (an offline base that is missing is pretrained first)."""
    profile = _profile(profile)
    if profile.offline and not (Path(profile.base_model) / "model.safetensors").exists():
        from .pretrain import pretrain

        print(f"no base model at {profile.base_model}: pretraining it now (one time)")
        pretrain(profile, profile.base_model, tokenizer=load_tokenizer(profile.tokenizer), device=device or "cpu")
    return load_causal_lm(profile.base_model, device=device)


def load_or_train_sft(profile: Profile | str | None = None, device: torch.device | str | None = None,
                      progress: bool = True):
    """``(policy, reference, tokenizer)``: the profile's SFT model and its frozen copy pi_ref.

    Loads ``cache_dir()/<profile>/sft`` when it holds a finished run with the profile's default
    ``SFTConfig.for_profile`` on the current standard demonstrations; otherwise fine-tunes the base model on the standard demonstrations
    (``load_or_write_demonstrations``) and saves it there first (an interrupted training resumes
    from its checkpoint). Both paths return the same weights: the model is always read back from
    the folder. The policy is in eval mode (dropout is off anyway) with gradients enabled.
    """
    from .demonstrations import load_or_write_demonstrations

    profile = _profile(profile)
    device = select_device(device) if device is None or isinstance(device, str) else device
    tokenizer = load_tokenizer(profile.tokenizer)
    folder = sft_dir(profile)
    config = SFTConfig.for_profile(profile)
    records = load_or_write_demonstrations(profile)
    if not is_cached_sft(folder, config, records):
        if (folder / SUMMARY_FILE).exists():
            print(f"the SFT model in {folder} was trained with another config or on other demonstrations: "
                  f"training it again")
            (folder / SUMMARY_FILE).unlink()
        base = load_base_model(profile, device)
        train_sft(base, tokenizer, records, config, out_dir=folder, resume=True, progress=progress)
    policy = load_causal_lm(folder, device=device)
    return policy, frozen_reference(policy), tokenizer
