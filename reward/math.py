"""`score_math`: the default reward function (DAPO's outcome reward for math answers).

Order of decisions for one response (first that applies wins):
  1. Extract the answer from the last 300 characters: the last "Answer:" line, else the last `\\boxed{}`
     (`reward.extract`). No answer -> wrong (status "ok", extracted None).
  2. Normalise prediction and ground truth alike (`reward.extract.normalize_answer`).
  3. Cheap checks, no sympy: equal normalised strings -> correct; both exact numbers (integers with any
     leading zeros, decimals, integer fractions) -> correct iff equal as rationals (so 0.5 == \\frac{1}{2},
     but 0.3333 != 1/3).
  4. Otherwise math-verify: both sides parsed as LaTeX (`$...$`, LaTeX extraction only) and compared with
     `math_verify.verify` (equivalent expressions, sets, intervals, ...). The ground truth's parse is cached.

Scores: +1 correct, -1 wrong (DAPO); `wrong_score=0.0` (or `score_math_binary`) gives the 1/0 scheme.

Security and limits: the response is untrusted text. It is only ever parsed: only its last `tail_chars`
characters are read, the answer is therefore at most that long, and math-verify's expression extraction
(which goes through sympy's `parse_expr`, an `eval`) is never used, only its LaTeX grammar (ANTLR). This
function sets no time limit of its own (math-verify's SIGALRM timeouts are off, because a timeout there would
come back disguised as a wrong answer): run it under `reward.pool.IsolatedScorer`, which enforces one.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from math_verify import LatexExtractionConfig, parse, verify

from reward.extract import (
    DAPO_TAIL_CHARS,
    as_exact_number,
    compare_key,
    extract_answer,
    normalize_answer,
)
from reward.result import RewardResult

MAX_GROUND_TRUTH_CHARS = 10_000
"""Longer ground truths are rejected (ValueError): they are data errors, not answers."""

# math-verify warns once that its own timeouts are disabled; the isolated scorer enforces ours.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def score_math(
    response: str,
    ground_truth: str,
    extra: dict[str, Any] | None = None,
    *,
    correct_score: float = 1.0,
    wrong_score: float = -1.0,
    tail_chars: int = DAPO_TAIL_CHARS,
) -> RewardResult:
    """Score a math response against its ground truth (see the module docstring for the rules).

    response:      the model's full output (untrusted; only the last `tail_chars` characters are read).
    ground_truth:  the reference answer, e.g. "204" or "\\frac{1}{2}" (a `\\boxed{}` around it is removed).
    extra:         per-sample metadata (unused here; part of the reward-fn signature).
    correct_score, wrong_score: the scores for a right and a wrong (or missing) answer.
    tail_chars:    how many characters at the end of the response are searched for the answer.
    Returns a RewardResult with status "ok" and `extracted` = the normalised predicted answer (or None).
    """
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    if not isinstance(ground_truth, str):
        raise TypeError(f"ground_truth must be a str, got {type(ground_truth).__name__}")
    if len(ground_truth) > MAX_GROUND_TRUTH_CHARS:
        raise ValueError(f"ground_truth is {len(ground_truth)} characters (limit {MAX_GROUND_TRUTH_CHARS})")
    raw = extract_answer(response, tail_chars)
    pred = normalize_answer(raw) if raw is not None else ""
    if not pred:
        return RewardResult(False, float(wrong_score), extracted=None)
    correct = answers_match(pred, normalize_answer(ground_truth))
    return RewardResult(correct, float(correct_score if correct else wrong_score), extracted=pred)


def score_math_binary(response: str, ground_truth: str, extra: dict[str, Any] | None = None) -> RewardResult:
    """`score_math` with the 1/0 scheme (1 correct, 0 wrong): "reward.math:score_math_binary"."""
    return score_math(response, ground_truth, extra, correct_score=1.0, wrong_score=0.0)


def answers_match(pred: str, gold: str) -> bool:
    """True when two normalised answers are equivalent: exact key, exact number, then math-verify."""
    if not pred or not gold:
        return False
    if compare_key(pred) == compare_key(gold):
        return True
    pred_number, gold_number = as_exact_number(pred), as_exact_number(gold)
    if pred_number is not None and gold_number is not None:
        return pred_number == gold_number
    gold_parsed = _parse_latex_cached(gold)
    pred_parsed = _parse_latex(pred)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _parse_latex(text: str) -> list[Any]:
    """math-verify's LaTeX parse of `text` (wrapped in $...$); [] when nothing parses."""
    return parse(f"${text}$", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)


@lru_cache(maxsize=4096)
def _parse_latex_cached(text: str) -> list[Any]:
    """`_parse_latex` for ground truths, which repeat across the samples of a group and across batches."""
    return _parse_latex(text)
