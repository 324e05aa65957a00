"""Speed and memory on one CUDA card, by hand (CI has no GPU; pytest does not collect this folder):

    python tests/gpu/check_speed_and_memory.py --json gpu-speed-memory.json      # about 6 minutes of GPU time

Nothing comes from the hub: the models are stand-ins of the real shapes (``tests/gpu/standins.py``,
random weights leaning toward EOS, a GPT-2-style tokenizer), built on the CPU first. Three parts, the
most useful first, each printed as it ends:

1. **The bench on gpt2's shape** (12 x 768, vocabulary 50257): ``python -m rlhf_core bench --profile
   gpt2 --device cuda`` in a child process with ``RLHF_GPT2_MODEL`` pointing at the stand-in. Expected
   lines: seconds per SFT, reward-model and DPO step and their ``fraction_of_peak`` (bf16 autocast on a
   card that has it; the issue's target is 0.35 or more), the PPO iteration with its generate / score
   / train phases, and generation in ms per decode step, ours beside ``transformers``' own
   ``generate`` on the same model and prompts (target: 1.3 ms or less for 64 prompts).
2. **The four-model loop's memory**, full fine-tuning against LoRA (rank 8), for the shapes of gpt2,
   gpt2-medium and gpt2-large (full depth and width, random weights: ``memory.measure_four_model_loop``
   builds them on the card and takes one update step): peak ``torch.cuda.max_memory_allocated`` in GiB
   and as a multiple of one model's fp32 weights, and whether it fits a 15 GiB T4. Expected: LoRA at
   about 2.0-2.1x one model, full at about 10x plus activations; gpt2-large full does not fit a T4
   (about 30 GiB), gpt2-large LoRA does (about 6.5 GiB).
3. **The counted table** (``memory.memory_table``, from the shapes alone) printed beside part 2, so that
   the measured and the counted multiples can be compared (the measured one adds a small batch's
   activations and the CUDA allocator's rounding).

Exit status 0 when every part ran, 1 when one failed (its error is printed and the others still run).
``--skip-bench`` or ``--skip-memory`` leave a part out; ``--json PATH`` keeps every number.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from standins import build_gpt2_standin  # noqa: E402

from rlhf_core.memory import T4_BYTES, measure_four_model_loop, memory_markdown, memory_table  # noqa: E402

SHAPES = {  # the hub models' shapes: (n_layer, n_embd, n_head)
    "gpt2": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
}


def bench_on_gpt2_shape(work: Path) -> dict:
    folder = build_gpt2_standin(work / "gpt2", n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
    out = work / "bench.json"
    environment = {**os.environ, "RLHF_GPT2_MODEL": str(folder), "HF_HUB_OFFLINE": "1", "RLHF_CACHE_DIR": str(work)}
    command = [sys.executable, "-m", "rlhf_core", "bench", "--profile", "gpt2", "--device", "cuda", "--json", str(out)]
    finished = subprocess.run(command, cwd=REPO, env=environment, text=True, capture_output=True, timeout=1200)
    print(finished.stdout[-4000:])
    if finished.returncode != 0:
        raise RuntimeError(f"bench failed: {finished.stderr[-2000:]}")
    return json.loads(out.read_text())


def memory_on_the_card() -> list[dict]:
    from transformers import GPT2Config

    rows = []
    for name, (n_layer, n_embd, n_head) in SHAPES.items():
        shape = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=1024, vocab_size=50257)
        for rank in (0, 8):
            torch.cuda.empty_cache()
            try:
                measured = measure_four_model_loop(shape, lora_rank=rank, device="cuda")
                peak = measured.peak_bytes
                row = {
                    "model": name,
                    "lora_rank": rank,
                    "peak_gib": round(peak / 2**30, 2),
                    "peak_multiple": round(peak / measured.one_model_bytes, 2),
                    "counted_multiple": round(measured.multiple, 3),
                    "fits_t4": peak <= T4_BYTES,
                }
            except torch.cuda.OutOfMemoryError:
                row = {"model": name, "lora_rank": rank, "peak_gib": None, "note": "out of memory on this card"}
            print(json.dumps(row))
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs one GPU (see the module docstring)")
        return 1
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(f"GPU check of speed and memory: {results['device']}, torch {results['torch']}")
    failed = False
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        parts = {
            "bench": (args.skip_bench, lambda: bench_on_gpt2_shape(Path(work))),
            "memory": (args.skip_memory, memory_on_the_card),
        }
        for part, (skip, run) in parts.items():
            if skip:
                continue
            try:
                results[part] = run()
            except Exception:  # one failed part must not hide the others' numbers
                traceback.print_exc()
                results[part] = {"error": traceback.format_exc(limit=3)}
                failed = True
    counted = memory_table()
    results["memory_counted"] = counted
    print(memory_markdown(counted))
    results["seconds"] = round(time.perf_counter() - started, 1)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
