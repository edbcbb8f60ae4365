"""The processes of a session on this machine: what a lost node is made of on a local multi-node cluster (each
node a `ray start` session of its own, tools/local_cluster.py), and how the node fault takes them down."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def session_pids(sid: int) -> list[int]:
    """Processes (on this machine) in session `sid`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, session, ...
        if int(fields[3]) == sid and fields[0] != "Z":  # a zombie is gone already (only not yet reaped)
            pids.append(int(entry.name))
    return pids


def kill_session(sid: int, grace_s: float = 0.0) -> None:
    """SIGKILL every process of session `sid` (SIGTERM first and `grace_s` to exit, when grace_s > 0)."""
    if grace_s > 0:
        for pid in session_pids(sid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
    for _ in range(5):  # a process may fork while we kill: repeat until the session is empty
        pids = session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
