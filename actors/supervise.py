"""`supervise`: one call to a group of Ray actors that replaces the workers it loses and submits their part again.

The rollout, reward and advantage groups all call their actors through it; what differs between them (what a
task is, how a worker is replaced and brought up to date, the errors and their wording, the hooks) is passed in.
Ray is imported when a call is made, so importing a package that uses this module does not import Ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import ray
    from ray.exceptions import RayTaskError


class Loss(NamedTuple):
    """A worker lost during a `supervise` call."""

    worker: int
    cause: str
    """What happened, e.g. "died: <Ray's message>" or "gave no result within 60 s"."""
    error: Exception | None
    """The Ray error that reported the loss; None when the worker missed its deadline."""
    lost_at: float
    """time.monotonic() when the loss was seen."""


def supervise(
    phase: str,
    workers: Sequence[int],
    submit: Callable[[int], ray.ObjectRef],
    replace: Callable[[int], None],
    give_up: Callable[[list[Loss], int], Exception],
    *,
    timeout_s: float,
    max_restarts: int,
    lost_errors: tuple[type[Exception], ...],
    timed_out: str,
    died: str = "died",
    task_error: Callable[[int, RayTaskError], Exception] | None = None,
    replace_at_once: bool = False,
    process_of: Callable[[int], tuple[int, str]] | None = None,
    on_submit: Callable[[str, dict[int, tuple[int, str]]], None] | None = None,
    on_restart: Callable[[int, str, str, float], None] | None = None,
) -> dict[int, Any]:
    """{k: result of worker k's task} for every k in `workers`, replacing the workers lost on the way.

    phase:          the call's name, passed to the hooks ("generate", "score", ...).
    workers:        the indices of the workers that get a task.
    submit:         submit(k) submits worker k's task and returns its ref. Its deadline is `timeout_s` after
                    submit returns. A `lost_errors` error raised by submit itself (e.g. while it asks the worker
                    for its process first) counts as losing worker k.
    replace:        replace(k) replaces worker k by a fresh one, brought up to date, so that submit(k) can run
                    on it again.
    give_up:        give_up(lost, restarted) → the error to raise when the losses `lost` would take the call
                    past `max_restarts`; `restarted`: workers replaced in this call so far.
    timeout_s:      seconds each task may take; a task past its deadline counts as a lost worker.
    max_restarts:   workers that may be replaced within this call (0: the first loss raises).
    lost_errors:    the errors of a task (from ray.get) or of `submit` that mean its worker is lost, e.g.
                    (RayActorError,): the actor process died. A GetTimeoutError among them is a missed deadline.
    timed_out:      the cause of a missed deadline, e.g. "gave no result within 60 s".
    died:           the cause of any other loss is f"{died}: {error}".
    task_error:     task_error(k, error) → the error raised (`from` the RayTaskError) when worker k's task
                    raised; None: the RayTaskError itself is raised. Either way the call ends at once and the
                    task is not submitted again (it would fail again).
    replace_at_once: True: every lost worker is replaced as soon as its loss is seen, before the budget check
                    (so that no later call queues behind a dead or stuck actor), and the lost workers are then
                    submitted again together (one on_submit). False: past the budget nothing is replaced;
                    within it each lost worker is replaced and submitted again in turn (on_submit and on_restart
                    once per worker), so that it works while the next one is being replaced.
    process_of:     process_of(k) → (pid, Ray node id) of worker k; asked before the tasks are submitted (asked
                    after, it would queue behind the task). Required with `on_submit`.
    on_submit:      on_submit(phase, {k: process_of(k)}), called right after the tasks of the workers k were
                    submitted (the first time and after each replacement).
    on_restart:     on_restart(k, phase, cause, lost_at), called after a lost worker k was replaced and its task
                    submitted again (`lost_at`: time.monotonic() when the loss was seen).

    Exceptions of any other kind (from ray.get, the callables or the hooks) end the call as they are.
    """
    call = _Call(phase, submit, timeout_s, lost_errors, timed_out, died, task_error, process_of, on_submit)
    restarted = 0
    lost = call.start(workers)
    while lost or call.pending:
        if not lost:
            lost = call.wait_next()
            continue
        if replace_at_once:
            for loss in lost:
                replace(loss.worker)
        if restarted + len(lost) > max_restarts:
            raise give_up(lost, restarted)
        restarted += len(lost)
        if replace_at_once:
            lost_again = call.start([loss.worker for loss in lost])
            for loss in lost:
                _report(on_restart, phase, loss)
        else:
            lost_again = []
            for loss in lost:
                replace(loss.worker)
                lost_again += call.start([loss.worker])
                _report(on_restart, phase, loss)
        lost = lost_again
    return call.results


def _report(on_restart: Callable[[int, str, str, float], None] | None, phase: str, loss: Loss) -> None:
    if on_restart is not None:
        on_restart(loss.worker, phase, loss.cause, loss.lost_at)


class _Call:
    """The bookkeeping of one `supervise` call: the tasks in flight with their deadlines, the results so far, and
    how a failure or a missed deadline becomes a Loss (supervise's docstring names the arguments)."""

    def __init__(
        self,
        phase: str,
        submit: Callable[[int], ray.ObjectRef],
        timeout_s: float,
        lost_errors: tuple[type[Exception], ...],
        timed_out: str,
        died: str,
        task_error: Callable[[int, RayTaskError], Exception] | None,
        process_of: Callable[[int], tuple[int, str]] | None,
        on_submit: Callable[[str, dict[int, tuple[int, str]]], None] | None,
    ) -> None:
        self.phase, self.submit, self.timeout_s = phase, submit, timeout_s
        self.lost_errors, self.timed_out, self.died = lost_errors, timed_out, died
        self.task_error, self.process_of, self.on_submit = task_error, process_of, on_submit
        self.pending: dict[ray.ObjectRef, tuple[int, float]] = {}  # ref → (worker, deadline)
        self.results: dict[int, Any] = {}

    def lost_by(self, k: int, error: Exception, lost_at: float) -> Loss:
        from ray.exceptions import GetTimeoutError  # Ray: imported when a call is made (module docstring)

        cause = self.timed_out if isinstance(error, GetTimeoutError) else f"{self.died}: {error}"
        return Loss(k, cause, error, lost_at)

    def start(self, ks: Sequence[int]) -> list[Loss]:
        """Submit the tasks of workers `ks`, then call on_submit; returns the workers found lost meanwhile."""
        processes = {k: self.process_of(k) for k in ks} if self.on_submit is not None else {}
        lost = []
        for k in ks:
            try:
                ref = self.submit(k)
            except self.lost_errors as error:
                lost.append(self.lost_by(k, error, time.monotonic()))
                continue
            self.pending[ref] = (k, time.monotonic() + self.timeout_s)
        if self.on_submit is not None:
            self.on_submit(self.phase, processes)
        return lost

    def wait_next(self) -> list[Loss]:
        """Wait for the next task to end or the next deadline; stores a result, or returns the workers lost."""
        import ray  # imported when a call is made (module docstring)
        from ray.exceptions import RayTaskError

        deadline = min(d for _, d in self.pending.values())
        ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=max(deadline - time.monotonic(), 0.0))
        now = time.monotonic()
        if not ready:
            late = [ref for ref, (_, d) in self.pending.items() if d <= now]
            return [Loss(self.pending.pop(ref)[0], self.timed_out, None, now) for ref in late]
        k, _ = self.pending.pop(ready[0])
        try:
            self.results[k] = ray.get(ready[0])
        except Exception as error:
            if self.task_error is not None and isinstance(error, RayTaskError):
                raise self.task_error(k, error) from error
            if not isinstance(error, self.lost_errors):
                raise
            return [self.lost_by(k, error, now)]
        return []
