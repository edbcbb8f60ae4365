"""The paper's evaluation estimators over k samples per problem (FIPO_SPEC §7: avg@32, cons@32, pass@32)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from math import comb

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
