"""Stack dumps of Ray workers, so that a phase that hangs fails with the stuck actor's stack.

Every Ray worker of a run runs `install` at start (Ray's `worker_process_setup_hook`, set in
orchestration.run.init_ray): it registers a faulthandler that, on SIGUSR2, writes all of that process's
thread stacks to `<stack_dir>/<pid>.txt`. When a phase exceeds its deadline, the driver signals every
registered worker on this node and collects the new dumps (`collect`). Workers on other nodes of a cluster
write their dumps to the same path on their own node.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import time
from pathlib import Path

STACK_DIR_ENV = "FIPO_STACK_DIR"
DUMP_SIGNAL = signal.SIGUSR2
# Path fragments of our own code: a dump is shown when one of its threads runs inside them.
PROJECT_PATHS = (
    "/actors/",
    "/rollout/",
    "/learner/",
    "/reward/",
    "/advantage/",
    "/orchestration/",
    "/tools/",
    "/tests/",
    "/bench/",
)
_open_files: list = []  # faulthandler needs its file to stay open for the life of the process


def install() -> None:
    """Ray worker_process_setup_hook: register the stack dump (no-op without FIPO_STACK_DIR)."""
    stack_dir = os.environ.get(STACK_DIR_ENV)
    if not stack_dir:
        return
    Path(stack_dir).mkdir(parents=True, exist_ok=True)
    f = open(Path(stack_dir) / f"{os.getpid()}.txt", "w")  # noqa: SIM115 - must outlive this function
    faulthandler.register(DUMP_SIGNAL, file=f, all_threads=True, chain=False)
    _open_files.append(f)


def collect(stack_dir: str | Path, *, wait_s: float = 1.0, max_lines: int = 60) -> str:
    """Signal every registered worker, wait, and return the new stack dumps that show project code."""
    stack_dir = Path(stack_dir)
    if not stack_dir.is_dir():
        return "(no stack dumps: the stack directory does not exist)"
    before: dict[Path, int] = {}
    for path in stack_dir.glob("*.txt"):
        try:
            size = path.stat().st_size  # before the signal: faulthandler may write the dump at once
            os.kill(int(path.stem), DUMP_SIGNAL)
            before[path] = size
        except (ProcessLookupError, PermissionError, ValueError, FileNotFoundError):
            continue
    time.sleep(wait_s)
    dumps = []
    for path, size in before.items():
        with path.open() as f:
            f.seek(size)
            text = f.read()
        lines = text.splitlines()
        # keep only threads that run our code or a blocking call inside it
        if any(part in text for part in PROJECT_PATHS):
            dumps.append(f"--- worker pid {path.stem} ---\n" + "\n".join(lines[:max_lines]))
    return "\n".join(dumps) if dumps else "(no worker was running project code)"
