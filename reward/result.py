"""The result type every reward function returns, and the conversion of user return values into it.

A reward function may return a `RewardResult`, a float (the score) or a bool (the verdict). `as_reward_result`
turns any of these into a `RewardResult` and rejects anything else with a clear message. Samples whose status
is not "ok" always carry score 0.0 and correct False: the trainer keeps them out of the loss, so they must
never look like wrong answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

RewardStatus = Literal["ok", "timeout", "error"]
STATUS_OK: RewardStatus = "ok"
STATUS_TIMEOUT: RewardStatus = "timeout"
STATUS_ERROR: RewardStatus = "error"
STATUSES: tuple[RewardStatus, ...] = (STATUS_OK, STATUS_TIMEOUT, STATUS_ERROR)

# Longest error message kept per sample (tracebacks of giant expressions can be megabytes).
MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class RewardResult:
    """The verdict on one response.

    correct:   the verifier's verdict (dynamic sampling filters on this). Always False unless status is "ok".
    score:     the scalar reward (DAPO: +1 correct, -1 wrong). 0.0 unless status is "ok".
    status:    "ok" (a real verdict), "timeout" (the time limit was hit) or "error" (the scorer failed).
    extracted: the normalised answer that was compared, or None when no answer was found (or not "ok").
    latency_s: wall seconds spent on this sample, measured by the scorer that ran it; None when unmeasured.
    error:     a short message saying what went wrong when status is not "ok"; None otherwise.
    """

    correct: bool
    score: float
    status: RewardStatus = STATUS_OK
    extracted: str | None = None
    latency_s: float | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"RewardResult.status must be one of {STATUSES}, got {self.status!r}")
        if self.status != STATUS_OK and (self.correct or self.score != 0.0):
            raise ValueError(f"a RewardResult with status {self.status!r} must have correct=False, score=0.0")

    @classmethod
    def failed(cls, status: RewardStatus, error: str, latency_s: float | None = None) -> RewardResult:
        """A non-ok result: score 0.0, correct False, the message kept short."""
        return cls(False, 0.0, status, None, latency_s, error[:MAX_ERROR_CHARS])

    def with_latency(self, latency_s: float) -> RewardResult:
        """The same result with `latency_s` replaced."""
        return replace(self, latency_s=latency_s)

    def to_dict(self) -> dict[str, Any]:
        """The fields the batch CLI adds to each row (`error` only when status is not "ok")."""
        out: dict[str, Any] = {
            "correct": self.correct,
            "score": self.score,
            "status": self.status,
            "extracted": self.extracted,
            "latency_s": None if self.latency_s is None else round(self.latency_s, 6),
        }
        if self.error is not None:
            out["error"] = self.error
        return out


def as_reward_result(value: Any) -> RewardResult:
    """Convert what a reward function returned into a `RewardResult`.

    * `RewardResult`: kept; a non-ok status is forced to score 0.0 / correct False.
    * `bool`: True -> (correct, 1.0), False -> (wrong, 0.0); return a float or RewardResult for other scales.
    * `int` / `float` (finite): the score; correct is `score > 0`.
    Anything else (None, NaN, strings, ...) raises TypeError/ValueError naming what came back.
    """
    if isinstance(value, RewardResult):
        if value.status != STATUS_OK:
            return RewardResult.failed(value.status, value.error or f"reward fn reported {value.status}")
        if not isinstance(value.correct, bool):
            raise TypeError(f"RewardResult.correct must be a bool, got {type(value.correct).__name__}")
        _check_score(value.score)
        if value.extracted is not None and not isinstance(value.extracted, str):
            kind = type(value.extracted).__name__
            raise TypeError(f"RewardResult.extracted must be str or None, got {kind}")
        return RewardResult(value.correct, float(value.score), STATUS_OK, value.extracted)
    if isinstance(value, bool):
        return RewardResult(value, 1.0 if value else 0.0)
    if isinstance(value, int | float):
        score = _check_score(value)
        return RewardResult(score > 0, score)
    raise TypeError(
        f"a reward fn must return a RewardResult, float or bool, not {type(value).__name__} ({repr(value)[:80]})"
    )


def _check_score(score: Any) -> float:
    if isinstance(score, bool) or not isinstance(score, int | float):
        raise TypeError(f"reward score must be a real number, got {type(score).__name__}")
    score = float(score)
    if not math.isfinite(score):
        raise ValueError(f"reward score must be finite, got {score}")
    return score
