"""orchestration/cluster/cpus.py: binding a process's threads to cores and raising their niceness. Run in a child
process (the pytest process keeps its own placement); checked from /proc, thread by thread."""

import os
import subprocess
import sys
import textwrap

import pytest

from orchestration.cluster.cpus import resolve_cpus

CHILD = textwrap.dedent(
    """
    import json, os, sys, threading
    from orchestration.cluster.cpus import place_this_process

    def proc_view():  # per thread: (allowed cores, niceness) as the kernel reports them
        view = {}
        for tid in os.listdir("/proc/self/task"):
            status = open(f"/proc/self/task/{tid}/status").read()
            cpus = [line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list")][0]
            nice = int(open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()[16])
            view[tid] = (cpus, nice)
        return view

    stop = threading.Event()
    early = threading.Thread(target=stop.wait, daemon=True)  # started before the placement
    early.start()
    cpus, nice = json.loads(sys.argv[1])
    result = place_this_process(cpus, nice)
    late = threading.Thread(target=stop.wait, daemon=True)  # started after it: inherits from the main thread
    late.start()
    lowered = place_this_process(None, None if nice is None else nice - 1)  # never lowers
    print(json.dumps({"result": result, "lowered": lowered, "threads": proc_view()}))
    stop.set()
    """
)


def run_child(cpus, nice):
    import json

    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([cpus, nice])], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_every_thread_is_bound_and_reniced_and_niceness_is_never_lowered():
    usable = sorted(os.sched_getaffinity(0))
    core = usable[-1]  # position len - 1 among the usable cores
    nice = min(os.getpriority(os.PRIO_PROCESS, 0) + 3, 19)
    got = run_child([len(usable) - 1], nice)
    assert got["result"] == {"cpus": [core], "nice": nice}
    assert got["lowered"] == {"cpus": [core], "nice": nice}
    assert len(got["threads"]) == 3  # main, the thread started before, the one started after
    assert all(view == [str(core), nice] for view in got["threads"].values()), got["threads"]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_nothing_changes_when_nothing_is_asked():
    got = run_child(None, None)
    assert got["result"] == {"cpus": sorted(os.sched_getaffinity(0)), "nice": os.getpriority(os.PRIO_PROCESS, 0)}


def test_cores_are_positions_among_the_usable_ones_and_bad_ones_name_the_key():
    usable = sorted(os.sched_getaffinity(0))
    assert resolve_cpus([0], "cluster.rollout_cpus") == [usable[0]]
    assert resolve_cpus([len(usable) - 1, 0], "cluster.rollout_cpus") == [usable[-1], usable[0]]
    with pytest.raises(ValueError, match=r"cluster.rollout_cpus: \[\] is not"):
        resolve_cpus([], "cluster.rollout_cpus")
    with pytest.raises(ValueError, match=rf"cluster.rollout_cpus: \[{len(usable)}\] is not .* positions"):
        resolve_cpus([len(usable)], "cluster.rollout_cpus")
    with pytest.raises(ValueError, match=r"cluster.rollout_cpus: \[-1\] is not"):
        resolve_cpus([-1], "cluster.rollout_cpus")
