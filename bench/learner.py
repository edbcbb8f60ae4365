"""Learner step time, memory and throughput; FIPO vs DAPO: the cost of FIPO's future-KL influence weights.

One in-process learner rank (world size 1: gloo on the CPU, NCCL on a GPU; FSDP2) per algorithm in
`--algorithms` (default: a FIPO and a DAPO learner built from the same model), fed the same batch (several
mini-batches per step, so FIPO's weights are live from the second mini-batch on) with the same schedule.
Each repetition times one learner step (`compute_log_probs` + `update`) of each, alternating which goes
first; after one warm-up round the median of `--repeats` counts. With both algorithms:
fipo_overhead = fipo_step_s / dapo_step_s − 1 (goal ≤ 0.02), the median of the per-repetition ratios, and an
estimate from the losses' own cost (`fipo_loss_overhead_est`: FIPO's minus DAPO's loss forward + backward for
one step's rows, over DAPO's step time), since step timings on a shared machine are noisy.

The learner's scale features are flags (their values are in the result): `--packing on|off` (packed
micro-batches vs right-padded rows), `--share-prompts on|off` (a group's 8 samples share one copy of their
prompt in a packed micro-batch; shared_prompt_frac = the share of the samples' tokens not computed),
`--activation-checkpointing on|off`, `--logprob-chunk N` (tokens per
chunk of the LM head; 0 = all [tokens × vocab] logits at once). Throughput: update_tokens_per_s (real prompt +
response tokens of the step / median update seconds) and mfu_update = 6·N·tokens/s over the peak (N = all
parameters, tied embeddings once; attention FLOPs and recomputation are not counted; peak: `--peak-tflops`,
default on CUDA 989 = the H100/H200 SXM dense bf16 datasheet figure), for DAPO when it runs (else the first
algorithm); per algorithm also fipo_/dapo_ keys. padded_fraction: padding positions computed / all positions
computed. Memory: peak_memory_gib = CUDA max allocated over the run (weights, optimizer, activations) on a
GPU, peak resident-set growth over the run since the learners were built on the CPU; log_probs_peak_gib /
update_peak_gib = the largest growth within one compute_log_probs / update call (timed repetitions, so the
optimizer state already exists). Prints one JSON line last.

    python -m bench.learner [--samples 32] [--mini-batch-samples 8] [--response-len 128] [--repeats 9]
    # the memory effect of the chunked head at Qwen's 151,936-token vocabulary, on the CPU:
    python -m bench.learner --preset tiny-qwen-vocab --algorithms dapo --logprob-chunk 0 --packing off
    python -m bench.learner --preset tiny-qwen-vocab --algorithms dapo

Presets: "tiny" (hidden 256, 4 layers, byte vocabulary of 259), "tiny-qwen-vocab" (the same body with
Qwen2.5's 151,936-token vocabulary, tied), and randomly initialised models with the configs of Qwen2.5-0.5B
(494M parameters), -3B (3.09B) and -7B (7.62B); random token ids. On a GPU (CUDA visible: the rank uses it,
with NCCL, no Ray), e.g. what bench/gpu_suite.py runs:

    python -m bench.learner --preset qwen2.5-3b --param-dtype bfloat16 --response-len 2048 --samples 64 \\
        --mini-batch-samples 16 --micro-batch-tokens 16384 --algorithms dapo --activation-checkpointing on
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # fewer fragmentation OOMs

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from advantage import POLICY_LOSSES  # noqa: E402
from bench.common import device_info, git_commit, print_result  # noqa: E402
from learner.attention import packed_kernel  # noqa: E402
from learner.config import PARAM_DTYPES, LearnerConfig, LRScheduleConfig, OptimizerConfig  # noqa: E402
from learner.distributed import free_port, init_distributed, learner_device  # noqa: E402
from learner.memory import PeakMemory, host_rss_bytes  # noqa: E402
from learner.model import DTYPES  # noqa: E402
from learner.synthetic import random_batch  # noqa: E402
from learner.worker import LearnerWorker  # noqa: E402
from rollout.tiny import VOCAB_SIZE, build_tiny_model  # noqa: E402

MODEL = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}
_QWEN25 = {"vocab_size": 151936, "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}
# Qwen2.5's architectures (their config.json files), built with random weights: no download needed.
PRESETS = {
    "tiny-qwen-vocab": {**_QWEN25, **MODEL, "intermediate_size": 704, "tie_word_embeddings": True},
    "qwen2.5-0.5b": {
        **_QWEN25, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True,
    },
    "qwen2.5-3b": {
        **_QWEN25, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
        "num_attention_heads": 16, "num_key_value_heads": 2, "tie_word_embeddings": True,
    },
    "qwen2.5-7b": {
        **_QWEN25, "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False,
    },
}  # fmt: skip
H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM datasheet, dense bf16 (the H200 SXM's is the same)
PRESET_FILE = "bench_preset.json"


def build_preset_model(path: str, preset: str, device: torch.device) -> tuple[str, dict, int]:
    """A model directory for `preset` (see the module docstring; random weights initialised on `device` for
    speed, saved in bfloat16 on CUDA, float32 on the CPU); returns (dir, config dict, vocab size). A directory
    that already holds the preset (`--model-cache`) is reused."""
    if preset == "tiny":
        return str(build_tiny_model(path, intermediate_size=704, **MODEL)), MODEL, VOCAB_SIZE
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = PRESETS[preset]
    marker = pathlib.Path(path) / PRESET_FILE
    if marker.exists() and json.loads(marker.read_text()) == config:
        return path, config, config["vocab_size"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**config), dtype=dtype)
    model.save_pretrained(path, safe_serialization=True)
    del model
    marker.write_text(json.dumps(config))
    return path, config, config["vocab_size"]


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


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32, help="samples per step (prompts × group size)")
    parser.add_argument("--mini-batch-samples", type=int, default=8, help="samples per optimizer step")
    parser.add_argument("--micro-batch-tokens", type=int, default=4096, help="token budget per micro-batch")
    parser.add_argument("--response-len", type=int, default=128, help="longest response, tokens")
    parser.add_argument("--repeats", type=int, default=9, help="timed repetitions of each (after 1 warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared box)")
    parser.add_argument("--preset", choices=("tiny", *PRESETS), default="tiny", help="model to build")
    parser.add_argument("--model-cache", default=None, help="folder to keep built preset models in (reused)")
    parser.add_argument("--param-dtype", choices=PARAM_DTYPES, default="float32", help="learner compute dtype")
    parser.add_argument("--algorithms", default="fipo,dapo", help="comma-separated policy losses to run")
    parser.add_argument("--packing", type=on_off, default=True, help="on|off: packed micro-batches")
    parser.add_argument("--share-prompts", type=on_off, default=False, help="on|off: a group's prompt once (packed)")
    parser.add_argument("--activation-checkpointing", type=on_off, default=False, help="on|off")
    parser.add_argument("--logprob-chunk", type=int, default=1024, help="LM-head chunk, tokens (0: all at once)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"peak FLOP/s for MFU, TFLOP/s (default on CUDA: {H100_BF16_DENSE_TFLOPS})")  # fmt: skip
    args = parser.parse_args()
    args.algorithms = [a for a in args.algorithms.split(",") if a]
    for name in args.algorithms:
        POLICY_LOSSES.get(name)  # raises with the valid names
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)  # OpenMP threads on an oversubscribed CPU stall (seen: 30x slower)
    init_distributed(0, 1, "127.0.0.1", free_port(), timeout_s=600)  # NCCL on CUDA, gloo otherwise
    device = learner_device()
    names = args.algorithms
    with tempfile.TemporaryDirectory() as tmp:
        model_path = f"{args.model_cache}/{args.preset}" if args.model_cache else f"{tmp}/model"
        start = time.perf_counter()
        model_dir, model_config, vocab_size = build_preset_model(model_path, args.preset, device)
        build_s = time.perf_counter() - start
        batch = random_batch(
            args.samples, vocab_size=vocab_size, prompt_len=(16, 64),
            response_len=(args.response_len // 4, args.response_len), group_size=8, seed=0,
        )  # fmt: skip
        learners = {}
        start = time.perf_counter()
        for name in names:
            config = LearnerConfig(
                model_dir=model_dir,
                mini_batch_samples=args.mini_batch_samples,
                micro_batch_tokens=args.micro_batch_tokens,
                policy_loss=name,
                param_dtype=args.param_dtype,
                optimizer=OptimizerConfig(lr=1e-5),
                lr_schedule=LRScheduleConfig(warmup_steps=0),
                packing=args.packing,
                share_prompts=args.share_prompts,
                activation_checkpointing=args.activation_checkpointing,
                logprob_chunk_tokens=args.logprob_chunk,
            )
            learners[name] = LearnerWorker(config)
        load_s = time.perf_counter() - start
        first = learners[names[0]]
        num_params = sum(p.numel() for p in first.model.parameters())
        plan = first._plan(batch)
        real, computed = map(sum, zip(*(plan.tokens(m) for m in range(plan.num_mini_batches))))
        base = 0 if device.type == "cuda" else host_rss_bytes()  # CPU: growth since the learners were built

        times = {name: [] for name in names}
        update_times = {name: [] for name in names}
        peaks = {"peak": 0, "log_probs": 0, "update": 0}
        last_metrics = {}
        for rep in range(args.repeats + 1):
            for name in names if rep % 2 == 0 else names[::-1]:
                learner = learners[name]
                start = time.perf_counter()
                with PeakMemory(device) as lp_mem:
                    old_log_probs = learner.compute_log_probs(batch)  # returns CPU tensors: synchronised
                mid = time.perf_counter()
                with PeakMemory(device) as up_mem:
                    last_metrics[name] = learner.update(batch.replace(old_log_probs=old_log_probs))  # host floats
                end = time.perf_counter()
                peaks["peak"] = max(peaks["peak"], lp_mem.peak_bytes - base, up_mem.peak_bytes - base)
                if rep > 0:  # the first round is warm-up
                    times[name].append(end - start)
                    update_times[name].append(end - mid)
                    peaks["log_probs"] = max(peaks["log_probs"], lp_mem.bytes)
                    peaks["update"] = max(peaks["update"], up_mem.bytes)
    dist.destroy_process_group()

    for name in names:
        print(f"{name} step times {[round(t, 3) for t in times[name]]}")
    tokens = int(batch.response_mask.sum() + batch.prompt_mask.sum())
    peak_tflops = args.peak_tflops or (H100_BF16_DENSE_TFLOPS if device.type == "cuda" else None)
    throughput = {}
    for name in names:
        update_s = statistics.median(update_times[name])
        step_s = statistics.median(times[name])
        throughput[f"{name}_step_s"] = round(step_s, 4)
        throughput[f"{name}_min_s"] = round(min(times[name]), 4)
        throughput[f"{name}_update_s"] = round(update_s, 4)
        throughput[f"{name}_update_tokens_per_s"] = round(tokens / update_s, 1)
        throughput[f"{name}_step_tokens_per_s"] = round(tokens / step_s, 1)
        if peak_tflops:
            throughput[f"{name}_mfu_update"] = round(6 * num_params * tokens / update_s / (peak_tflops * 1e12), 4)
            throughput[f"{name}_mfu_step"] = round(8 * num_params * tokens / step_s / (peak_tflops * 1e12), 4)
    main_name = "dapo" if "dapo" in names else names[0]
    comparison = {}
    if {"fipo", "dapo"} <= set(names):
        fipo_s, dapo_s = statistics.median(times["fipo"]), statistics.median(times["dapo"])
        loss_s = {name: time_loss(name, batch, args, device=device) for name in ("fipo", "dapo")}
        weights = [m["learner/influence_weights_mean"] for m in last_metrics["fipo"]]
        print(f"fipo influence_weights_mean per mini-batch (last step): {[round(w, 5) for w in weights]}")
        comparison = {
            "fipo_overhead": round(fipo_s / dapo_s - 1, 4),
            "fipo_overhead_paired_median": round(
                statistics.median(f / d - 1 for f, d in zip(times["fipo"], times["dapo"])), 4
            ),
            # the losses' own cost difference over one step's micro-batches, relative to DAPO's fastest step: an
            # estimate of the overhead that does not depend on how busy the machine was between the step timings
            "fipo_loss_overhead_est": round((loss_s["fipo"] - loss_s["dapo"]) / min(times["dapo"]), 5),
            "fipo_loss_s_per_step": round(loss_s["fipo"], 5),
            "dapo_loss_s_per_step": round(loss_s["dapo"], 5),
            "fipo_update_overhead": round(throughput["fipo_update_s"] / throughput["dapo_update_s"] - 1, 4),
        }
    print(f"update tokens/s ({main_name}): {throughput[f'{main_name}_update_tokens_per_s']}")
    print_result(
        {
            "bench": "learner",
            "update_tokens_per_s": throughput[f"{main_name}_update_tokens_per_s"],
            "mfu_update": throughput.get(f"{main_name}_mfu_update"),
            "peak_memory_gib": round(peaks["peak"] / 2**30, 3),
            "log_probs_peak_gib": round(peaks["log_probs"] / 2**30, 3),
            "update_peak_gib": round(peaks["update"] / 2**30, 3),
            "padded_fraction": 0.0 if args.packing else round(1 - real / computed, 4),
            "shared_prompt_frac": round(1 - computed / real, 4) if args.packing else 0.0,
            "packing": "on" if args.packing else "off",
            "share_prompts": "on" if args.share_prompts else "off",
            "activation_checkpointing": "on" if args.activation_checkpointing else "off",
            "logprob_chunk_tokens": args.logprob_chunk,
            "micro_batch_tokens": args.micro_batch_tokens,
            "attention_kernel": (
                "sdpa_shared_prompt"
                if args.share_prompts
                else packed_kernel(device.type, DTYPES[args.param_dtype])
                if args.packing
                else "sdpa_padded"
            ),  # fmt: skip
            "main_algorithm": main_name,
            "algorithms": names,
            **comparison,
            "repeats": args.repeats,
            "samples": args.samples,
            "mini_batches": args.samples // args.mini_batch_samples,
            "micro_batches_per_mini_batch": [len(micro) for micro in plan.for_rank(0)],
            "response_tokens": int(batch.response_mask.sum()),
            "tokens": tokens,
            "model_params": num_params,
            "model": model_config,
            "world_size": 1,
            "preset": args.preset,
            "param_dtype": args.param_dtype,
            "build_model_s": round(build_s, 1),
            "load_learners_s": round(load_s, 1),
            "backend": dist.Backend.NCCL if device.type == "cuda" else dist.Backend.GLOO,
            **throughput,
            "peak_tflops": peak_tflops,
            "commit": git_commit(),
            **device_info(),
        }
    )


if __name__ == "__main__":
    main()
