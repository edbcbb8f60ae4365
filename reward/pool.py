"""Process-isolated scoring without Ray: `IsolatedScorer` (one persistent child process) and `ScorerPool`
(N of them, driven from threads in the calling process).

Why a child process: a verifier can hang inside C code (a huge integer power in sympy), exhaust memory or
crash the interpreter, and no in-process flag stops that. Each `IsolatedScorer` owns one child process
(`python -m reward.child`, a fresh interpreter: nothing of the parent's threads or `__main__` is inherited)
that imports the reward function once and then scores samples it receives in batches over a socket, sending
one result message back after each sample. The parent waits for each result with a per-sample deadline
(`timeout_s`, counted from the previous result, or from sending the batch for the first sample). When the
deadline passes the child is killed (SIGKILL) and the sample is reported as status "timeout"; when the child
dies (segfault, os._exit, out of memory) the sample is reported as status "error"; either way a new child is
started at once and takes the rest of the batch. Results always come back in input order.

Each child limits the growth of its address space (`memory_limit_mb`, RLIMIT_AS) and, on Linux, is killed
when its parent exits, so no child outlives its owner. A child start costs ~0.3-0.6 s (interpreter and
math-verify import); it is not counted against any sample's deadline (the parent waits for "ready" first).
Messages are pickled; nothing in a sample is ever evaluated by the parent or the child.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from reward.loader import DEFAULT_REWARD_FN, load_reward_fn
from reward.result import STATUS_ERROR, STATUS_TIMEOUT, RewardResult

Sample = tuple[str, str, dict[str, Any]]
"""(response, ground_truth, extra) as sent to the child process."""

STARTUP_TIMEOUT_S = 60.0
"""How long a new child may take to import the reward fn and report ready."""

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def check_samples(
    responses: Sequence[str], ground_truths: Sequence[str], extras: Sequence[dict[str, Any] | None] | None
) -> list[Sample]:
    """Validate a batch (equal lengths, str fields, dict extras) and zip it into samples.

    Raises TypeError/ValueError naming the first offending index.
    """
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    if extras is not None and len(extras) != len(responses):
        raise ValueError(f"{len(responses)} responses but {len(extras)} extras")
    samples: list[Sample] = []
    for i, (response, ground_truth) in enumerate(zip(responses, ground_truths)):
        if not isinstance(response, str):
            raise TypeError(f"responses[{i}] must be a str, got {type(response).__name__}")
        if not isinstance(ground_truth, str):
            raise TypeError(f"ground_truths[{i}] must be a str, got {type(ground_truth).__name__}")
        extra = {} if extras is None or extras[i] is None else extras[i]
        if not isinstance(extra, dict):
            raise TypeError(f"extras[{i}] must be a dict or None, got {type(extra).__name__}")
        samples.append((response, ground_truth, extra))
    return samples


class ChildStartError(RuntimeError):
    """A scorer child process could not start (its reward fn failed to import in the child, ...)."""


class IsolatedScorer:
    """Scores samples with a reward function running in one persistent child process, with a hard
    per-sample time limit (see the module docstring). Not thread-safe: one caller at a time.

    reward_fn:        dotted path "package.module:function" of a reward function
                      `(response, ground_truth, extra, **fn_kwargs) -> RewardResult | float | bool`.
    timeout_s:        wall-clock limit per sample, seconds; past it the child is killed (status "timeout").
    fn_kwargs:        keyword arguments passed to every call (e.g. {"wrong_score": 0.0} for the 1/0 scheme).
    memory_limit_mb:  how much the child's address space may grow (MiB) after it has imported the reward fn
                      (RLIMIT_AS); None for no limit. Past it the reward fn gets MemoryError (status "error").
    max_samples_per_message: samples sent to the child in one message.
    """

    def __init__(
        self,
        reward_fn: str = DEFAULT_REWARD_FN,
        *,
        timeout_s: float = 5.0,
        fn_kwargs: dict[str, Any] | None = None,
        memory_limit_mb: int | None = 2048,
        max_samples_per_message: int = 64,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if memory_limit_mb is not None and memory_limit_mb < 256:
            raise ValueError(f"memory_limit_mb must be >= 256 or None, got {memory_limit_mb}")
        if max_samples_per_message < 1:
            raise ValueError(f"max_samples_per_message must be >= 1, got {max_samples_per_message}")
        load_reward_fn(reward_fn)  # resolve once here, so a bad path fails at build time with its name
        try:
            pickle.dumps(fn_kwargs)
        except Exception as e:
            raise ValueError(f"fn_kwargs for {reward_fn!r} cannot be sent to the scorer process: {e}") from e
        self.reward_fn = reward_fn
        self.timeout_s = float(timeout_s)
        self.fn_kwargs = dict(fn_kwargs or {})
        self.memory_limit_mb = memory_limit_mb
        self.max_samples_per_message = max_samples_per_message
        self.restarts = 0
        """How many times the child was replaced (after a timeout or a crash)."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._ready = False
        self._batch_id = 0
        self._finalizer = weakref.finalize(self, _stop_child, None, None)
        self._start_child()
        self._wait_ready()

    def score_batch(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        extras: Sequence[dict[str, Any] | None] | None = None,
    ) -> list[RewardResult]:
        """Score a batch; one RewardResult per sample, in input order, each with `latency_s` set."""
        return self.score_samples(check_samples(responses, ground_truths, extras))

    def score_samples(self, samples: Sequence[Sample]) -> list[RewardResult]:
        """Score already validated (response, ground_truth, extra) tuples, in order."""
        results: list[RewardResult] = []
        step = self.max_samples_per_message
        for start in range(0, len(samples), step):
            results.extend(self._score_chunk(samples[start : start + step]))
        return results

    @property
    def child_pid(self) -> int | None:
        """The pid of the current child process (None between a crash and the restart)."""
        return None if self._proc is None else self._proc.pid

    def close(self) -> None:
        """Stop the child process (idempotent)."""
        self._stop()
        self._finalizer.detach()

    def __enter__(self) -> IsolatedScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------------------

    def _score_chunk(self, samples: Sequence[Sample]) -> list[RewardResult]:
        results: list[RewardResult] = []
        one_at_a_time = False  # after a sample could not be pickled, find it by sending singly
        send_retries = 0
        while len(results) < len(samples):
            pending = samples[len(results) : len(results) + 1] if one_at_a_time else samples[len(results) :]
            try:
                conn = self._ensure_ready()
            except ChildStartError as e:  # the rest of this chunk fails too; the next chunk tries again
                results.extend(RewardResult.failed(STATUS_ERROR, str(e)) for _ in pending)
                continue
            self._batch_id += 1
            sent_at = time.perf_counter()
            try:
                conn.send((self._batch_id, list(pending)))
            except OSError as e:  # the child died while idle: retry once with a new one
                self._restart()
                if send_retries == 0:
                    send_retries += 1
                    continue
                results.append(RewardResult.failed(STATUS_ERROR, f"could not send the sample to the scorer: {e}"))
                continue
            except Exception as e:  # noqa: BLE001 - pickling failed (an unpicklable or too deeply nested extra)
                if len(pending) > 1:
                    one_at_a_time = True
                    continue
                results.append(RewardResult.failed(STATUS_ERROR, f"could not send the sample to the scorer: {e}"))
                continue
            send_retries = 0
            results.extend(self._collect(conn, len(pending), sent_at))
        return results

    def _collect(self, conn: Connection, count: int, started: float) -> list[RewardResult]:
        """Receive up to `count` results; stop early (after replacing the child) on a timeout or a crash."""
        results: list[RewardResult] = []
        while len(results) < count:
            remaining = started + self.timeout_s - time.perf_counter()
            try:
                message = conn.recv() if remaining > 0 and conn.poll(remaining) else None
            except (EOFError, OSError):
                exitcode = self._restart(grace_s=1.0)
                latency = time.perf_counter() - started
                error = f"scorer process died ({_describe_exit(exitcode)})"
                results.append(RewardResult.failed(STATUS_ERROR, error, latency))
                return results
            now = time.perf_counter()
            if message is None:
                self._restart()
                error = f"no result within the {self.timeout_s:g} s limit"
                results.append(RewardResult.failed(STATUS_TIMEOUT, error, now - started))
                return results
            batch_id, (correct, score, status, extracted, error) = message
            if batch_id != self._batch_id:
                raise RuntimeError(f"scorer protocol error: got batch {batch_id}, expected {self._batch_id}")
            results.append(RewardResult(correct, score, status, extracted, now - started, error))
            started = now
        return results

    def _ensure_ready(self) -> Connection:
        if self._proc is None:
            self._start_child()
        if not self._ready:
            self._wait_ready()
        assert self._conn is not None
        return self._conn

    def _start_child(self) -> None:
        """Start a child (without waiting for it) and send it its configuration."""
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "reward.child", str(child_sock.fileno())],
                pass_fds=(child_sock.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=2,  # prints of a reward fn go to our stderr, never into the protocol
                env=env,
                close_fds=True,
            )
        finally:
            child_sock.close()
        conn = Connection(parent_sock.detach())
        self._proc, self._conn, self._ready = proc, conn, False
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _stop_child, proc, conn)
        config = {
            "reward_fn": self.reward_fn,
            "fn_kwargs": self.fn_kwargs,
            "memory_limit_mb": self.memory_limit_mb,
            "sys_path": [p for p in sys.path if isinstance(p, str)],
        }
        try:
            conn.send(config)
        except OSError:
            pass  # the child died at once; _wait_ready reports it

    def _wait_ready(self) -> None:
        """Wait for the child's "ready"; raise ChildStartError (and forget the child) if it never comes."""
        assert self._conn is not None
        try:
            if not self._conn.poll(STARTUP_TIMEOUT_S):
                raise ChildStartError(f"scorer process did not start within {STARTUP_TIMEOUT_S:g} s")
            kind, message = self._conn.recv()
        except (EOFError, OSError) as e:
            exitcode = self._stop()
            raise ChildStartError(f"scorer process exited during startup ({_describe_exit(exitcode)})") from e
        except ChildStartError:
            self._stop()
            raise
        if kind != "ready":
            self._stop()
            raise ChildStartError(f"scorer process for {self.reward_fn!r} failed to start: {message}")
        self._ready = True

    def _restart(self, grace_s: float = 0.0) -> int | None:
        """Kill the child (after `grace_s` to exit by itself) and start a new one at once; returns the old
        child's exit code."""
        exitcode = self._stop(grace_s)
        self.restarts += 1
        self._start_child()
        return exitcode

    def _stop(self, grace_s: float = 0.0) -> int | None:
        proc, conn = self._proc, self._conn
        self._proc, self._conn, self._ready = None, None, False
        return _stop_child(proc, conn, grace_s)


