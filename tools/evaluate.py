"""avg@k / cons@k / pass@k of a Hugging Face model directory on a verl-schema dataset, without Ray.

    python -m tools.evaluate --model outputs/demo/checkpoints/step_40/hf \\
        --data outputs/demo/data/synthetic_val.jsonl --k 32 --output report.json

The engine (vLLM, or the transformers reference engine) runs in this process, the verifier in isolated child
processes (reward.ScorerPool); the estimators are orchestration/evaluation.py's, the trainer's own. Progress
goes to stderr, the report (JSON) to --output and its headline numbers to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from orchestration.cluster.env import apply_env, cluster_env
from orchestration.data.prompts import drop_long_prompts, load_datasets
from orchestration.errors import clean_exit
from orchestration.evaluation import evaluate_rows
from rollout.types import SamplingConfig


def _progress_printer(label: str) -> Callable[[int, int], None]:
    start = time.monotonic()

    def show(done: int, total: int) -> None:
        print(f"{label}: {done}/{total} problems ({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)

    return show


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.evaluate",
        description="avg@k / cons@k / pass@k of a Hugging Face model directory on a verl-schema dataset.",
    )
    p.add_argument("--model", required=True, help="Hugging Face model dir (e.g. a checkpoint's step_k/hf export)")
    p.add_argument("--data", required=True, nargs="+", help=".jsonl / .parquet file(s) in the verl schema")
    p.add_argument("--k", type=int, default=32, help="samples per problem (default 32, the paper's AIME protocol)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=0.7, help="nucleus mass (default 0.7)")
    p.add_argument("--max-response-tokens", type=int, default=1024, help="most tokens per response (default 1024)")
    p.add_argument(
        "--max-prompt-tokens", type=int, default=1024, help="longer prompts are skipped and counted (default 1024)"
    )
    p.add_argument("--workers", type=int, default=2, help="verifier processes (default 2)")
    p.add_argument("--reward-fn", default="reward.math:score_math", help="module:function (default DAPO's math)")
    p.add_argument("--reward-timeout-s", type=float, default=10.0, help="per-sample verifier limit, seconds")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    p.add_argument("--chunk-prompts", type=int, default=8, help="problems per generate call (progress grain)")
    p.add_argument("--engine", choices=("vllm", "hf", "auto"), default="auto", help="generation engine")
    p.add_argument("--dtype", default="float32", help="engine dtype (float32 on CPU; bfloat16 on a GPU)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (sample i of problem p: seed + p·k + i)")
    p.add_argument("--output", default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    if args.k < 1 or args.max_response_tokens < 1 or args.max_prompt_tokens < 1 or args.workers < 1:
        p.error("--k, --max-response-tokens, --max-prompt-tokens and --workers must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the CLI; returns the report (also written to --output)."""
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():  # vLLM's CPU build needs the CPU cluster's settings (cluster/env.py)
        apply_env(cluster_env("local_cpu"))
    from transformers import AutoTokenizer

    # after the CPU engine's environment is set (apply_env above): vLLM reads it when imported
    from reward.pool import ScorerPool
    from rollout.worker import RolloutWorker

    rows = load_datasets(args.data)
    if args.limit is not None:
        rows = rows[: args.limit]
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    rows, skipped = drop_long_prompts(rows, tokenizer, args.max_prompt_tokens, key="--max-prompt-tokens")
    sampling = SamplingConfig(
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_response_tokens,
        n=args.k,
        seed=args.seed,
    )
    start = time.monotonic()
    worker = RolloutWorker(
        args.model,
        engine=args.engine,
        dtype=args.dtype,
        max_model_len=args.max_prompt_tokens + args.max_response_tokens,
        seed=args.seed,
    )
    engine_name = type(worker.engine).__name__
    try:
        with ScorerPool(args.workers, args.reward_fn, timeout_s=args.reward_timeout_s) as scorer:
            report = evaluate_rows(
                worker,
                scorer,
                rows,
                sampling,
                chunk_prompts=args.chunk_prompts,
                on_progress=_progress_printer(f"evaluate {Path(args.model).name}"),
            )
    finally:
        worker.shutdown()
    report = {
        "model": str(args.model),
        "data": list(args.data),
        "skipped_long_prompts": len(skipped),
        "engine": engine_name,
        "sampling": dataclasses.asdict(sampling),
        "max_prompt_tokens": args.max_prompt_tokens,
        "wall_seconds": time.monotonic() - start,
    } | report
    keys = ("avg_at_k", "cons_at_k", "pass_at_k", "k", "problems", "response_length_mean", "answer_first_frac")
    headline = {k: report[k] for k in keys}
    print(json.dumps(headline), flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))
        print(f"report written to {args.output}", file=sys.stderr, flush=True)
    return report


if __name__ == "__main__":
    with clean_exit():  # a bad dataset or option: its message alone, no traceback
        main()
