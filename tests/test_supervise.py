"""actors.supervise with real Ray and tiny actors: results by worker, a worker that raises (never retried), a worker
killed mid-call or past its deadline (replaced, its task submitted again, reported), the restart budget, and the
two replacement orders (`replace_at_once`)."""

from __future__ import annotations

import os
import time

import pytest

ray = pytest.importorskip("ray")

from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError  # noqa: E402

from actors import Loss, supervise  # noqa: E402

pytestmark = pytest.mark.ray


@ray.remote(num_cpus=0.1, max_restarts=0)
class Doubler:
    """Doubles its input after `delay_s` seconds."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    def double(self, x: int) -> int:
        time.sleep(self.delay_s)
        return 2 * x

    def fail(self, x: int) -> int:
        raise ValueError(f"bad input {x}")

    def pid(self) -> int:
        return os.getpid()


class Pool:
    """Actors 0..n-1 (actor k waits delays[k] seconds, a replacement `replaced_delay_s`), with the callables the
    loop takes. on_submit kills worker `kill_on_submit` the first `kill_times` times it is submitted a task. Every
    call the loop makes is recorded in `events`, in order."""

    def __init__(
        self, delays: list[float], kill_on_submit: int | None = None, kill_times: int = 0, replaced_delay_s: float = 0
    ) -> None:
        self.actors = [Doubler.remote(delay) for delay in delays]
        self.events: list[tuple] = []
        self.kill_on_submit, self.kill_times = kill_on_submit, kill_times
        self.replaced_delay_s = replaced_delay_s

    def submit(self, k: int):
        self.events.append(("submit", k))
        return self.actors[k].double.remote(k + 1)

    def replace(self, k: int) -> None:
        self.events.append(("replace", k))
        ray.kill(self.actors[k])
        self.actors[k] = Doubler.remote(self.replaced_delay_s)

    def give_up(self, lost: list[Loss], restarted: int) -> Exception:
        self.events.append(("give_up", [loss.worker for loss in lost], restarted))
        names = "; ".join(f"worker {loss.worker} {loss.cause}" for loss in lost)
        return RuntimeError(f"{names} ({restarted} restart(s) in this call)")

    def process_of(self, k: int) -> tuple[int, str]:
        return ray.get(self.actors[k].pid.remote(), timeout=60), "node"

    def on_submit(self, phase: str, processes: dict[int, tuple[int, str]]) -> None:
        self.events.append(("on_submit", phase, sorted(processes)))
        if self.kill_on_submit in processes and self.kill_times > 0:  # killed while its task runs
            self.kill_times -= 1
            ray.kill(self.actors[self.kill_on_submit])

    def on_restart(self, k: int, phase: str, cause: str, lost_at: float) -> None:
        self.events.append(("on_restart", k, phase, cause.split(":")[0], lost_at <= time.monotonic()))

    def call(self, workers=(0, 1), **overrides):
        arguments = dict(
            timeout_s=60.0,
            max_restarts=1,
            lost_errors=(RayActorError,),
            timed_out="gave no result in time",
            process_of=self.process_of,
            on_submit=self.on_submit,
            on_restart=self.on_restart,
        )
        return supervise("double", workers, self.submit, self.replace, self.give_up, **(arguments | overrides))

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


def kill(actor, limit_s: float = 120.0) -> None:
    """ray.kill, and wait until the actor is gone (ray.kill is asynchronous). A call to the killed actor may hang
    until Ray notices the death (seconds on a loaded machine): one that does not answer in 5 s is asked again, up
    to `limit_s` (a bound against a hang only)."""
    ray.kill(actor)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.pid.remote(), timeout=5)
        except RayActorError:
            return
        except GetTimeoutError:
            continue
        time.sleep(0.05)
    raise AssertionError("the killed actor still answers")


@pytest.fixture
def pool_of(local_ray):
    pools: list[Pool] = []

    def make(*args, **kwargs) -> Pool:
        pools.append(Pool(*args, **kwargs))
        return pools[-1]

    yield make
    for pool in pools:
        pool.shutdown()


def test_every_worker_answers(pool_of):
    pool = pool_of([0.0, 0.0, 0.0])
    pids = [ray.get(actor.pid.remote()) for actor in pool.actors]
    seen: list[dict] = []
    results = pool.call([2, 0, 1], on_submit=lambda phase, processes: seen.append(processes))
    assert results == {0: 2, 1: 4, 2: 6}
    assert seen == [{2: (pids[2], "node"), 0: (pids[0], "node"), 1: (pids[1], "node")}]
    assert pool.events == [("submit", 2), ("submit", 0), ("submit", 1)]


def test_a_worker_that_raises_ends_the_call_and_is_not_retried(pool_of):
    pool = pool_of([0.0, 0.0])

    def submit(k: int):
        pool.events.append(("submit", k))
        return pool.actors[k].fail.remote(k)

    pool.submit = submit

    def task_error(k: int, error: RayTaskError) -> Exception:
        return RuntimeError(f"worker {k} failed: {error.cause}")

    # RayTaskError is a RayError: with task_error it is still not taken for a lost worker
    with pytest.raises(RuntimeError, match=r"worker \d failed: bad input") as raised:
        pool.call(task_error=task_error, lost_errors=(RayError,), max_restarts=5)
    assert isinstance(raised.value.__cause__, RayTaskError)
    with pytest.raises(RayTaskError, match="bad input") as raised:  # without: the task's own error
        pool.call(max_restarts=5)
    assert isinstance(raised.value, ValueError)
    assert [event[0] for event in pool.events] == ["submit", "submit", "on_submit"] * 2  # no replace, no resubmit


@pytest.mark.parametrize("replace_at_once", [False, True])
def test_a_killed_worker_is_replaced_and_its_task_submitted_again(pool_of, replace_at_once):
    pool = pool_of([0.0, 600.0], kill_on_submit=1, kill_times=1)  # worker 1 would take ten minutes
    start = time.monotonic()
    results = pool.call(replace_at_once=replace_at_once)
    # the events below show the death ended worker 1's task; the bound is the call's own deadline (60 s): a
    # replacement actor starts in seconds, also on a machine 5x slower than this one
    assert results == {0: 2, 1: 4} and time.monotonic() - start < 60
    assert pool.events == [
        ("submit", 0),
        ("submit", 1),
        ("on_submit", "double", [0, 1]),
        ("replace", 1),
        ("submit", 1),
        ("on_submit", "double", [1]),
        ("on_restart", 1, "double", "died", True),
    ]


def test_a_missed_deadline_counts_as_a_lost_worker(pool_of):
    pool = pool_of([0.0, 600.0])
    ray.get([actor.pid.remote() for actor in pool.actors], timeout=120)  # started: their start-up is not timed
    causes: list[tuple[str, float]] = []
    start = time.monotonic()
    results = pool.call(timeout_s=3.0, on_restart=lambda k, phase, cause, lost_at: causes.append((cause, lost_at)))
    assert results == {0: 2, 1: 4}
    [(cause, lost_at)] = causes
    # at the 3 s deadline (never before: it is counted from the submission), and long before worker 1's 600 s
    assert cause == "gave no result in time" and 3.0 <= lost_at - start < 30
    assert [event for event in pool.events if event[0] in ("replace", "give_up")] == [("replace", 1)]


@pytest.mark.parametrize("replace_at_once", [False, True])
def test_workers_lost_together_are_replaced_in_turn_or_at_once(pool_of, replace_at_once):
    pool = pool_of([60.0, 60.0])

    def on_submit(phase: str, processes: dict) -> None:  # the first time, busy past both deadlines
        pool.on_submit(phase, processes)
        if len(processes) == 2:
            time.sleep(8.5)

    results = pool.call(timeout_s=8.0, max_restarts=2, replace_at_once=replace_at_once, on_submit=on_submit)
    assert results == {0: 2, 1: 4}
    after_the_loss = pool.events[3:]
    if replace_at_once:  # both replaced first, then submitted together
        assert after_the_loss == [
            ("replace", 0),
            ("replace", 1),
            ("submit", 0),
            ("submit", 1),
            ("on_submit", "double", [0, 1]),
            ("on_restart", 0, "double", "gave no result in time", True),
            ("on_restart", 1, "double", "gave no result in time", True),
        ]
    else:  # each replaced, submitted and reported before the next
        assert after_the_loss == [
            ("replace", 0),
            ("submit", 0),
            ("on_submit", "double", [0]),
            ("on_restart", 0, "double", "gave no result in time", True),
            ("replace", 1),
            ("submit", 1),
            ("on_submit", "double", [1]),
            ("on_restart", 1, "double", "gave no result in time", True),
        ]


@pytest.mark.parametrize("replace_at_once", [False, True])
def test_past_the_budget_the_call_raises_naming_the_worker(pool_of, replace_at_once):
    pool = pool_of([0.0, 60.0], kill_on_submit=1, kill_times=2, replaced_delay_s=60.0)  # killed again, replaced
    with pytest.raises(RuntimeError, match=r"(?s)^worker 1 died: .*\(1 restart\(s\) in this call\)$"):
        pool.call(max_restarts=1, replace_at_once=replace_at_once)
    replaced = [event for event in pool.events if event[0] in ("replace", "give_up")]
    # replaced at once: the second loss too, before giving up; otherwise the last lost worker is left as it is
    assert replaced == [("replace", 1)] + [("replace", 1)] * replace_at_once + [("give_up", [1], 1)]

    pool = pool_of([60.0], kill_on_submit=0, kill_times=1)
    with pytest.raises(RuntimeError, match=r"(?s)^worker 0 died: .*\(0 restart\(s\) in this call\)$"):
        pool.call([0], max_restarts=0)
    assert ("replace", 0) not in pool.events


def test_a_loss_found_while_submitting_counts_against_the_budget(pool_of):
    """submit(k) may ask the worker something first (the advantage service asks for its process): a lost error
    it raises is the loss of worker k."""
    pool = pool_of([0.0])
    kill(pool.actors[0])

    def submit(k: int):
        pool.events.append(("asked", k))
        ray.get(pool.actors[k].pid.remote(), timeout=30)
        return pool.actors[k].double.remote(k + 1)

    pool.submit = submit
    assert pool.call([0], on_submit=None) == {0: 2}
    assert pool.events == [("asked", 0), ("replace", 0), ("asked", 0), ("on_restart", 0, "double", "died", True)]

    kill(pool.actors[0])
    with pytest.raises(RuntimeError, match=r"(?s)^worker 0 died: .*\(0 restart\(s\) in this call\)$"):
        pool.call([0], on_submit=None, max_restarts=0)
