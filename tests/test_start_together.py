"""orchestration.run.start_together: the run's actor groups start at once (the rollout engines and the learner
ranks each wait for their own actors in a thread), and a group that fails to start takes the others down with it.
Plain objects stand in for the groups here (the function only calls them and their `shutdown`); the real groups
start together in every end-to-end run (tests/test_train_e2e.py)."""

import threading

import pytest

from orchestration.run import start_together


class Group:
    def __init__(self, name: str, barrier: threading.Barrier | None = None, error: Exception | None = None):
        self.name, self.barrier, self.error, self.stopped = name, barrier, error, False

    def __call__(self) -> "Group":
        if self.barrier is not None:
            self.barrier.wait()  # returns only when every start is waiting here at once
        if self.error is not None:
            raise self.error
        return self

    def shutdown(self) -> None:
        self.stopped = True


def test_the_starts_run_at_once_and_their_results_come_in_order():
    barrier = threading.Barrier(2, timeout=60)  # one start after the other would break it (BrokenBarrierError)
    rollout, learner = Group("rollout", barrier), Group("learner", barrier)
    assert start_together(rollout, learner) == [rollout, learner]
    assert not rollout.stopped and not learner.stopped


@pytest.mark.parametrize("failing", [0, 1])
def test_a_start_that_fails_shuts_the_started_ones_down_and_raises_its_error(failing):
    barrier = threading.Barrier(2, timeout=60)
    groups = [Group("rollout", barrier), Group("learner", barrier)]
    groups[failing].error = RuntimeError(f"{groups[failing].name} could not start")
    with pytest.raises(RuntimeError, match=f"^{groups[failing].name} could not start$"):
        start_together(*groups)
    assert groups[1 - failing].stopped, "the group that started is shut down"
    assert not groups[failing].stopped, "the one that failed cleaned up after itself (its constructor does)"


def test_when_both_fail_the_first_error_propagates():
    groups = [Group("rollout", error=ValueError("first")), Group("learner", error=KeyError("second"))]
    with pytest.raises(ValueError, match="first"):
        start_together(*groups)
