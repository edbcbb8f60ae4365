"""Evaluation: avg@k / cons@k / pass@k of a model on a dataset (FIPO_SPEC §7: avg@32, cons@32, pass@32).

`evaluate_rows` is the one evaluation function: the trainer's periodic evaluation (orchestration/steps.py)
calls it with the run's rollout workers and reward service; the CLI (`python -m tools.evaluate`) calls it with
an in-process engine and the in-process reward pool. For each problem it samples k responses, scores them, and
reports

    avg@k   mean over problems of (correct samples / k)          (= pass@1 averaged over k samples)
    cons@k  fraction of problems whose majority extracted answer is correct (samples without an answer
            do not vote)
    pass@k  the unbiased estimator 1 − C(n−c, k)/C(n, k) with n = k (the fraction of problems solved at least
            once)

and the mean response length in tokens (the paper's AIME protocol is k = 32, temperature 1.0, top-p 0.7, the
CLI's defaults).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from math import comb
from typing import Any, Protocol

from orchestration.data.prompts import DataError, PromptRow
from orchestration.data.tasks import SOURCES, habit_of, habit_stats
from reward.extract import answers_at_once
from rollout.engine import PromptTooLongError
from rollout.types import Sample, SamplingConfig

# The headline numbers of an evaluation report that become flat metrics (eval/<key>), in this order.
EVAL_METRIC_KEYS = (
    "avg_at_k",
    "cons_at_k",
    "pass_at_k",
    "response_length_mean",
    "answer_first_frac",
    "answer_first_accuracy",
    "reasoned_accuracy",
)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 − C(n − c, k) / C(n, k) for n samples of which c are correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """cons@k for one problem: is the most frequent extracted answer a correct one?

    Samples with no extracted answer do not vote. Ties are broken by the answer that appears first, so the
    verdict does not depend on dict ordering.
    """
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    top = max(votes.values())
    first = next(a for a in answers if a is not None and votes[a] == top)
    return any(ok for a, ok in zip(answers, correct) if a == first)


def summarize(problems: Sequence[tuple[Sequence[str | None], Sequence[bool]]], k: int) -> dict[str, float]:
    """avg@k (mean pass@1 over the k samples), cons@k (majority vote), pass@k (unbiased), over problems.

    problems: for each problem, (extracted answers, correctness) of its n >= k samples.
    """
    if not problems:
        raise ValueError("no problems to summarize")
    avg, cons, passk = 0.0, 0.0, 0.0
    for answers, correct in problems:
        n, c = len(correct), sum(bool(x) for x in correct)
        avg += c / n
        cons += float(majority_correct(answers, correct))
        passk += pass_at_k(n, c, k)
    m = len(problems)
    return {"avg_at_k": avg / m, "cons_at_k": cons / m, "pass_at_k": passk / m, "k": float(k), "problems": float(m)}


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
    accuracy and length of each way of writing the solution (orchestration.data.tasks.habit_stats; {} on other
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
        "per_problem": per_problem(rows, problems, k),
    }


def per_problem(
    rows: Sequence[PromptRow], problems: Sequence[tuple[Sequence[str | None], Sequence[bool]]], k: int
) -> list[dict[str, Any]]:
    """The report's per-problem lines, in row order: source, ground truth, correct samples, the majority answer
    and whether it is correct, pass@k; `problems[i]` = (extracted answers, correctness) of row i's samples."""
    lines = []
    for row, (answers, correct) in zip(rows, problems):
        votes = [a for a in answers if a is not None]
        lines.append(
            {
                "source": row.source,
                "ground_truth": row.ground_truth,
                "correct": sum(correct),
                "majority_answer": max(votes, key=votes.count) if votes else None,
                "majority_correct": majority_correct(answers, correct),
                "pass_at_k": pass_at_k(len(correct), sum(correct), k),
            }
        )
    return lines


def _mean(values: Sequence[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def eval_metrics(report: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """The numeric headline of a report as flat metrics (eval/avg_at_k, ..., see EVAL_METRIC_KEYS); a value
    that is None (e.g. the accuracy of answer-first responses when there were none) is left out; the habits'
    statistics follow as <prefix>habit/<habit>_frac, _accuracy, _length."""
    out = {f"{prefix}{key}": float(report[key]) for key in EVAL_METRIC_KEYS if report.get(key) is not None}
    return out | {f"{prefix}habit/{key}": value for key, value in report.get("habits", {}).items()}
