"""User reward functions (loaded by dotted path "test_reward_userfns:NAME" in scorer child processes) and
tests of the reward-fn contract: `load_reward_fn` and the conversion of return values (`as_reward_result`)."""

from __future__ import annotations

import ctypes
import math
import os
import signal
import time

import pytest

from reward import RewardResult, as_reward_result, load_reward_fn, score_math

# -- reward functions used through the isolated scorer (tests/test_reward_pool.py) -----------------------


def sleep_forever(response: str, ground_truth: str, extra: dict) -> float:
    """Hangs in C (time.sleep releases nothing back to Python until it returns)."""
    time.sleep(100)
    return 1.0


def busy_loop_ignoring_signals(response: str, ground_truth: str, extra: dict) -> float:
    """Ignores SIGTERM/SIGINT/SIGALRM and spins forever: only SIGKILL stops it."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
        signal.signal(sig, signal.SIG_IGN)
    while True:
        pass


def hard_exit(response: str, ground_truth: str, extra: dict) -> float:
    """Kills its own process without any cleanup."""
    os._exit(1)


def segfault(response: str, ground_truth: str, extra: dict) -> float:
    """Dereferences a null pointer in C."""
    ctypes.string_at(0)
    return 1.0


def allocate_too_much(response: str, ground_truth: str, extra: dict) -> float:
    """Asks for 64 GiB (the scorer's address-space limit turns this into MemoryError)."""
    return float(len(bytearray(64 * 2**30)))


def wait_for_gate(response: str, ground_truth: str, extra: dict) -> float:
    """A barrier the test controls: writes the file extra["entered"] (if given: the sample is being scored, an
    in-flight signal), then waits until the file extra["gate"] exists (the scorer's time limit ends a gate that
    is never opened)."""
    if "entered" in extra:
        with open(extra["entered"], "a"):
            pass
    while not os.path.exists(extra["gate"]):
        time.sleep(0.01)
    return 1.0


def by_command(response: str, ground_truth: str, extra: dict) -> object:
    """Behaves according to the response: one of COMMANDS, "raise", "extra", or else a math answer."""
    if response in COMMANDS:
        return COMMANDS[response](response, ground_truth, extra)
    if response == "raise":
        raise KeyError("no such thing")
    if response == "extra":
        return float(extra["value"])
    return score_math(response, ground_truth, extra)


def returns_bad_type(response: str, ground_truth: str, extra: dict) -> object:
    return None if response == "none" else math.nan


COMMANDS = {
    "sleep": sleep_forever,
    "busy": busy_loop_ignoring_signals,
    "exit": hard_exit,
    "segv": segfault,
    "alloc": allocate_too_much,
    "none": returns_bad_type,
    "nan": returns_bad_type,
    "gate": wait_for_gate,
}


def with_scale(response: str, ground_truth: str, extra: dict, *, scale: float = 1.0) -> float:
    """Uses a keyword argument given through fn_kwargs."""
    return scale * len(response)


NOT_CALLABLE = 42

# -- tests -------------------------------------------------------------------------------------------------


def test_load_reward_fn_resolves_both_spellings():
    assert load_reward_fn("reward.math:score_math") is score_math
    assert load_reward_fn("reward.math.score_math") is score_math


@pytest.mark.parametrize(
    "path, fragment",
    [
        ("reward.nonexistent_module:fn", "cannot import module 'reward.nonexistent_module'"),
        ("reward.math:no_such_fn", "has no attribute 'no_such_fn'"),
        ("test_reward_userfns:NOT_CALLABLE", "not a function"),
        ("nocolon", "must look like"),
        ("", "non-empty"),
    ],
)
def test_load_reward_fn_bad_path_names_it(path, fragment):
    with pytest.raises(ValueError) as info:
        load_reward_fn(path)
    assert fragment in str(info.value)
    if path:
        assert repr(path) in str(info.value)


def test_as_reward_result_conversions():
    assert as_reward_result(True) == RewardResult(True, 1.0)
    assert as_reward_result(False) == RewardResult(False, 0.0)
    assert as_reward_result(0.5) == RewardResult(True, 0.5)
    assert as_reward_result(-1) == RewardResult(False, -1.0)
    kept = RewardResult(True, 2.0, extracted="x")
    assert as_reward_result(kept) == kept
    # a non-ok result never carries a score or a verdict
    forced = as_reward_result(RewardResult.failed("timeout", "slow"))
    assert (forced.status, forced.score, forced.correct) == ("timeout", 0.0, False)
    for bad in (None, "1.0", math.nan, math.inf, [1.0]):
        with pytest.raises((TypeError, ValueError)):
            as_reward_result(bad)


def test_reward_result_rejects_inconsistent_fields():
    with pytest.raises(ValueError, match="status"):
        RewardResult(False, 0.0, "maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="score=0.0"):
        RewardResult(False, -1.0, "timeout")
