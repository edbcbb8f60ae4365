"""Rollout throughput: the RolloutGroup (R=1 Ray actor hosting vLLM) against plain `vllm.LLM.generate`.

Both generate the same prompts (chat prompts rendered once, passed as token ids to raw vLLM) with the same
engine settings and sampling settings (temperature 1, fixed length via ignore_eos, per-request seeds, per-token
log-probs requested in both: the system always asks for them, so the baseline does too). Each side is warmed
up, then timed `--repeats` times, alternating. `ratio` uses the best run of each (the machine is shared: the
best run is the least disturbed); the ratio of medians and the median ratio of back-to-back (raw, system)
pairs are printed too, with throughput per CPU second (driver + actor process CPU time for the system, the
driver's for raw vLLM) and the 1-minute load average. It also checks the system's log-probs against a
transformers forward pass and times one weight update through the object store (one tensor per bucket).
Prints one JSON line last.

    python -m bench.rollout [--num-prompts 16] [--n 4] [--max-tokens 128] [--repeats 7]
"""

from __future__ import annotations

from orchestration.cluster.env import use_local_defaults

use_local_defaults()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

MODEL_CONFIG = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 1024,
    "max_position_embeddings": 2048,
}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except OSError:
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "none (no commits yet)"


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import ray
    import torch
    import vllm
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from rollout.engine import render_prompts
    from rollout.group import RolloutGroup
    from rollout.reference import load_reference_model, max_abs_log_prob_error, perturbed_state_dict
    from rollout.tiny import build_tiny_model
    from rollout.types import SamplingConfig

    model_dir = build_tiny_model(pathlib.Path(tempfile.gettempdir()) / "bench_rollout_model", **MODEL_CONFIG)
    max_model_len = 512
    prompts = [
        [{"role": "user", "content": f"Problem {i}: compute {i} * {i + 3} and explain each step."}]
        for i in range(args.num_prompts)
    ]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = render_prompts(tokenizer, prompts)
    sampling = SamplingConfig(n=args.n, max_tokens=args.max_tokens, ignore_eos=True, seed=0)
    raw_params = SamplingParams(n=args.n, max_tokens=args.max_tokens, ignore_eos=True, seed=0, logprobs=0)
    warm_prompts, warm_sampling = prompts[:4], SamplingConfig(n=2, max_tokens=16, ignore_eos=True)

    # The engine settings VLLMEngine uses on CPU (chunked prefill off: see rollout/engine.py).
    llm = LLM(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=max_model_len,
        seed=0,
        enable_chunked_prefill=False,
        max_num_batched_tokens=8192,
    )
    llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids[:4]], SamplingParams(max_tokens=16), use_tqdm=False)

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    group = RolloutGroup(
        model_dir, 1, engine_kwargs={"dtype": "float32", "max_model_len": max_model_len}, timeout_s=600
    )
    try:
        group.generate(warm_prompts, warm_sampling)

        raw_runs, system_runs, raw_cpu_runs, system_cpu_runs, samples = [], [], [], [], None
        worker = group.workers[0]
        for _ in range(args.repeats):
            cpu, start = time.process_time(), time.perf_counter()
            outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], raw_params, use_tqdm=False)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
            raw_runs.append(tokens / seconds)
            raw_cpu_runs.append(tokens / cpu)

            worker_cpu = ray.get(worker.info.remote())["cpu_seconds"]
            cpu, start = time.process_time(), time.perf_counter()
            samples = group.generate(prompts, sampling)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            cpu += ray.get(worker.info.remote())["cpu_seconds"] - worker_cpu  # driver + actor CPU time
            tokens = sum(len(s.response_ids) for s in samples)
            system_runs.append(tokens / seconds)
            system_cpu_runs.append(tokens / cpu)

        reference = load_reference_model(model_dir)
        checked = samples[:: max(1, len(samples) // 16)]  # 16 samples spread over the batch
        logprob_diff = max_abs_log_prob_error(reference, checked)

        state = perturbed_state_dict(model_dir, seed=1)
        refs = [ray.put([(name, tensor)]) for name, tensor in state.items()]
        update = group.update_weights(refs, policy_version=1)[0]
    finally:
        group.shutdown()
        ray.shutdown()
        llm.llm_engine.engine_core.shutdown()

    system, raw = max(system_runs), max(raw_runs)
    result = {
        "bench": "rollout",
        "system_tokens_per_s": round(system, 1),
        "raw_vllm_tokens_per_s": round(raw, 1),
        "ratio": round(system / raw, 3),
        "ratio_of_medians": round(statistics.median(system_runs) / statistics.median(raw_runs), 3),
        "ratio_median_of_pairs": round(statistics.median(s / r for s, r in zip(system_runs, raw_runs)), 3),
        "max_abs_logprob_diff_vs_hf": logprob_diff,
        "system_runs_tokens_per_s": [round(x, 1) for x in system_runs],
        "raw_runs_tokens_per_s": [round(x, 1) for x in raw_runs],
        "system_tokens_per_cpu_s": round(max(system_cpu_runs), 1),
        "raw_vllm_tokens_per_cpu_s": round(max(raw_cpu_runs), 1),
        "ratio_cpu_time": round(max(system_cpu_runs) / max(raw_cpu_runs), 3),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "weight_update_bytes": update["bytes"],
        "weight_update_s": round(update["seconds"], 3),
        "weight_update_buckets": update["num_buckets"],
        "device": device_name(),
        "engine": f"vllm {vllm.__version__}, in-process, float32, enforce_eager, no chunked prefill",
        "torch": torch.__version__,
        "model": MODEL_CONFIG | {"params": sum(t.numel() for t in state.values())},
        "num_workers": 1,
        "num_prompts": args.num_prompts,
        "n": args.n,
        "max_tokens": args.max_tokens,
        "tokens_per_run": sum(len(s.response_ids) for s in samples),
        "repeats": args.repeats,
        "git_commit": git_commit(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
