"""GPU check of the gpt2 profile, run by hand on one CUDA machine (CI has no GPU; pytest does not collect it):

    pip install -e ".[dev]"                        # nbclient and ipykernel, to run the chapters
    python tests/gpu/check_gpu_profile.py          # one command; a few minutes of GPU time (budget: 10)

Nothing comes from the hub. The check first builds local stand-ins (``tests/gpu/standins.py``, on the
CPU, ~20 s): for ``RLHF_GPT2_MODEL`` a model of gpt2's shape (12 layers x 768, vocabulary 50257,
context 1024: 124M parameters, random weights leaning toward EOS so responses end) with a GPT-2
tokenizer (``<|endoftext|>`` as EOS, no pad token), and for ``RLHF_IMDB`` an IMDB-shaped
``DatasetDict``. Then, in a fresh cache folder, in this order (the most useful numbers first):

1. **unit costs of a full gpt2 run**, in fp32 and in mixed precision (what ``auto`` picks for the
   card: bf16, or fp16 with loss scaling on a T4; ``--precision`` forces one): an SFT step
   (``SFTConfig.for_profile("gpt2")``: 16 demonstrations) and a PPO iteration
   (``PPOConfig.for_profile("gpt2")``: 64 prompts, 48 tokens, 4 epochs of minibatches of 16, four
   gpt2-shaped models): seconds (mean of timed repeats after a warm-up), peak GPU memory
   (``torch.cuda.max_memory_allocated``), and the first step's loss in both precisions (they must
   agree to 2%);
2. **padding** invariance of response log-probs on the GPU, in fp32 and mixed: left vs right
   padding, batched vs alone (the largest difference, in nats);
3. **pipeline**: ``python -m rlhf_core run --profile gpt2 --quick`` (in this process, mixed
   precision): wall time and peak GPU memory;
4. **chapters** 02-05 in the gpt2 profile (``RLHF_PROFILE=gpt2``, ``RLHF_QUICK=1``), each in a fresh
   kernel from an in-memory copy (the files are not touched), reusing the pipeline's cached stages:
   wall time and peak GPU memory of each (read in its kernel by an extra last cell). A chapter that
   would start after ``--budget-minutes`` (default 9) minus 1 is skipped and said so.

It prints a line as each part ends, then one table, and the same numbers as JSON with ``--json PATH``:

    GPU check: NVIDIA A100-SXM4-40GB, torch 2.x+cu12x, mixed precision bf16; stand-in gpt2 12 x 768,
    vocabulary 50257, 124.4M parameters; total N s
    part                                        precision    seconds  peak GiB   notes
    SFT step, 16 demonstrations                 fp32           0.xxx      x.xx   loss 10.9xxx
    PPO iteration, 64 prompts x 48 tokens       fp32            x.xx      x.xx   generate x.xx, score x.xx, train x.xx
    SFT step, 16 demonstrations                 bf16           0.xxx      x.xx   loss 10.9xxx
    PPO iteration, 64 prompts x 48 tokens       bf16            x.xx      x.xx   generate x.xx, score x.xx, train x.xx
    padding: left vs right, batched vs alone    fp32               -         -   max |diff| 1e-06, 1e-06 nats
    padding: left vs right, batched vs alone    bf16               -         -   max |diff| 2e-02, 2e-02 nats
    pipeline: run --profile gpt2 --quick        bf16            xx.x      x.xx   every stage, 16 held-out prompts; ...
    chapter 02_sft                              bf16            xx.x      x.xx
    chapter 03_reward_model                     bf16            xx.x      x.xx
    chapter 04_the_four_models                  bf16            xx.x      x.xx
    chapter 05_the_rlhf_loop                    bf16            xx.x      x.xx
    bf16 / fp32 time: SFT step 0.xx, PPO iteration 0.xx; the full profile's PPO (100 iterations): ~N min in
    fp32, ~N min in bf16

and exits with status 1 if a part failed (a chapter's error, a loss mismatch), 0 otherwise.

Options: ``--precision fp16`` (force the T4 path on any card), ``--chapters 03 05``, ``--skip-chapters``,
``--skip-pipeline``, ``--repeats N``, ``--out DIR`` (keep the stand-ins, cache and run folder),
``--pretrain-tiny DIR`` (also pretrain the tiny base model on the GPU), and ``--smoke``: a 2-layer
stand-in on the CPU, bf16 autocast, no chapters, which checks the script itself in a minute (its
numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from standins import build_gpt2_standin, build_imdb_standin

from rlhf_core.__main__ import main as rlhf_main
from rlhf_core.batching import encode_pairs
from rlhf_core.config import get_profile
from rlhf_core.demonstrations import write_demonstrations
from rlhf_core.logprobs import response_logprobs
from rlhf_core.models import count_parameters, load_causal_lm
from rlhf_core.precision import autocast, grad_scaler, resolve_precision
from rlhf_core.prompts import load_prompts
from rlhf_core.reward_model import reward_model_from_policy, score_batch
from rlhf_core.rlhf import PPOConfig, ValueModel
from rlhf_core.rlhf_trainer import PPOTrainer
from rlhf_core.sft import SFTConfig, frozen_reference, sft_batch, sft_loss
from rlhf_core.tokenizer import load_tokenizer
from rlhf_core.training import adamw, backward_and_step

CHAPTERS = ("02", "03", "04", "05")
PEAK_CELL = (
    "import json, torch\nprint('PEAK_BYTES', json.dumps(torch.cuda.max_memory_allocated() "
    "if torch.cuda.is_available() else None))"
)


# ----- measuring ----------------------------------------------------------------------------------
@contextmanager
def measured(device: torch.device, into: dict):
    """Wall seconds and peak GPU memory (GiB) of the block, written into ``into``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    yield into
    if device.type == "cuda":
        torch.cuda.synchronize()
        into["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    into["seconds"] = round(time.perf_counter() - started, 3)


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----- 3. the pipeline ----------------------------------------------------------------------------
def check_pipeline(out: Path, device: torch.device, precision: str | None) -> dict:
    row = {"part": "pipeline: run --profile gpt2 --quick", "precision": resolve_precision(precision, device)}
    arguments = ["run", "--profile", "gpt2", "--quick", "--device", str(device), "--out", str(out / "run")]
    with measured(device, row):
        status = rlhf_main(arguments + (["--precision", precision] if precision else []))
    row["ok"] = status == 0
    if row["ok"]:
        metrics = json.loads((out / "run" / "metrics.json").read_text())
        row["notes"] = (
            f"every stage, {metrics['eval_prompts']} held-out prompts; "
            f"gold SFT {metrics['sft']['gold']:+.2f}, PPO {metrics['ppo']['gold']:+.2f}"
        )
    else:
        row["notes"] = f"exit status {status}"
    free_memory(device)
    return row


# ----- 4. the chapters ----------------------------------------------------------------------------
def check_chapter(number: str, device: torch.device, precision: str | None, timeout: int = 600) -> dict:
    """Run a copy of the chapter in a fresh kernel (gpt2 profile, quick) and read its peak memory."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from rlhf_core.notebooks import chapter_paths, error_cells

    (path,) = chapter_paths([number])
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(PEAK_CELL))
    environment = {**os.environ, "RLHF_PROFILE": "gpt2", "RLHF_QUICK": "1", "RLHF_DEVICE": str(device)}
    if precision:
        environment["RLHF_PRECISION"] = precision
    row = {"part": f"chapter {path.stem}", "precision": resolve_precision(precision, device)}
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    with measured(torch.device("cpu"), row):  # the kernel is another process: its own peak, below
        try:
            client.execute(env=environment)
            failed = error_cells(notebook)
        except CellExecutionError as error:
            failed = error_cells(notebook) or [str(error).strip().splitlines()[-1]]
    row["ok"] = not failed
    row["notes"] = failed[0][:100] if failed else ""
    for output in notebook.cells[-1].get("outputs", []):
        text = output.get("text", "")
        if "PEAK_BYTES" in text:
            peak = json.loads(text.split("PEAK_BYTES", 1)[1])
            row["peak_gib"] = round(peak / 2**30, 2) if peak is not None else None
    return row


# ----- 1. the unit costs: an SFT step and a PPO iteration, fp32 and mixed ---------------------------
def check_sft_step(folder: Path, device: torch.device, precision: str, repeats: int) -> dict:
    profile = get_profile("gpt2")
    config = SFTConfig.for_profile(profile)
    tokenizer = load_tokenizer(profile.tokenizer)
    records = write_demonstrations(load_prompts(profile, "train", config.batch_size * (repeats + 2)))
    model = load_causal_lm(folder, device=device).train()
    optimizer = adamw(model, config.learning_rate, config.weight_decay, betas=(0.9, 0.95))
    scaler = grad_scaler(device, precision)

    def step(index: int) -> float:
        rows = records[index * config.batch_size : (index + 1) * config.batch_size]
        batch = sft_batch(
            tokenizer,
            [r["prompt"] for r in rows],
            [r["response"] for r in rows],
            max_response_tokens=config.max_response_tokens,
        ).to(device)
        with autocast(device, precision):
            loss = sft_loss(model, batch)
        backward_and_step(loss, optimizer, scaler, model.parameters(), config.max_grad_norm)
        return loss.item()

    first_loss = step(0)  # warm-up (kernels, allocator), and the loss both precisions must agree on
    row = {"part": f"SFT step, {config.batch_size} demonstrations", "precision": precision}
    with measured(device, row):
        for index in range(1, repeats + 1):
            step(index)
    row["seconds"] = round(row["seconds"] / repeats, 4)
    row["loss"] = first_loss
    row["notes"] = f"loss {first_loss:.4f}"
    return row  # the model and its optimizer go with this frame


def check_ppo_iteration(folder: Path, device: torch.device, precision: str, repeats: int) -> dict:
    profile = get_profile("gpt2")
    config = PPOConfig.for_profile(profile)
    tokenizer = load_tokenizer(profile.tokenizer)
    policy = load_causal_lm(folder, device=device)
    reference = frozen_reference(policy)
    reward_model = reward_model_from_policy(policy)
    reward_model.config.reward_gain, reward_model.config.reward_bias = 0.5, -0.1
    trainer = PPOTrainer(
        policy,
        reference,
        reward_model,
        ValueModel.from_reward_model(reward_model),
        tokenizer,
        load_prompts(profile, "train"),
        config,
        score_batch,
        precision=precision,
    )
    trainer.step()  # warm-up
    row = {
        "part": f"PPO iteration, {config.prompts_per_iteration} prompts x {config.max_new_tokens} tokens",
        "precision": precision,
    }
    with measured(device, row):
        records = [trainer.step() for _ in range(repeats)]
    row["seconds"] = round(row["seconds"] / repeats, 3)
    phases = {name: sum(r[f"seconds_{name}"] for r in records) / repeats for name in ("generate", "score", "train")}
    row["notes"] = ", ".join(f"{name} {seconds:.2f}" for name, seconds in phases.items())
    row["notes"] += f"; length {records[-1]['length']:.0f}, kl {records[-1]['kl']:.3f}"
    row["full_run_minutes"] = round(config.iterations * row["seconds"] / 60, 1)
    return row  # the four models go with this frame


# ----- 2. padding invariance --------------------------------------------------------------------------
def check_padding(folder: Path, device: torch.device, precision: str) -> dict:
    profile = get_profile("gpt2")
    tokenizer = load_tokenizer(profile.tokenizer)
    model = load_causal_lm(folder, device=device)
    records = write_demonstrations(load_prompts(profile, "eval", 16))
    prompts, responses = [r["prompt"] for r in records], [r["response"] for r in records]

    def logprobs(batch_prompts, batch_responses, side: str) -> list[torch.Tensor]:
        batch = encode_pairs(
            tokenizer, batch_prompts, batch_responses, padding_side=side, max_response_tokens=profile.max_new_tokens
        ).to(device)
        with torch.no_grad(), autocast(device, precision):
            values = response_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_mask)
        return [values[row][batch.response_mask[row].bool()] for row in range(len(batch_prompts))]

    left, right = logprobs(prompts, responses, "left"), logprobs(prompts, responses, "right")
    alone = [logprobs([p], [r], "right")[0] for p, r in zip(prompts, responses)]
    left_right = max((a - b).abs().max().item() for a, b in zip(left, right))
    batched_alone = max((a - b).abs().max().item() for a, b in zip(right, alone))
    return {
        "part": "padding: left vs right, batched vs alone",
        "precision": precision,
        "notes": f"max |diff| {left_right:.1e}, {batched_alone:.1e} nats",
        "left_right": left_right,
        "batched_alone": batched_alone,
    }


# ----- the table ------------------------------------------------------------------------------------
def progress(*rows: dict) -> list[dict]:
    """Say each finished part in one line as it ends (the table comes at the end); returns the rows."""
    for row in rows:
        seconds = "" if row.get("seconds") is None else f", {row['seconds']} s"
        peak = "" if row.get("peak_gib") is None else f", {row['peak_gib']} GiB"
        print(f"  {row['part']} ({row['precision']}{seconds}{peak}) {row.get('notes', '')}", flush=True)
    return list(rows)


def print_table(header: str, rows: list[dict], summary: str) -> None:
    print(header)
    print(f"{'part':<44}{'precision':<11}{'seconds':>9}{'peak GiB':>10}   notes")
    for row in rows:
        seconds = "-" if row.get("seconds") is None else f"{row['seconds']:.3f}"
        peak = "-" if row.get("peak_gib") is None else f"{row['peak_gib']:.2f}"
        flag = "" if row.get("ok", True) else "FAILED: "
        print(f"{row['part']:<44}{row['precision']:<11}{seconds:>9}{peak:>10}   {flag}{row.get('notes', '')}")
    print(summary)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--precision",
        default=None,
        choices=("bf16", "fp16"),
        help="the mixed precision compared with fp32 (default: what auto picks for the card)",
    )
    parser.add_argument("--chapters", nargs="*", default=list(CHAPTERS), metavar="NN")
    parser.add_argument("--skip-chapters", action="store_true")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="timed SFT steps and PPO iterations per precision")
    parser.add_argument("--budget-minutes", type=float, default=9, help="no chapter starts after this minus 1")
    parser.add_argument("--out", default=None, help="keep the stand-ins, the cache and the run here")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    parser.add_argument("--pretrain-tiny", default=None, help="also pretrain the tiny base model, into this folder")
    parser.add_argument("--smoke", action="store_true", help="CPU, a 2-layer stand-in, no chapters: checks this script")
    args = parser.parse_args()
    if args.smoke:
        device, shape = torch.device("cpu"), {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 2048}
        mixed, args.skip_chapters, args.repeats = args.precision or "bf16", True, 1
    else:
        if not torch.cuda.is_available():
            print("this check needs CUDA (or --smoke to check the script on a CPU)", file=sys.stderr)
            return 2
        device, shape = torch.device("cuda"), {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257}
        mixed = args.precision or resolve_precision("auto", device)

    if args.out is not None:
        return check(args, Path(args.out), device, shape, mixed)
    with tempfile.TemporaryDirectory(prefix="rlhf-gpu-check-") as folder:  # ~0.5 GB of stand-ins, removed after
        return check(args, Path(folder), device, shape, mixed)


def check(args, out: Path, device: torch.device, shape: dict, mixed: str) -> int:
    """The four parts (see the module docstring), in ``out``; prints the table, returns the exit status."""
    started = time.perf_counter()
    model_folder = build_gpt2_standin(out / "gpt2", n_positions=1024, eos_probability=0.02, **shape)
    imdb_folder = build_imdb_standin(out / "imdb", n_train=1000, n_test=300)
    os.environ.update(
        RLHF_GPT2_MODEL=str(model_folder),
        RLHF_IMDB=str(imdb_folder),
        RLHF_CACHE_DIR=str(out / "cache"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    for name in ("RLHF_PROFILE", "RLHF_QUICK", "RLHF_PRECISION", "RLHF_DEVICE"):
        os.environ.pop(name, None)
    parameters = count_parameters(load_causal_lm(model_folder))
    print(f"stand-ins built in {time.perf_counter() - started:.0f} s in {out}", flush=True)

    rows = []
    costs = {}
    for precision in ("fp32", mixed):
        sft_row = check_sft_step(model_folder, device, precision, args.repeats)
        free_memory(device)
        costs[precision] = (sft_row, check_ppo_iteration(model_folder, device, precision, args.repeats))
        free_memory(device)
        rows += progress(*costs[precision])
    for precision in ("fp32", mixed):
        rows += progress(check_padding(model_folder, device, precision))
    (sft32, ppo32), (sft_mixed, ppo_mixed) = costs["fp32"], costs[mixed]
    sft_mixed["ok"] = abs(sft_mixed["loss"] - sft32["loss"]) <= 0.02 * abs(sft32["loss"])
    if not args.skip_pipeline:
        rows += progress(check_pipeline(out, device, mixed))
    for number in [] if args.skip_chapters else args.chapters:
        if time.perf_counter() - started > 60 * (args.budget_minutes - 1):
            rows += progress(
                {
                    "part": f"chapter {number}",
                    "precision": mixed,
                    "ok": False,
                    "notes": f"skipped: past {args.budget_minutes - 1} minutes",
                }
            )
            continue
        rows += progress(check_chapter(number, device, mixed))
    if args.pretrain_tiny:
        from rlhf_core.pretrain import pretrain

        tiny = get_profile("tiny")
        row = {"part": "tiny base model pretrained", "precision": resolve_precision(None, device)}
        with measured(device, row):
            _, summary = pretrain(
                tiny, args.pretrain_tiny, tokenizer=load_tokenizer(tiny.tokenizer), device=device, progress=False
            )
        row["notes"] = f"final validation loss {summary['final_validation_loss']:.3f}"
        rows.append(row)

    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (--smoke: the numbers mean nothing)"
    header = (
        f"GPU check: {name}, torch {torch.__version__}, mixed precision {mixed}; stand-in gpt2 "
        f"{shape['n_layer']} x {shape['n_embd']}, vocabulary {shape['vocab_size']}, {parameters / 1e6:.1f}M "
        f"parameters; total {time.perf_counter() - started:.0f} s"
    )
    summary = (
        f"{mixed} / fp32 time: SFT step {sft_mixed['seconds'] / sft32['seconds']:.2f}, PPO iteration "
        f"{ppo_mixed['seconds'] / ppo32['seconds']:.2f}; the full profile's PPO "
        f"({PPOConfig.for_profile(get_profile('gpt2')).iterations} iterations): "
        f"~{ppo32['full_run_minutes']} min in fp32, ~{ppo_mixed['full_run_minutes']} min in {mixed}"
    )
    print_table(header, rows, summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "rows": rows, "summary": summary}, indent=1))
    return 0 if all(row.get("ok", True) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
