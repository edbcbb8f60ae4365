"""IsolatedScorer and ScorerPool without Ray: hard per-sample time limits, crash isolation, adversarial
inputs, input order. Wall times are asserted: a limit that is not enforced fails these tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reward import IsolatedScorer, RewardResult, ScorerPool

TIMEOUT_S = 1.0
# From a sample's deadline to its result: kill + reap + starting (not waiting for) the next child, plus scheduling
# noise. Measured 0.05-0.08 s at a load average of 20 on 2 cores (2026-12-06); 1.5 s covers a machine 5x slower.
# A limit that is not enforced takes 100 s (sleep_forever), forever (busy_loop) or minutes (9^9^9 in sympy).
SLACK_S = 1.5
# A new child (interpreter + math-verify import) took 2-10 s at that load: its start-up is never counted against
# a sample's limit, and a bound that covers it is a bound against a hang only (reward.pool.STARTUP_TIMEOUT_S).


@pytest.fixture(scope="module")
def math_scorer():
    with IsolatedScorer("reward.math:score_math", timeout_s=TIMEOUT_S) as scorer:
        yield scorer


@pytest.fixture(scope="module")
def command_scorer():
    with IsolatedScorer("test_reward_userfns:by_command", timeout_s=TIMEOUT_S) as scorer:
        yield scorer


def assert_alive(scorer: IsolatedScorer) -> None:
    [good, bad] = scorer.score_batch(["Answer: 204", "Answer: 205"], ["204", "204"])
    assert (good.status, good.correct, good.score) == ("ok", True, 1.0)
    assert (bad.status, bad.correct, bad.score) == ("ok", False, -1.0)


def timed_one(scorer: IsolatedScorer, response: str, ground_truth: str = "204") -> tuple[RewardResult, float]:
    start = time.perf_counter()
    [result] = scorer.score_batch([response], [ground_truth])
    return result, time.perf_counter() - start


def test_results_in_order_with_latency(math_scorer):
    responses = [f"Answer: {n}" for n in range(200)]
    truths = [str(n if n % 2 == 0 else n + 1) for n in range(200)]
    results = math_scorer.score_batch(responses, truths)
    assert [r.correct for r in results] == [n % 2 == 0 for n in range(200)]
    assert [r.extracted for r in results] == [str(n) for n in range(200)]
    assert all(r.status == "ok" and r.latency_s is not None and r.latency_s >= 0 for r in results)


ADVERSARIAL = {
    "tower_flat": "Answer: 9^9^9^9^9",
    "tower_braced": "Answer: $9^{9^{9^{9^{9}}}}$",
    "factorial_tower": "Answer: $10!!!!$",
    "nested_braces_100k": "\\boxed{" * 100_000 + "1" + "}" * 100_000,
    "nested_braces_in_tail": "Answer: $" + "{" * 140 + "1" + "}" * 140 + "$",
    "open_boxes_100k": "\\boxed{" * 100_000,
    "megabyte_of_digits": "Answer: " + "9" * 1_000_000,
    "long_number_in_tail": "1" * 1_000_000 + " Answer: " + "9" * 250,
    "nul_bytes": "Answer: 204\x00\x00",
    "lone_surrogate": "\ud800 Answer: \ud800204\udfff",
    "control_chars": "Answer: \x1b[31m204\x07",
    "deep_parens": "Answer: " + "(" * 280 + "1" + ")" * 280,
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_inputs_return_in_time(math_scorer, name):
    result, wall = timed_one(math_scorer, ADVERSARIAL[name])
    assert wall < TIMEOUT_S + SLACK_S, f"{name} took {wall:.2f} s"
    assert result.status in ("ok", "timeout", "error")
    if result.status != "ok":
        assert (result.correct, result.score) == (False, 0.0)
    else:
        assert not result.correct  # none of these is the answer 204 written plainly
    assert_alive(math_scorer)


def test_a_hanging_verifier_is_reported_as_timeout(math_scorer):
    result, wall = timed_one(math_scorer, "Answer: $9^{9^{9}}$")  # a 370-million-digit integer
    assert result.status == "timeout" and result.extracted is None
    assert (result.correct, result.score) == (False, 0.0)
    assert TIMEOUT_S <= wall < TIMEOUT_S + SLACK_S
    assert "1 s" in (result.error or "")
    assert_alive(math_scorer)


def test_code_in_the_answer_is_never_executed(math_scorer, tmp_path: Path):
    marker = tmp_path / "pwned"
    payloads = [
        f"Answer: __import__('os').system('touch {marker}')",
        f"Answer: $__import__('os').system('touch {marker}')$",
        f'\\boxed{{__import__("os").system("touch {marker}")}}',
        f"Answer: eval(\"open('{marker}', 'w')\")",
        f"Answer: exec(compile('open(\"{marker}\", \"w\")', 'x', 'exec'))",
    ]
    results = math_scorer.score_batch(payloads, ["204"] * len(payloads))
    assert all(not r.correct for r in results)
    # no wait: a payload that ran would have run (os.system, open) before the child sent that sample's result
    assert not marker.exists()


@pytest.mark.parametrize("command", ["sleep", "busy"])
def test_user_fn_hanging_in_c_or_ignoring_signals_times_out(command_scorer, command):
    old_pid, restarts = command_scorer.child_pid, command_scorer.restarts
    result, wall = timed_one(command_scorer, command)
    assert (result.status, result.correct, result.score) == ("timeout", False, 0.0)
    assert wall < TIMEOUT_S + SLACK_S
    assert command_scorer.restarts == restarts + 1
    # no wait: the timed-out child was SIGKILLed and reaped (Popen.wait) before the result came back
    assert old_pid is not None and not _pid_alive(old_pid)  # SIGKILL: no signal handler can refuse it
    assert_alive(command_scorer)


@pytest.mark.parametrize(
    "command, fragment",
    [
        ("exit", "scorer process died (exit code 1)"),
        ("segv", "killed by signal SIGSEGV"),
        ("alloc", "MemoryError"),
        ("none", "must return a RewardResult, float or bool, not NoneType"),
        ("nan", "reward score must be finite"),
        ("raise", "KeyError"),
    ],
)
def test_user_fn_crashes_are_errors(command_scorer, command, fragment):
    result, wall = timed_one(command_scorer, command)
    assert result.status == "error", result
    assert (result.correct, result.score, result.extracted) == (False, 0.0, None)
    assert result.latency_s is not None and wall < 5.0
    assert fragment in (result.error or "")
    assert_alive(command_scorer)


def test_mixed_batch_keeps_order_and_statuses(command_scorer):
    responses = ["Answer: 1", "sleep", "Answer: 2", "exit", "raise", "segv", "extra", "Answer: 9", "sleep", "Answer: 4"]
    truths = ["1", "1", "2", "1", "1", "1", "1", "8", "1", "4"]
    extras = [None] * 6 + [{"value": -0.5}] + [None] * 3
    start = time.perf_counter()
    results = command_scorer.score_batch(responses, truths, extras)
    wall = time.perf_counter() - start
    assert [r.status for r in results] == [
        "ok", "timeout", "ok", "error", "error", "error", "ok", "ok", "timeout", "ok"
    ]  # fmt: skip
    assert [r.score for r in results] == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -0.5, -1.0, 0.0, 1.0]
    assert [r.correct for r in results] == [True, False, True, False, False, False, False, False, False, True]
    assert "KeyError" in (results[4].error or "")
    # nothing waits longer than its own limit: each sample's latency (from its send or the previous result, child
    # start-ups excluded) is at most the limit plus the slack, and the timeouts came at the limit, never before
    assert all(r.latency_s is not None and r.latency_s < TIMEOUT_S + SLACK_S for r in results), results
    assert all(r.latency_s >= TIMEOUT_S for r in results if r.status == "timeout")
    # and the whole batch: two timeouts plus four child restarts (2-10 s each at a load of 20 here; a hang bound)
    assert wall < 2 * (TIMEOUT_S + SLACK_S) + 4 * 30.0


def test_fn_kwargs_reach_the_reward_fn():
    with IsolatedScorer("test_reward_userfns:with_scale", fn_kwargs={"scale": 0.5}) as scorer:
        assert [r.score for r in scorer.score_batch(["abcd"], ["x"])] == [2.0]


def test_bad_arguments_are_rejected_up_front():
    with pytest.raises(ValueError, match="'reward.math:nope'"):
        IsolatedScorer("reward.math:nope")
    with pytest.raises(ValueError, match="timeout_s"):
        IsolatedScorer(timeout_s=0)
    with IsolatedScorer() as scorer:
        with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
            scorer.score_batch(["a", "b"], ["1"])
        with pytest.raises(TypeError, match=r"responses\[1\]"):
            scorer.score_batch(["a", None], ["1", "2"])  # type: ignore[list-item]


def test_close_stops_the_child():
    scorer = IsolatedScorer()
    pid = scorer.child_pid
    assert pid is not None and _pid_alive(pid)
    scorer.close()
    assert not _pid_alive(pid)


def test_scorer_pool_parallel_and_ordered():
    responses = [f"Answer: {n}" for n in range(300)] + ["Answer: $9^{9^{9}}$"]
    truths = [str(n) for n in range(300)] + ["1"]
    progress: list[int] = []
    with ScorerPool(2, timeout_s=TIMEOUT_S, chunk_samples=16) as pool:
        start = time.perf_counter()
        results = pool.score_batch(responses, truths, on_progress=lambda done, total: progress.append(done))
        wall = time.perf_counter() - start
        assert [r.correct for r in results[:300]] == [True] * 300
        assert results[300].status == "timeout"
        assert progress[-1] == 301 and progress == sorted(progress)
        assert wall < TIMEOUT_S + SLACK_S + 2.0
        assert pool.restarts == 1


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); check its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_unpicklable_extra_fails_only_its_own_sample(command_scorer):
    extras = [{"value": 1.0}, {"value": 2.0, "fn": lambda: None}, {"value": 3.0}]
    results = command_scorer.score_batch(["extra"] * 3, ["1"] * 3, extras)
    assert [r.status for r in results] == ["ok", "error", "ok"]
    assert [r.score for r in results] == [1.0, 0.0, 3.0]
    assert "could not send" in (results[1].error or "")


def test_child_killed_while_idle_is_replaced_transparently():
    with IsolatedScorer() as scorer:
        pid = scorer.child_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60  # the kill has landed (the child is a zombie): its socket is closed
        while _pid_alive(pid):
            assert time.monotonic() < deadline, "the SIGKILLed child is still running"
            time.sleep(0.01)
        assert_alive(scorer)
        assert scorer.child_pid != pid


# A Ray worker's SIGTERM handler raises SystemExit. Here a plain process installs the same handler, makes the Ray
# shell's scorer, and exits; the scorer's exit finalizer (which stops its child) receives a SIGTERM of its own as it
# starts, as the second SIGTERM at a run's end can (it printed "Exception ignored in: <finalize object ...>" and a
# traceback on a run's console, tests/test_multinode.py).
SIGTERM_AT_EXIT = """
import os, signal, sys, weakref
from reward import pool
from reward.group import _RayScorer

signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))  # as ray/_private/worker.py's sigterm_handler
scorer = _RayScorer("reward.math:score_math")
proc, conn = scorer._proc, scorer._conn
print(proc.pid, flush=True)


def stop_with_a_sigterm(proc, conn):
    os.kill(os.getpid(), signal.SIGTERM)  # delivered here, in the finalizer, before it stops the child
    pool._stop_child(proc, conn)


scorer._finalizer.detach()
scorer._finalizer = weakref.finalize(scorer, stop_with_a_sigterm, proc, conn)
sys.exit(0)
"""


def test_a_sigterm_while_the_ray_scorer_exits_neither_prints_a_traceback_nor_leaves_its_child():
    out = subprocess.run(
        [sys.executable, "-c", SIGTERM_AT_EXIT], cwd=Path(__file__).resolve().parents[1], capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0 and "Traceback" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr
    child = int(out.stdout.split()[0])
    assert not Path(f"/proc/{child}").exists(), "the finalizer ran to its end: the child was stopped and reaped"
