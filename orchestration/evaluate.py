"""Evaluation: avg@k / cons@k / pass@k of a model on a dataset, and the `python -m orchestration.evaluate` CLI.

`evaluate_rows` is the one evaluation function: the trainer's periodic evaluation (orchestration/steps.py)
calls it with the run's rollout workers and reward service; the CLI calls it with an in-process engine and
the in-process reward pool. For each problem it samples k responses, scores them, and reports

    avg@k   mean over problems of (correct samples / k)          (= pass@1 averaged over k samples)
    cons@k  fraction of problems whose majority extracted answer is correct (samples without an answer
            do not vote)
    pass@k  the unbiased estimator 1 − C(n−c, k)/C(n, k) with n = k (the fraction of problems solved at least
            once)

and the mean response length in tokens (FIPO_SPEC §7: the paper's AIME protocol is k = 32, temperature 1.0,
top-p 0.7, the CLI's defaults).

    python -m orchestration.evaluate --model outputs/demo/checkpoints/step_40/hf \\
        --data outputs/demo/data/synthetic_val.jsonl --k 32 --output report.json

The CLI needs no Ray: the engine (vLLM, or the transformers reference engine) runs in this process, the
verifier in isolated child processes (reward.ScorerPool). Progress goes to stderr, the report (JSON) to
--output and its headline numbers to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from orchestration.data import DataError, PromptRow, drop_long_prompts, load_datasets
from orchestration.env import apply_env, cluster_env
from orchestration.errors import clean_exit
from orchestration.eval_metrics import EVAL_METRIC_KEYS, majority_correct, pass_at_k, summarize
from orchestration.tasks import SOURCES, habit_of, habit_stats
from reward.extract import answers_at_once
from rollout.engine import PromptTooLongError
from rollout.types import Sample, SamplingConfig

TASK_SOURCES = frozenset(SOURCES.values())  # rows of the built-in tasks: their responses' habits are reported


def habit_records(
    rows: Sequence[PromptRow], samples: Sequence[Sample], results: Sequence
) -> list[tuple[str, bool, int]]:
    """(habit, correct, response tokens) of every sample whose row is a built-in task's (for habit_stats); samples
    of other data are left out. `results[i]` scores `samples[i]`, whose prompt is `rows[sample.prompt_index]`."""
    return [
        (habit_of(s.text), bool(r.correct), len(s.response_ids))
        for s, r in zip(samples, results)
        if rows[s.prompt_index].data_source in TASK_SOURCES
    ]


class Generator(Protocol):
    """What evaluation samples from: rollout.RolloutGroup (Ray) or rollout.RolloutWorker (in process)."""

    def generate(self, prompts: Sequence[Any], sampling: SamplingConfig) -> list[Sample]: ...


class Scorer(Protocol):
    """What evaluation scores with: reward.RewardService (Ray) or reward.ScorerPool (in process)."""

    def score_batch(self, responses: Sequence[str], ground_truths: Sequence[str], extras: Sequence[dict]) -> list: ...


def generate_rows(generator: Generator, rows: Sequence[PromptRow], sampling: SamplingConfig) -> list[Sample]:
    """`generator.generate` of the rows' prompts; a prompt the engines cannot fit is a DataError naming its row
    (its file and line), never a crash inside vLLM (the loader's data.max_prompt_tokens filter counted it with
    the driver's tokenizer and chat template: the engines' differ)."""
    try:
        return generator.generate([list(r.messages) for r in rows], sampling)
    except PromptTooLongError as err:
        raise DataError(
            f"{rows[err.index].source}: the prompt has {err.prompt_tokens} tokens as the engine renders it; with "
            f"rollout.max_response_tokens={err.max_tokens} it does not fit the engines' context of "
            f"{err.max_model_len} tokens (data.max_prompt_tokens + rollout.max_response_tokens). The data loader "
            "counted it within data.max_prompt_tokens: the engines' tokenizer or chat template differs from the "
            "driver's (model.path)"
        ) from None


def score_rows(scorer: Scorer, rows: Sequence[PromptRow], samples: Sequence[Sample]) -> list:
    """Reward every sample against its prompt's ground truth (and the row's extra fields)."""
    return scorer.score_batch(
        [s.text for s in samples],
        [rows[s.prompt_index].ground_truth for s in samples],
        [rows[s.prompt_index].extra for s in samples],
    )


def evaluate_rows(
    generator: Generator,
    scorer: Scorer,
    rows: Sequence[PromptRow],
    sampling: SamplingConfig,
    *,
    chunk_prompts: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """avg@k / cons@k / pass@k (k = sampling.n) of `generator` on `rows`, scored by `scorer`.

    chunk_prompts: generate and score this many problems per call (None: all in one call). Results do not
        depend on it: chunk c's sampling seed is offset so that every sample keeps the seed it would have
        in a single call (sample i of problem p: sampling.seed + p·k + i).
    on_progress:   called with (problems done, problems total) after every chunk.
    Returns the metrics `avg_at_k`, `cons_at_k`, `pass_at_k`, `k`, `problems`, `samples`,
    `response_length_mean` (tokens), `truncated_frac` (finish reason "length"), `no_answer_frac` (nothing
    extracted), `answer_first_frac` (responses that answer with no reasoning before it,
    reward.extract.answers_at_once), `answer_first_accuracy` and `reasoned_accuracy` (the accuracy of those
    responses and of all others; None when there are none), `habits`: on the built-in tasks' rows, the share,
    accuracy and length of each way of writing the solution (orchestration.tasks.habit_stats; {} on other
    data), and `per_problem`: [{source, ground_truth, correct (count), majority_answer, majority_correct,
    pass_at_k}] in row order.
    """
    if not rows:
        raise ValueError("evaluate_rows: no problems")
    k = sampling.n
    chunk = chunk_prompts or len(rows)
    problems: list[tuple[list[str | None], list[bool]]] = []
    lengths: list[int] = []
    at_once: list[tuple[bool, bool]] = []  # (answered at once, correct) per sample
    habits: list[tuple[str, bool, int]] = []  # (habit, correct, tokens) per sample of the built-in tasks
    truncated = 0
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        seed = None if sampling.seed is None else sampling.seed + start * k
        samples = generate_rows(generator, part, dataclasses.replace(sampling, seed=seed))
        results = score_rows(scorer, part, samples)
        chunk_problems: list[tuple[list[str | None], list[bool]]] = [([], []) for _ in part]
        for sample, result in zip(samples, results):
            chunk_problems[sample.prompt_index][0].append(result.extracted)
            chunk_problems[sample.prompt_index][1].append(bool(result.correct))
            lengths.append(len(sample.response_ids))
            at_once.append((answers_at_once(sample.text), bool(result.correct)))
            truncated += sample.finish_reason == "length"
        problems.extend(chunk_problems)
        habits += habit_records(part, samples, results)
        if on_progress is not None:
            on_progress(len(problems), len(rows))
    summary = summarize(problems, k)
    per_problem = []
    for row, (answers, correct) in zip(rows, problems):
        votes = [a for a in answers if a is not None]
        per_problem.append(
            {
                "source": row.source,
                "ground_truth": row.ground_truth,
                "correct": sum(correct),
                "majority_answer": max(votes, key=votes.count) if votes else None,
                "majority_correct": majority_correct(answers, correct),
                "pass_at_k": pass_at_k(len(correct), sum(correct), k),
            }
        )
    answers_all = [a for answers, _ in problems for a in answers]
    return {
        "avg_at_k": summary["avg_at_k"],
        "cons_at_k": summary["cons_at_k"],
        "pass_at_k": summary["pass_at_k"],
        "k": k,
        "problems": len(rows),
        "samples": len(lengths),
        "response_length_mean": sum(lengths) / len(lengths),
        "truncated_frac": truncated / len(lengths),
        "no_answer_frac": sum(a is None for a in answers_all) / len(answers_all),
        "answer_first_frac": sum(first for first, _ in at_once) / len(at_once),
        "answer_first_accuracy": _mean([correct for first, correct in at_once if first]),
        "reasoned_accuracy": _mean([correct for first, correct in at_once if not first]),
        "habits": habit_stats(habits),
        "per_problem": per_problem,
    }


def _mean(values: Sequence[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def eval_metrics(report: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """The numeric headline of a report as flat metrics (eval/avg_at_k, ..., see EVAL_METRIC_KEYS); a value
    that is None (e.g. the accuracy of answer-first responses when there were none) is left out; the habits'
    statistics follow as <prefix>habit/<habit>_frac, _accuracy, _length."""
    out = {f"{prefix}{key}": float(report[key]) for key in EVAL_METRIC_KEYS if report.get(key) is not None}
    return out | {f"{prefix}habit/{key}": value for key, value in report.get("habits", {}).items()}


def _progress_printer(label: str) -> Callable[[int, int], None]:
    start = time.monotonic()

    def show(done: int, total: int) -> None:
        print(f"{label}: {done}/{total} problems ({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)

    return show


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m orchestration.evaluate",
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

    if not torch.cuda.is_available():  # vLLM's CPU build needs the CPU cluster's settings (orchestration/env.py)
        apply_env(cluster_env("local_cpu"))
    from transformers import AutoTokenizer

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