def _stop_child(proc: subprocess.Popen[bytes] | None, conn: Connection | None, grace_s: float = 0.0) -> int | None:
    """Close the socket, SIGKILL the child if it is still running after `grace_s`, reap it; returns its exit
    code."""
    if conn is not None:
        conn.close()
    if proc is None:
        return None
    if grace_s > 0:
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    if proc.poll() is None:
        proc.kill()
    try:
        return proc.wait(timeout=10.0)
    except subprocess.TimeoutExpired:
        return None


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class ScorerPool:
    """N `IsolatedScorer`s used from N threads of the calling process: the in-process pool (no Ray) for the
    CLI and for tests. Work is split into chunks of `chunk_samples` and handed to whichever scorer is free.

    num_workers:    child processes (one per scorer).
    chunk_samples:  samples per work item (the load-balancing grain).
    Other arguments: as for `IsolatedScorer`.
    """

    def __init__(
        self,
        num_workers: int = 2,
        reward_fn: str = DEFAULT_REWARD_FN,
        *,
        timeout_s: float = 5.0,
        fn_kwargs: dict[str, Any] | None = None,
        memory_limit_mb: int | None = 2048,
        chunk_samples: int = 32,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if chunk_samples < 1:
            raise ValueError(f"chunk_samples must be >= 1, got {chunk_samples}")
        self.num_workers = num_workers
        self.chunk_samples = chunk_samples
        load_reward_fn(reward_fn)  # a bad path fails here, once, with its name

        def new_scorer(_: int) -> IsolatedScorer:
            return IsolatedScorer(
                reward_fn,
                timeout_s=timeout_s,
                fn_kwargs=fn_kwargs,
                memory_limit_mb=memory_limit_mb,
                max_samples_per_message=chunk_samples,
            )

        self._executor = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="reward-pool")
        futures = [self._executor.submit(new_scorer, k) for k in range(num_workers)]  # children start in parallel
        self.scorers: list[IsolatedScorer] = []
        try:
            for future in futures:
                self.scorers.append(future.result())
        except BaseException:
            self._executor.shutdown(wait=True)
            for future in futures:
                if future.exception() is None:
                    future.result().close()
            raise
        self._idle: queue.SimpleQueue[IsolatedScorer] = queue.SimpleQueue()
        for scorer in self.scorers:
            self._idle.put(scorer)

    def score_batch(
        self,
        responses: Sequence[str],
        ground_truths: Sequence[str],
        extras: Sequence[dict[str, Any] | None] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> list[RewardResult]:
        """Score a batch in parallel; results in input order. `on_progress(done, total)` is called from the
        calling thread as chunks finish."""
        samples = check_samples(responses, ground_truths, extras)
        step = self.chunk_samples
        futures = [
            self._executor.submit(self._run_chunk, samples[start : start + step])
            for start in range(0, len(samples), step)
        ]
        results: list[RewardResult] = []
        for future in futures:
            results.extend(future.result())
            if on_progress is not None:
                on_progress(len(results), len(samples))
        return results

    @property
    def restarts(self) -> int:
        """Child processes replaced so far, over all scorers."""
        return sum(scorer.restarts for scorer in self.scorers)

    def close(self) -> None:
        """Stop every child process and the threads (idempotent)."""
        self._executor.shutdown(wait=True)
        for scorer in self.scorers:
            scorer.close()

    def __enter__(self) -> ScorerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run_chunk(self, samples: Sequence[Sample]) -> list[RewardResult]:
        scorer = self._idle.get()
        try:
            return scorer.score_samples(samples)
        finally:
            self._idle.put(scorer)
