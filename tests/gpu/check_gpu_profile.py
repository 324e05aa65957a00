"""GPU check, run by hand on a CUDA machine (not collected by pytest, CI has no GPU):

    python tests/gpu/check_gpu_profile.py [--pretrain-tiny OUT_DIR]

1. the gpt2 profile's loading path with a randomly initialised model of the real gpt2 shape
   (12 layers x 768, vocab 50257) saved to a local folder and loaded through ``from_pretrained``;
2. padding invariance of response log-probs on the GPU (float32), left vs right vs alone;
3. generation speed of that model (the PPO rollout's first cost);
4. the four-model PPO loop on that model (policy, reference, reward model, value model, all
   gpt2-shaped), with the gpt2 profile's PPO config: seconds per phase and peak memory;
5. a DPO step and ``measure_policy`` on the GPU;
6. optionally, pretraining the tiny base model on the GPU (same script as on CPU).
"""

import argparse
import json
import sys
import tempfile
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf_core import world
from rlhf_core.batching import encode_pairs
from rlhf_core.config import get_profile
from rlhf_core.generation import generate
from rlhf_core.logprobs import response_logprobs
from rlhf_core.models import count_parameters, load_causal_lm
from rlhf_core.tokenizer import load_tokenizer


def check_rlhf_loop(model, tokenizer, device) -> dict:
    """Two PPO iterations, one DPO step and a measurement with gpt2-shaped models on CUDA."""
    import copy

    from rlhf_core.dpo import dpo_loss, pair_logps
    from rlhf_core.evaluation import measure_policy
    from rlhf_core.reward_model import reward_model_from_policy, score_batch
    from rlhf_core.rlhf import PPOConfig, PPOTrainer, ValueModel

    out = {}
    torch.cuda.reset_peak_memory_stats()
    policy = model
    reference = copy.deepcopy(model).requires_grad_(False)
    reward_model = reward_model_from_policy(model).to(device)
    reward_model.config.reward_gain, reward_model.config.reward_bias = 0.5, -0.1
    value_model = ValueModel.from_reward_model(reward_model)
    assert next(value_model.parameters()).device.type == "cuda"
    config = PPOConfig.for_profile(get_profile("gpt2"), iterations=2, prompts_per_iteration=64, minibatch_size=16,
                                   max_new_tokens=48)
    trainer = PPOTrainer(policy, reference, reward_model, value_model, tokenizer, world.sample_prompts(256, seed=2),
                         config, score_batch)
    for _ in range(config.iterations):
        record = trainer.step()
    for key in ("seconds_generate", "seconds_score", "seconds_train", "kl", "clipfrac", "approx_kl", "length"):
        out[f"ppo_gpt2_shape_{key}"] = round(record[key], 4)
    out["ppo_gpt2_shape_peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    with tempfile.TemporaryDirectory() as folder:  # checkpoint and resume on CUDA
        trainer.save(folder)
        trainer.load(folder)

    records = [{"prompt": r.prompt, "chosen": r.response, "rejected": r.response[: len(r.response) // 2]}
               for r in world.sample_reviews(16, seed=3)]
    chosen, rejected = pair_logps(policy, tokenizer, records)
    with torch.no_grad():
        ref_chosen, ref_rejected = pair_logps(reference, tokenizer, records)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
    losses.mean().backward()
    out["dpo_gpt2_shape_loss"] = round(float(losses.mean().detach()), 4)
    measured = measure_policy(policy, reference, reward_model, tokenizer, world.sample_prompts(64, seed=4), 32)
    out["measure_gpt2_shape"] = measured.summary()
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrain-tiny", default=None, help="folder to write a GPU-pretrained tiny base to")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this check needs CUDA"
    device = torch.device("cuda")
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    tokenizer = load_tokenizer(get_profile("tiny").tokenizer)

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
        GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
        started = time.perf_counter()
        model = load_causal_lm(folder, device=device)
        report["gpt2_shape_load_seconds"] = round(time.perf_counter() - started, 2)
    report["gpt2_shape_parameters"] = count_parameters(model)

    reviews = world.sample_reviews(16, seed=0)
    prompts, responses = [r.prompt for r in reviews], [r.response for r in reviews]
    rows = {}
    for side in ("left", "right"):
        batch = encode_pairs(tokenizer, prompts, responses, padding_side=side).to(device)
        with torch.no_grad():
            logprobs = response_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_mask)
        rows[side] = [logprobs[i][batch.response_mask[i].bool()] for i in range(len(prompts))]
    alone = []
    for i in range(len(prompts)):
        batch = encode_pairs(tokenizer, prompts[i:i + 1], responses[i:i + 1]).to(device)
        with torch.no_grad():
            logprobs = response_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_mask)
        alone.append(logprobs[0][batch.response_mask[0].bool()])
    report["gpu_padding_max_abs_diff_left_right"] = max((a - b).abs().max().item() for a, b in zip(rows["left"], rows["right"]))
    report["gpu_padding_max_abs_diff_batched_alone"] = max((a - b).abs().max().item() for a, b in zip(rows["right"], alone))

    for batch_size in (64, 256):
        many = world.sample_prompts(batch_size, seed=1)
        generate(model, tokenizer, many[:8], 8)  # warm-up
        torch.cuda.synchronize()
        started = time.perf_counter()
        result = generate(model, tokenizer, many, 48, generator=torch.Generator(device=device).manual_seed(0))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        report[f"gpt2_shape_generate_{batch_size}x48_seconds"] = round(seconds, 3)
        report[f"gpt2_shape_generate_{batch_size}_tokens_per_second"] = round(int(result.response_mask.sum()) / seconds)
    report["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    report.update(check_rlhf_loop(model, tokenizer, device))
    del model

    if args.pretrain_tiny:
        from rlhf_core.pretrain import pretrain
        profile = get_profile("tiny")
        started = time.perf_counter()
        _, summary = pretrain(profile, args.pretrain_tiny, tokenizer=tokenizer, device=device, progress=False)
        report["tiny_pretrain_gpu_seconds"] = round(time.perf_counter() - started, 1)
        report["tiny_pretrain_final_validation_loss"] = summary["final_validation_loss"]
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
