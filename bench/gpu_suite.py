"""The project's GPU measurements in one command, for the GPU machine (one H100/H200; torch, triton and
transformers; no vLLM, no Ray, no Hydra needed), within a ~6-minute budget. Issue 14's stages come first:

1. env            GPU, driver, torch / CUDA / triton / transformers versions (nvidia-smi, python).
2. learner_tests  tests/test_learner_packing.py and the FIPO = DAPO test of tests/test_learner.py on the GPU
                  (NCCL, world size 1): the packed / chunked / checkpointed / sharded-loaded learner against the
                  padded reference path and float64 references, FIPO = DAPO bitwise, and the CUDA varlen
                  attention kernel against per-sample SDPA (bf16, grouped-query heads; its only test).
3. learner        bench/learner.py, Qwen2.5-0.5B-sized random model, bf16, packed 16384-token micro-batches:
                  update tokens/s (goal ≥ 32k), MFU, peak memory, FIPO overhead over DAPO (goal ≤ 0.02).
4. learner_3b_ac  Qwen2.5-3B-sized, 16384-token micro-batches, activation checkpointing on (goal: fits, MFU ≥ 0.3).
5. learner_3b     the same without activation checkpointing (goal: fits, MFU ≥ 0.3).
6. learner_7b_ac  Qwen2.5-7B-sized, 16384-token micro-batches, activation checkpointing on (goal: trains).
7. learner_05b_padded  stage 3's model with the old layout (padded, full logits, 4096-token micro-batches):
                  the before number in the same run.
Then, while the budget lasts, issue 9's stages (measured before, at commit 45f0269):
8. kernel_tests   tests/test_future_sum_triton.py compiled on the GPU (kernel vs float64 recurrence, rel ≤ 1e-6).
9. future_kl      bench/future_kl.py on CUDA at [256, 20480]: Triton kernel GB/s vs the device's copy GB/s.
10. rollout       rollout/hf_engine.py's HFEngine on cuda (bf16 and float32): log-probs vs a teacher-forced
                  forward pass, and a weight update through `update_weights`.

Each stage runs as its own subprocess with a time limit (and is skipped when too little budget is left); a
failing stage is recorded and the suite goes on. Everything goes to OUT_DIR: gpu_suite.log (all output) and
gpu_suite.json (every stage's last JSON line, return code and seconds). The last lines printed are a summary
table. The learner stages share a model cache under /tmp (removed at the end).

    python3 -m bench.gpu_suite --out "$OUT" [--label "<commit>"] [--budget-s 350]
    python3 -m bench.gpu_suite rollout-sanity       # stage 10 alone (what the suite runs as a subprocess)
    python -m bench.gpu_suite --smoke --out /tmp/suite_smoke   # a CPU check of this script (tiny stages)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def last_json(text: str) -> dict | None:
    """The last line of `text` that parses as a JSON object (the benchmarks' result line)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


class Suite:
    def __init__(self, out_dir: pathlib.Path, budget_s: float, label: str) -> None:
        self.out_dir = out_dir
        self.deadline = time.monotonic() + budget_s
        self.log = open(out_dir / "gpu_suite.log", "w")  # noqa: SIM115 (closed in finish)
        self.results: dict = {"label": label, "stages": {}}

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, argv: list[str], timeout_s: float, env: dict | None = None) -> dict:
        """Run one stage; record rc, seconds, its last JSON line and the tail of its output."""
        timeout_s = max(5.0, min(timeout_s, self.remaining()))
        header = f"\n===== {name}: {' '.join(argv)} (limit {timeout_s:.0f} s)\n"
        print(header, end="", flush=True)
        self.log.write(header)
        start = time.monotonic()
        try:
            proc = subprocess.run(
                argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, env={**os.environ, **(env or {})}
            )
            rc, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as error:
            rc = "timeout"
            output = (error.stdout or b"").decode(errors="replace") if isinstance(error.stdout, bytes) else ""
            output += (error.stderr or b"").decode(errors="replace") if isinstance(error.stderr, bytes) else ""
        seconds = round(time.monotonic() - start, 1)
        self.log.write(output)
        self.log.flush()
        print(output[-3000:], flush=True)
        stage = {"rc": rc, "seconds": seconds, "result": last_json(output), "argv": argv, "output_tail": output[-4000:]}
        self.results["stages"][name] = stage
        self.save()
        return stage

    def skip(self, name: str, reason: str) -> None:
        print(f"\n===== {name}: skipped ({reason})", flush=True)
        self.results["stages"][name] = {"rc": "skipped", "seconds": 0.0, "result": None, "reason": reason}
        self.save()

    def save(self) -> None:
        (self.out_dir / "gpu_suite.json").write_text(json.dumps(self.results, indent=1, default=str))

    def finish(self) -> None:
        self.save()
        self.log.close()
        print("\n===== summary")
        for name, stage in self.results["stages"].items():
            result = stage.get("result") or {}
            keys = SUMMARY_KEYS.get(name, ())
            picked = {k: result[k] for k in keys if k in result}
            print(f"{name:14s} rc={stage['rc']!s:8s} {stage['seconds']:6.1f}s {json.dumps(picked, default=str)}")


