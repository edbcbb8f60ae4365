"""The scorer child process: `python -m reward.child FD`, started and fed by `reward.pool.IsolatedScorer`.

Protocol over the socket FD (multiprocessing `Connection`, pickled messages):
  parent -> child  {"reward_fn", "fn_kwargs", "memory_limit_mb", "sys_path"}   once, first
  child  -> parent ("ready", None)  or  ("fatal", message) and exit
  parent -> child  (batch_id, [(response, ground_truth, extra), ...])           any number of times
  child  -> parent (batch_id, (correct, score, status, extracted, error))      once per sample, in order
The child exits when the socket closes. It never evaluates sample text itself; it only calls the reward fn.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from reward.loader import load_reward_fn
from reward.result import STATUS_ERROR, RewardResult, as_reward_result

ResultFields = tuple[bool, float, str, "str | None", "str | None"]


def main(fd: int) -> None:
    """Serve the parent on socket `fd` until it closes (see the module docstring)."""
    conn = Connection(fd)
    _die_with_parent()
    try:
        config = conn.recv()
        for entry in reversed(config["sys_path"]):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        fn = load_reward_fn(config["reward_fn"])
        fn_kwargs = config["fn_kwargs"]
        if config["memory_limit_mb"] is not None:
            import resource

            # the limit is on top of what is mapped now (interpreter + reward fn imports, e.g. torch)
            limit = _address_space_bytes() + config["memory_limit_mb"] * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    sys.setrecursionlimit(10_000)
    conn.send(("ready", None))
    while True:
        try:
            batch_id, samples = conn.recv()
        except (EOFError, OSError):
            return
        for response, ground_truth, extra in samples:
            conn.send((batch_id, score_one(fn, response, ground_truth, extra, fn_kwargs)))


def score_one(
    fn: Callable[..., Any], response: str, ground_truth: str, extra: dict[str, Any], fn_kwargs: dict[str, Any]
) -> ResultFields:
    """Run the reward fn on one sample; every exception (SystemExit included) becomes an "error" result."""
    try:
        result = as_reward_result(fn(response, ground_truth, extra, **fn_kwargs))
    except (Exception, SystemExit) as e:
        try:
            message = f"{type(e).__name__}: {e}"
        except Exception:  # noqa: BLE001 - str() of the exception itself failed
            message = type(e).__name__
        result = RewardResult.failed(STATUS_ERROR, message)
    return (result.correct, result.score, result.status, result.extracted, result.error)


def _address_space_bytes() -> int:
    """This process's current virtual memory size (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the parent exits, so a hung child never outlives its owner (best effort)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except OSError:
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(0)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops us
    main(int(sys.argv[1]))
