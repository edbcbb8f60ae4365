"""The memory planner against the learner's real execution on the CPU (orchestration/cluster/fit.py, issue 27).

One learner rank (world size 1, float32, FSDP2 over gloo) of a model with Qwen2.5's 151,936-token vocabulary
and random weights: the planner's prediction (learner/memory_plan.py, fake tensors) of how far one update's
memory rises over what is resident before it (parameters, AdamW moments: the peak minus those) against the
peak of the tensor bytes one real update allocates (`learner.memory.AllocatedPeak`: the CPU allocator's events
recorded by torch.profiler, the CPU's counterpart of CUDA's max_memory_allocated, which is what the planner
predicts), and, for scale, the growth of the process's peak resident set over a second update
(`learner.memory.PeakMemory`: adds glibc's arenas and fragmentation). The optimizer state already exists: one
update runs first. Same config, same batch (`--samples`, 8 by default: prompts 16-64, responses tokens/8 to
tokens/2 tokens, groups of 4), all in this process, the prediction first. `--no-resident-set` skips the second
update and its resident-set growth (reported as null): the test of the planner needs only the allocated peak.

    python -m bench.plan --shape small --tokens 2048 --packing on --logprob-chunk 0

Shapes: "tiny" (hidden 256, 4 layers, 40M parameters, nearly all in the tied embedding), "small" (hidden 768,
12 layers: a 114M-parameter body, 230M in all), "qwen2.5-0.5b" (494M, conf/model/shapes). Prints one JSON line
last: predicted and measured bytes and their ratio (predicted / allocated).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import torch

from bench.common import device_info, git_commit, print_result
from orchestration.cluster.fit import SHAPES_DIR

_QWEN = {"vocab_size": 151936, "tie_word_embeddings": True, "max_position_embeddings": 32768}
SHAPES = {
    "tiny": {**_QWEN, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    "small": {**_QWEN, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
              "num_attention_heads": 12, "num_key_value_heads": 2},
}  # fmt: skip


def build_model(shape: str, directory: str) -> str:
    """A float32 model directory of `shape` with random weights (reused when already built)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    path = pathlib.Path(directory) / shape
    if (path / "model.safetensors").exists():
        return str(path)
    if shape in SHAPES:
        values = SHAPES[shape]
    else:
        values = json.loads((SHAPES_DIR / f"Qwen--Qwen2.5-{shape.split('-')[-1].upper()}.json").read_text())
        values = {k: v for k, v in values.items() if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(Qwen2Config(**values), dtype=torch.float32).save_pretrained(path)
    return str(path)


def compare(
    model_dir: str,
    *,
    tokens: int,
    packing: bool,
    chunk: int,
    checkpointing: bool = False,
    samples: int = 8,
    resident_set: bool = True,
) -> dict:
    """Predicted and measured update growth (bytes) of one rank; see the module docstring."""
    from learner.config import LearnerConfig, OptimizerConfig
    from learner.distributed import free_port, init_distributed
    from learner.memory import AllocatedPeak, PeakMemory
    from learner.memory_plan import measure_update
    from learner.synthetic import random_batch
    from learner.worker import LearnerWorker

    vocab = json.loads((pathlib.Path(model_dir) / "config.json").read_text())["vocab_size"]
    batch = random_batch(
        samples, vocab_size=vocab, prompt_len=(16, 64), response_len=(tokens // 8, tokens // 2), seed=0
    )
    config = LearnerConfig(
        model_dir=model_dir, mini_batch_samples=samples, micro_batch_tokens=tokens, policy_loss="fipo",
        logprob_chunk_tokens=chunk, packing=packing, share_prompts=False, activation_checkpointing=checkpointing,
        optimizer=OptimizerConfig(lr=1e-6),
    )  # fmt: skip
    start = time.perf_counter()
    plan = measure_update(config, 1, batch)
    plan_s = time.perf_counter() - start
    resident = sum(plan.parts.get(k, 0) for k in ("params", "optimizer", "buffers"))
    predicted = plan.peak - resident
    init_distributed(0, 1, "127.0.0.1", free_port(), timeout_s=600)
    worker = LearnerWorker(config)
    batch = batch.replace(old_log_probs=worker.compute_log_probs(batch))
    worker.update(batch)  # the optimizer state exists from here on, as in the plan
    with AllocatedPeak() as allocated:
        worker.update(batch)
    rss_growth = None
    if resident_set:
        with PeakMemory("cpu") as peak_resident:
            worker.update(batch)
        rss_growth = peak_resident.bytes
    return {
        "predicted_bytes": predicted,
        "measured_bytes": allocated.bytes,
        "ratio": predicted / allocated.bytes,
        "rss_growth_bytes": rss_growth,
        "predicted_parts": plan.parts,
        "micro_batch_positions": plan.micro_batch_positions,
        "plan_s": plan_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=[*SHAPES, "qwen2.5-0.5b"])
    parser.add_argument("--tokens", type=int, default=2048, help="learner.micro_batch_tokens")
    parser.add_argument("--packing", choices=("on", "off"), default="on")
    parser.add_argument("--logprob-chunk", type=int, default=0, help="tokens per LM-head chunk (0: all at once)")
    parser.add_argument("--activation-checkpointing", choices=("on", "off"), default="off")
    parser.add_argument("--samples", type=int, default=8, help="samples of the one mini-batch (a multiple of 4)")
    parser.add_argument("--no-resident-set", action="store_true", help="skip the resident-set update")
    parser.add_argument("--model-cache", default=os.environ.get("BENCH_MODEL_CACHE", "/tmp/bench_plan_models"))
    args = parser.parse_args()
    model_dir = build_model(args.shape, args.model_cache)
    result = compare(
        model_dir, tokens=args.tokens, packing=args.packing == "on", chunk=args.logprob_chunk,
        checkpointing=args.activation_checkpointing == "on", samples=args.samples,
        resident_set=not args.no_resident_set,
    )  # fmt: skip
    rss = result["rss_growth_bytes"]
    print(
        f"{args.shape}: predicted growth {result['predicted_bytes'] / 2**20:.0f} MiB, allocated "
        f"{result['measured_bytes'] / 2**20:.0f} MiB, ratio {result['ratio']:.3f}"
        + (f" (resident set grew {rss / 2**20:.0f} MiB)" if rss is not None else ""),
        flush=True,
    )
    print_result({"bench": "plan", **vars(args), **result, "commit": git_commit(), **device_info()})


if __name__ == "__main__":
    main()
