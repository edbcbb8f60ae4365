"""Learner step time, FIPO vs DAPO: the cost of FIPO's future-KL influence weights inside the update.

One in-process learner rank (world size 1, gloo, FSDP2) per algorithm: a FIPO learner and a DAPO learner built
from the same model, fed the same batch (several mini-batches per step, so FIPO's weights are live from the
second mini-batch on) with the same schedule. Each repetition times one learner step (`compute_log_probs` +
`update`) of each, alternating which goes first; after one warm-up round the median of `--repeats` counts:
fipo_overhead = fipo_step_s / dapo_step_s − 1 (goal ≤ 0.02). On a shared machine the step timings are noisy,
so it also reports the median of the per-repetition ratios and an estimate from the losses' own cost
(`fipo_loss_overhead_est`: FIPO's minus DAPO's loss forward + backward for one step's rows, over DAPO's step
time). Prints one JSON line last.

    python -m bench.learner [--samples 32] [--mini-batch-samples 8] [--response-len 128] [--repeats 9]

On a GPU (CUDA visible: the rank uses it, with NCCL, no Ray) the GPU flags matter:

    python -m bench.learner --preset qwen2.5-0.5b --param-dtype bfloat16 --response-len 2048 \
        --micro-batch-tokens 16384 [--peak-tflops 989]

`--preset qwen2.5-0.5b` builds a randomly initialised model with Qwen2.5-0.5B's config (vocab 151936, hidden
896, 24 layers, 14 heads / 2 KV heads, MLP 4864, tied embeddings; ~494M parameters) and random token ids.
It also reports tokens/s and MFU. MFU = 6·N·tokens/s / peak (forward + backward of `update`) and
8·N·tokens/s / peak for the whole step (plus the no-grad `compute_log_probs` forward), where N counts all
parameters (tied embeddings once), tokens are the attended prompt + response tokens, attention FLOPs are not
counted, and the peak is `--peak-tflops` (default on CUDA: 989, the H100 SXM dense bf16 datasheet figure;
the H200's is the same).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from advantage import POLICY_LOSSES  # noqa: E402
from bench.common import device_info, git_commit, print_result  # noqa: E402
from learner.config import PARAM_DTYPES, LearnerConfig, LRScheduleConfig, OptimizerConfig  # noqa: E402
from learner.distributed import free_port, init_distributed, learner_device  # noqa: E402
from learner.synthetic import random_batch  # noqa: E402
from learner.worker import LearnerWorker  # noqa: E402
from rollout.tiny import VOCAB_SIZE, build_tiny_model  # noqa: E402

MODEL = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}
# Qwen2.5-0.5B's architecture (its config.json), built with random weights: no download needed.
QWEN25_05B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM datasheet, dense bf16 (the H200 SXM's is the same)


def build_preset_model(path: str, preset: str, device: torch.device) -> tuple[str, dict, int]:
    """A model directory for `preset` ("tiny": the CPU benchmark's model; "qwen2.5-0.5b": random weights with
    Qwen2.5-0.5B's config, initialised on `device` for speed); returns (dir, config dict, vocab size)."""
    if preset == "tiny":
        return str(build_tiny_model(path, intermediate_size=704, **MODEL)), MODEL, VOCAB_SIZE
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**QWEN25_05B, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    del model
    return path, QWEN25_05B, QWEN25_05B["vocab_size"]


def time_loss(name: str, batch, args, repeats: int = 20, device: torch.device | None = None) -> float:
    """Seconds of the policy loss alone (forward + backward through log_probs, no model) for all of one
    step's rows, at a moved policy (random log-ratio of ±0.05, so FIPO's weights are not all 1); median.
    On `device` (default: the CPU), synchronised before each clock read when it is a GPU."""
    device = device or torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    loss = POLICY_LOSSES.get(name)
    config = loss.default_config
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(batch.response_ids.shape, generator=gen) * 3
    live = (old + 0.05 * torch.randn(old.shape, generator=gen)).to(device).requires_grad_(True)
    old = old.to(device)
    mask = batch.response_mask.to(device)
    advantages = batch.advantages.to(device)
    normalizer = mask.sum().float()
    times = []
    for _ in range(repeats + 2):
        sync()
        start = time.perf_counter()
        for rows in range(0, batch.num_samples, args.mini_batch_samples):
            sl = slice(rows, rows + args.mini_batch_samples)
            value, _ = loss.fn(live[sl], old[sl], advantages[sl], mask[sl], config, normalizer=normalizer)
            value.backward()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32, help="samples per step (prompts × group size)")
    parser.add_argument("--mini-batch-samples", type=int, default=8, help="samples per optimizer step")
    parser.add_argument("--micro-batch-tokens", type=int, default=4096, help="token budget per micro-batch")
    parser.add_argument("--response-len", type=int, default=128, help="longest response, tokens")
    parser.add_argument("--repeats", type=int, default=9, help="timed repetitions of each (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared box)")
    parser.add_argument("--preset", choices=("tiny", "qwen2.5-0.5b"), default="tiny", help="model to build")
    parser.add_argument("--param-dtype", choices=PARAM_DTYPES, default="float32", help="learner compute dtype")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"peak FLOP/s for MFU, TFLOP/s (default on CUDA: {H100_BF16_DENSE_TFLOPS})")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # OpenMP threads on an oversubscribed CPU stall (seen: 30x slower)

    init_distributed(0, 1, "127.0.0.1", free_port(), timeout_s=300)  # NCCL on CUDA, gloo otherwise
    device = learner_device()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, model_config, vocab_size = build_preset_model(f"{tmp}/model", args.preset, device)
        batch = random_batch(
            args.samples, vocab_size=vocab_size, prompt_len=(16, 64),
            response_len=(args.response_len // 4, args.response_len), group_size=8, seed=0,
        )  # fmt: skip
        learners = {}
        for name in ("fipo", "dapo"):
            config = LearnerConfig(
                model_dir=model_dir,
                mini_batch_samples=args.mini_batch_samples,
                micro_batch_tokens=args.micro_batch_tokens,
                policy_loss=name,
                param_dtype=args.param_dtype,
                optimizer=OptimizerConfig(lr=1e-5),
                lr_schedule=LRScheduleConfig(warmup_steps=0),
            )
            learners[name] = LearnerWorker(config)
        num_params = sum(p.numel() for p in learners["fipo"].model.parameters())

        update_times: dict[str, list[float]] = {"fipo": [], "dapo": []}

        def step(name: str) -> tuple[float, list[dict]]:
            learner = learners[name]
            start = time.perf_counter()
            old_log_probs = learner.compute_log_probs(batch)  # returns CPU tensors: synchronised
            mid = time.perf_counter()
            metrics = learner.update(batch.replace(old_log_probs=old_log_probs))  # metrics are host floats
            end = time.perf_counter()
            update_times[name].append(end - mid)
            return end - start, metrics

        times: dict[str, list[float]] = {"fipo": [], "dapo": []}
        last_metrics = {}
        for rep in range(args.repeats + 1):
            order = ("fipo", "dapo") if rep % 2 == 0 else ("dapo", "fipo")
            for name in order:
                seconds, last_metrics[name] = step(name)
                if rep > 0:  # the first round is warm-up
                    times[name].append(seconds)
                else:
                    update_times[name].pop()
    dist.destroy_process_group()

    fipo_s, dapo_s = statistics.median(times["fipo"]), statistics.median(times["dapo"])
    paired = statistics.median(f / d - 1 for f, d in zip(times["fipo"], times["dapo"]))
    loss_s = {name: time_loss(name, batch, args, device=device) for name in ("fipo", "dapo")}
    # The losses' own cost difference over one step's micro-batches, relative to DAPO's step: an estimate of
    # the overhead that does not depend on how busy the machine was between the two step timings.
    loss_overhead = (loss_s["fipo"] - loss_s["dapo"]) / min(times["dapo"])  # fastest DAPO step: conservative
    weights = [m["learner/influence_weights_mean"] for m in last_metrics["fipo"]]
    print(f"fipo step times {[round(t, 3) for t in times['fipo']]}")
    print(f"dapo step times {[round(t, 3) for t in times['dapo']]}")
    print(f"fipo influence_weights_mean per mini-batch (last step): {[round(w, 5) for w in weights]}")
    tokens = int(batch.response_mask.sum() + batch.prompt_mask.sum())
    peak_tflops = args.peak_tflops or (H100_BF16_DENSE_TFLOPS if device.type == "cuda" else None)
    throughput = {}
    for name in ("fipo", "dapo"):
        update_s = statistics.median(update_times[name])
        step_s = statistics.median(times[name])
        throughput[f"{name}_update_s"] = round(update_s, 4)
        throughput[f"{name}_update_tokens_per_s"] = round(tokens / update_s, 1)
        throughput[f"{name}_step_tokens_per_s"] = round(tokens / step_s, 1)
        if peak_tflops:
            throughput[f"{name}_mfu_update"] = round(6 * num_params * tokens / update_s / (peak_tflops * 1e12), 4)
            throughput[f"{name}_mfu_step"] = round(8 * num_params * tokens / step_s / (peak_tflops * 1e12), 4)
    throughput["fipo_update_overhead"] = round(throughput["fipo_update_s"] / throughput["dapo_update_s"] - 1, 4)
    throughput["peak_tflops"] = peak_tflops
    print(
        f"update tokens/s: fipo {throughput['fipo_update_tokens_per_s']}, dapo {throughput['dapo_update_tokens_per_s']}"
    )
    print_result(
        {
            "bench": "learner",
            "fipo_step_s": round(fipo_s, 4),
            "dapo_step_s": round(dapo_s, 4),
            "fipo_overhead": round(fipo_s / dapo_s - 1, 4),
            "fipo_overhead_paired_median": round(paired, 4),
            "fipo_loss_overhead_est": round(loss_overhead, 5),
            "fipo_loss_s_per_step": round(loss_s["fipo"], 5),
            "dapo_loss_s_per_step": round(loss_s["dapo"], 5),
            "fipo_min_s": round(min(times["fipo"]), 4),
            "dapo_min_s": round(min(times["dapo"]), 4),
            "repeats": args.repeats,
            "samples": args.samples,
            "mini_batches": args.samples // args.mini_batch_samples,
            "response_tokens": int(batch.response_mask.sum()),
            "tokens": int(batch.response_mask.sum() + batch.prompt_mask.sum()),
            "model_params": num_params,
            "model": model_config,
            "world_size": 1,
            "preset": args.preset,
            "param_dtype": args.param_dtype,
            "backend": dist.Backend.NCCL if device.type == "cuda" else dist.Backend.GLOO,
            **throughput,
            "commit": git_commit(),
            **device_info(),
        }
    )


if __name__ == "__main__":
    main()
