"""Where the processes of a local run sit on the machine's cores (cluster.rollout_cpus, cluster.learner_nice).

On a small machine the overlapped loop (trainer.max_staleness >= 1) runs three busy threads on two cores: the
engine's (vLLM's CPU build computes in one thread) and one per learner rank. Left to the scheduler, the engine
moves between the cores and shares each with a learner rank, and its working set (the weights and KV cache of
the tiny model fit the 4 MiB L2 of a core) is evicted again and again. Bound to one core, with the learner
ranks one step lower in priority, the engine keeps its core and its caches; the ranks share the other core while
it generates, and take both cores when it is idle. Numbers: bench/RESULTS.md, "Issue 15: CPU placement".

`place_this_process` runs in each worker process, as the first thing it does (the groups' `process_setup`
hook); threads started later inherit the binding and the niceness from the thread that starts them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def place_this_process(cpus: Sequence[int] | None = None, nice: int | None = None) -> dict:
    """Bind every thread of this process to the cores at positions `cpus` among those it may use (see
    resolve_cpus; None: leave as is) and raise its niceness to at least `nice` (None: leave as is; niceness is
    never lowered, which would need privileges). Returns what the process has now: {"cpus": sorted cores,
    "nice": niceness}."""
    cores = None if cpus is None else resolve_cpus(cpus, "cluster.rollout_cpus")
    tids = [int(tid) for tid in os.listdir("/proc/self/task")]
    for tid in tids:
        try:
            if cores is not None:
                os.sched_setaffinity(tid, cores)
            if nice is not None and os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
    return {"cpus": sorted(os.sched_getaffinity(0)), "nice": os.getpriority(os.PRIO_PROCESS, 0)}


def resolve_cpus(positions: Sequence[int], key: str) -> list[int]:
    """The cores at `positions` in the sorted list of cores this process may use ([0]: the first one, whatever
    its number, e.g. in a container limited to cores 4-7). ValueError naming `key` when that is not possible."""
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError(f"{key}: binding processes to cores needs Linux (os.sched_setaffinity); set it to null")
    allowed = sorted(os.sched_getaffinity(0))
    if not positions or any(not 0 <= p < len(allowed) for p in positions):
        raise ValueError(
            f"{key}: {list(positions)} is not a non-empty list of positions among this machine's "
            f"{len(allowed)} usable cores {allowed} (0 = the first)"
        )
    return [allowed[p] for p in positions]