SUMMARY_KEYS = {
    "env": ("device", "torch", "cuda", "triton", "transformers", "driver"),
    "kernel_tests": ("passed", "failed", "skipped", "error"),
    "future_kl": (
        "triton_gbps_vs_copy",
        "triton_masked_gbps_vs_copy",
        "copy_1gib_gbps",
        "triton_best",
        "triton_speedup_vs_official",
        "triton_rel_err_vs_float64",
    ),
    "learner_tests": ("passed", "failed", "skipped", "error"),
    **dict.fromkeys(
        ("learner", "learner_3b_ac", "learner_3b", "learner_7b_ac", "learner_05b_padded", "learner_qwen_vocab"),
        (
            "update_tokens_per_s",
            "mfu_update",
            "peak_memory_gib",
            "padded_fraction",
            "attention_kernel",
            "activation_checkpointing",
            "fipo_overhead",
            "fipo_update_overhead",
        ),
    ),
    "rollout": ("ok", "bf16_tokens_per_s", "fp32_max_abs_logprob_diff", "bf16_max_abs_logprob_diff"),
}


ENV_SCRIPT = r"""
import json, subprocess, torch, platform
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
for name in ("triton", "transformers", "pytest", "hypothesis", "ray", "hydra", "vllm"):
    try:
        info[name] = __import__(name).__version__
    except Exception as error:
        info[name] = f"missing ({type(error).__name__})"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                capability=f"{p.major}.{p.minor}")
    try:
        info["nccl"] = str(torch.cuda.nccl.version())
    except Exception as error:
        info["nccl"] = f"unknown ({error})"
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    info["nvidia_smi"] = smi
    info["driver"] = smi.split(",")[1].strip() if "," in smi else smi
except Exception as error:
    info["nvidia_smi"] = f"failed ({error})"
print(json.dumps(info))
"""


def pytest_counts(stage: dict) -> dict:
    """{"passed": n, "failed": n, ...} from the tail of a pytest run's output."""
    tail = stage["output_tail"][-400:]
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", tail)}


# (name, bench.learner arguments, time limit s, least budget left to start it s)
LEARNER_STAGES = [
    ("learner", ["--preset", "qwen2.5-0.5b", "--samples", "32", "--mini-batch-samples", "8",
                 "--repeats", "5"], 120, 60),
    ("learner_3b_ac", ["--preset", "qwen2.5-3b", "--samples", "64", "--mini-batch-samples", "16",
                       "--algorithms", "dapo", "--activation-checkpointing", "on", "--repeats", "2"], 150, 90),
    ("learner_3b", ["--preset", "qwen2.5-3b", "--samples", "64", "--mini-batch-samples", "16",
                    "--algorithms", "dapo", "--activation-checkpointing", "off", "--repeats", "2"], 120, 70),
    ("learner_7b_ac", ["--preset", "qwen2.5-7b", "--samples", "32", "--mini-batch-samples", "16",
                       "--algorithms", "dapo", "--activation-checkpointing", "on", "--repeats", "2"], 200, 120),
    ("learner_05b_padded", ["--preset", "qwen2.5-0.5b", "--samples", "32", "--mini-batch-samples", "8",
                            "--algorithms", "dapo", "--packing", "off", "--logprob-chunk", "0",
                            "--micro-batch-tokens", "4096", "--repeats", "3"], 90, 50),
]  # fmt: skip


def suite(args) -> int:
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    s = Suite(out_dir, args.budget_s, args.label)
    py = sys.executable
    env = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "0"}
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    cache = tempfile.mkdtemp(prefix="bench_models_")

    s.run("env", [py, "-c", ENV_SCRIPT], 60, env)
    learner_tests = [
        "tests/test_learner_packing.py",
        "tests/test_learner.py::test_fipo_first_mini_batch_is_exactly_dapo",
    ]
    stage = s.run("learner_tests", pytest + learner_tests, 150, env)
    stage["result"] = pytest_counts(stage)
    bench = [py, "-m", "bench.learner", "--model-cache", cache]
    if args.smoke:  # a CPU check of this script: tiny sizes, the kernel under TRITON_INTERPRET=1
        s.run("learner", bench + ["--repeats", "1", "--samples", "16"], 150, env)
        s.run("learner_qwen_vocab", bench + ["--preset", "tiny-qwen-vocab", "--algorithms", "dapo", "--repeats",
                                             "1", "--samples", "16", "--logprob-chunk", "128"], 150, env)  # fmt: skip
    else:
        gpu = ["--param-dtype", "bfloat16", "--threads", "8", "--response-len", "2048", "--micro-batch-tokens", "16384"]
        for name, extra, limit, least in LEARNER_STAGES:
            if s.remaining() < least:
                s.skip(name, f"{s.remaining():.0f} s of budget left, needs {least}")
                continue
            s.run(name, bench + gpu + extra, limit, env)
    shutil.rmtree(cache, ignore_errors=True)

    if s.remaining() > 60:
        tests = s.run("kernel_tests", pytest + ["tests/test_future_sum_triton.py"], 150, env)
        tests["result"] = pytest_counts(tests)
    if s.remaining() > 30:
        if args.smoke:
            kl = ["--device", "cpu", "--smoke", "--batch", "4", "--length", "3000", "--repeats", "2"]
            s.run("future_kl", [py, "-m", "bench.future_kl", *kl], 150, {**env, "TRITON_INTERPRET": "1"})
        else:
            s.run("future_kl", [py, "-m", "bench.future_kl", "--repeats", "30"], 150, env)
    if s.remaining() > 30:
        s.run("rollout", [py, "-m", "bench.gpu_suite", "rollout-sanity"], 90, env)
    s.finish()
    return 0


def rollout_sanity() -> None:
    """Stage 10: HFEngine on cuda. Prints one JSON line."""
    import torch

    from bench.common import device_info
    from rollout.hf_engine import HFEngine
    from rollout.tiny import build_tiny_model
    from rollout.types import SamplingConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)  # the CPU smoke run: OpenMP threads on a busy shared CPU stall
    prompts = [[{"role": "user", "content": f"What is {i} + {i}?"}] for i in range(8)]
    sampling = SamplingConfig(n=4, max_tokens=64, temperature=1.0, ignore_eos=True, seed=0)
    result: dict = {"bench": "rollout_hf_gpu", "device_kind": device, "prompts": len(prompts), "n": sampling.n}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(
            f"{tmp}/model", hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=1024,
        )  # fmt: skip
        ok = True
        for dtype in ("float32", "bfloat16"):
            tag = "fp32" if dtype == "float32" else "bf16"
            engine = HFEngine(model_dir, dtype=dtype, device=device, seed=0)
            engine.generate(prompts[:1], SamplingConfig(n=2, max_tokens=4, seed=0))  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            samples = engine.generate(prompts, sampling)
            seconds = time.perf_counter() - start
            tokens = sum(len(x.response_ids) for x in samples)
            # teacher-forced forward pass over prompt + response: the engine's log-probs must match
            worst = 0.0
            with torch.no_grad():
                for sample in samples[:8]:
                    ids = torch.tensor([list(sample.prompt_ids) + list(sample.response_ids)], device=device)
                    logits = engine.model(input_ids=ids).logits[0, len(sample.prompt_ids) - 1 : -1].float()
                    want = torch.log_softmax(logits, -1).gather(-1, ids[0, len(sample.prompt_ids) :, None])[:, 0]
                    worst = max(worst, (want.cpu() - sample.log_probs).abs().max().item())
            tol = 1e-3 if dtype == "float32" else 0.1  # bf16: KV-cached vs full forward differ by bf16 rounding
            ok &= len(samples) == len(prompts) * sampling.n and tokens == len(samples) * sampling.max_tokens
            ok &= worst <= tol
            result[f"{tag}_tokens"] = tokens
            result[f"{tag}_seconds"] = round(seconds, 3)
            result[f"{tag}_tokens_per_s"] = round(tokens / seconds, 1)
            result[f"{tag}_max_abs_logprob_diff"] = worst
            if dtype == "float32":  # a weight push: the model's own weights, perturbed, then restored
                state = {k: v.detach().clone() for k, v in engine.model.state_dict().items()}
                engine.update_weights([(k, v * 0.5) for k, v in state.items()], policy_version=1)
                changed = engine.model.get_parameter("lm_head.weight").float().abs().sum().item()
                engine.update_weights(list(state.items()), policy_version=2)
                restored = engine.model.get_parameter("lm_head.weight").float().abs().sum().item()
                result["weight_update_ok"] = bool(abs(changed * 2 - restored) <= 1e-3 * restored)
                result["policy_version"] = engine.policy_version
                ok &= result["weight_update_ok"] and engine.policy_version == 2
            engine.shutdown()
        result["ok"] = bool(ok)
    result.update(device_info())
    print(json.dumps(result, default=str), flush=True)
    if not ok:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", choices=("suite", "rollout-sanity"), default="suite")
    parser.add_argument("--out", default=os.environ.get("OUT", "outputs/gpu_suite"), help="results folder")
    parser.add_argument("--budget-s", type=float, default=350.0, help="wall-clock budget of the whole suite")
    parser.add_argument("--label", default="", help="free text stored in the results (e.g. the git commit)")
    parser.add_argument("--smoke", action="store_true", help="CPU check of this script: tiny stages, no GPU needed")
    args = parser.parse_args()
    if args.command == "rollout-sanity":
        rollout_sanity()
    else:
        raise SystemExit(suite(args))


if __name__ == "__main__":
    main()
