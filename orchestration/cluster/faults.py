"""Lost workers: what the trainer counts and prints when it replaces one, and the fault-injection switch.

Who recovers what (docs/reliability.md): a lost rollout engine is restarted by its group and only its shard
regenerated (rollout/group.py); a lost reward actor is replaced and only its shard re-scored (reward/group.py);
a failed learner group is rebuilt and the run replayed from its newest restore point (`recover_learner` in
orchestration/steps.py); a lost advantage actor is replaced and its call submitted again
(advantage/group.py). `Faults` is the driver's record of all of them: every restart is printed with its
cause and counted in the metrics (`fault/*`), and a learner step that fails more than `trainer.max_restarts`
times ends the run (`RestartBudgetError`).

Fault injection (`trainer.fault_inject`, for tests and drills), one string per fault:

    KIND:INDEX@STEP:PHASE[:always][:node]

    KIND    rollout | learner | reward | advantage
    INDEX   which worker: rollout worker, learner rank or reward worker, from 0 (the advantage actor: 0)
    STEP    the training step, from 0 (as `step` in metrics.jsonl)
    PHASE   rollout: generate | update_weights
            learner: compute_log_probs | update | weight_buckets | save_checkpoint | export_hf
            reward:  score
            advantage: compute
    always  kill on every attempt (the run must then end with the bounded error); without it, once
    node    lose the worker's whole Ray node instead of its process: every process of that node (raylet, object
            store, workers) is SIGKILLed at once, as when a machine is lost. For a local multi-node cluster
            (tools/local_cluster.py: each node is a session of its own on this machine); the driver's
            node is refused

e.g. `trainer.fault_inject=[rollout:0@1:generate,learner:1@2:update]`. The worker's process gets a real
SIGKILL right after the phase's remote calls are submitted (generate covers the evaluation's generation of
that step too), the advantage actor's just before its call (which takes milliseconds: a kill sent after it
would race with its result): `os.kill` from the driver when the worker runs on the driver's node, otherwise
a Ray task pinned to its node kills it. Only the run's own actors are ever killed, by their process ids.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

from actors import on_node
from orchestration.cluster.processes import kill_session, session_pids
from orchestration.config.faults import FaultSpec


class RestartBudgetError(RuntimeError):
    """A worker kept failing: more than trainer.max_restarts restarts for one step."""


def kill_process(pid: int, node_id: str | None) -> None:
    """SIGKILL the process `pid` on Ray node `node_id` (a worker of this run; None: this machine)."""
    import ray

    if node_id is None or node_id == ray.get_runtime_context().get_node_id():
        os.kill(pid, signal.SIGKILL)
        return
    ray.get(on_node(node_id, os.kill, pid, signal.SIGKILL))


def kill_node(node_id: str) -> None:
    """Lose Ray node `node_id` as a machine is lost: a task pinned to it SIGKILLs every process of the node's
    session (itself included). Only for a local multi-node cluster, where each node is a `ray start` session of
    its own: ValueError for the driver's node, and (on the node) for a session that is not exactly one node's."""
    import ray

    if node_id == ray.get_runtime_context().get_node_id():
        raise ValueError("a node fault cannot take the driver's own node (the run would end with it)")
    ref = on_node(node_id, _kill_own_node, max_retries=0)
    ready, _ = ray.wait([ref], timeout=30)
    if ready:
        try:
            ray.get(ref)
        except ray.exceptions.RayTaskError:  # it refused: not one node's session
            raise
        except ray.exceptions.RayError:  # the node died under it (NodeDiedError, WorkerCrashedError): as asked
            pass


def _kill_own_node() -> None:
    sid = os.getsid(0)
    raylets = [pid for pid in session_pids(sid) if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet"]
    if len(raylets) != 1:
        raise ValueError(
            f"node fault: this node's session {sid} holds {len(raylets)} raylets; node faults need a local "
            "multi-node cluster (tools/local_cluster.py), where every node is a session of its own"
        )
    kill_session(sid)


def say(message: str) -> None:
    """A line on the console about a fault (stderr, like the progress line)."""
    print(f"fault: {message}", file=sys.stderr, flush=True)


class Faults:
    """The run's record of lost workers and its injected faults.

    specs: the faults to inject (`trainer.fault_inject`); max_restarts: `trainer.max_restarts`.
    `step` is set by the training loop at the start of each step (injection matches it).
    """

    def __init__(self, specs: list[FaultSpec], max_restarts: int) -> None:
        self.specs = specs
        self.max_restarts = max_restarts
        self.step = 0
        self.restarts = Counter({"rollout": 0, "learner": 0, "reward": 0, "advantage": 0})
        self.replayed_steps = 0
        self.recovery_seconds = 0.0
        self.events: list[dict[str, Any]] = []
        """One entry per restart: kind, index, phase, step, seconds (from the kill, or from the loss being
        seen, to the work continuing), cause."""
        self._fired: set[FaultSpec] = set()
        self._killed_at: dict[str, float] = {}  # kind → time.monotonic() of an injected kill not yet recovered
        self._node_killed_at: float | None = None  # an injected node loss of this step: restarts count from it
        self._learner_failures: Counter[int] = Counter()  # failing step → failures

    def attach(self, kind: str, group: Any) -> None:
        """Install the reporting hook on a worker group (and the injection hook when a fault targets `kind`)."""
        if kind != "learner":
            group.on_restart = partial(self.restarted, kind)
        if any(spec.kind == kind for spec in self.specs):
            group.on_submit = partial(self.submitted, kind)

    def submitted(self, kind: str, phase: str, processes: dict[int, tuple[int, str]]) -> None:
        """Group hook: tasks of `phase` were just submitted to the workers `processes` ({index: (pid, node)})."""
        for spec in self.specs:
            due = spec.kind == kind and spec.step == self.step and spec.phase == phase and spec.index in processes
            if due and (spec.always or spec not in self._fired):
                self._fired.add(spec)
                pid, node_id = processes[spec.index]
                if spec.node:
                    say(f"injected: node {node_id[:12]} of {kind} {spec.index} lost at step {self.step} in {phase}")
                    self._node_killed_at = time.monotonic()
                    kill_node(node_id)
                    continue
                say(f"injected: SIGKILL {kind} {spec.index} (pid {pid}) at step {self.step} in {phase}")
                self._killed_at[kind] = time.monotonic()
                kill_process(pid, node_id)

    def restarted(
        self, kind: str, index: int | None, phase: str, cause: str, lost_at: float, *, restarts: int = 1
    ) -> None:
        """Group hook: worker `index` of `kind` (None: the group) was lost in `phase`, replaced (`restarts` times,
        when it was lost again while being restored), and its work continues now."""
        killed_at = min(self._killed_at.pop(kind, lost_at), lost_at, self._node_killed_at or lost_at)
        seconds = time.monotonic() - killed_at
        self.restarts[kind] += restarts
        self.recovery_seconds += seconds
        self.events.append(dict(kind=kind, index=index, phase=phase, step=self.step, seconds=seconds, cause=cause))
        who = f"{kind} {index}" if index is not None else f"{kind} group"
        say(
            f"{who} lost at step {self.step} in {phase} ({' '.join(cause.split())[:240]}); replaced, "
            f"continuing {seconds:.1f} s after the loss (restart {self.restarts[kind]} of this run)"
        )

    def learner_failed(self, step: int, phase: str, worker: str, error: BaseException) -> None:
        """Count a failure of the learner group at `step` in `phase`; RestartBudgetError (with the last error)
        when that step has failed more than max_restarts times."""
        self._learner_failures[step] += 1
        failures = self._learner_failures[step]
        if failures > self.max_restarts:
            raise RestartBudgetError(
                f"{worker} failed at step {step} in phase '{phase}' ({failures} failure(s) of this step; "
                f"trainer.max_restarts={self.max_restarts} restarts allowed). Last error:\n{error}"
            ) from error

    def metrics(self) -> dict[str, float]:
        """Cumulative counts for the step's metrics (called once at the end of each step: an injected node loss
        of this step stops being the start of later restarts' recovery times)."""
        self._node_killed_at = None
        return {
            "fault/rollout_restarts": float(self.restarts["rollout"]),
            "fault/learner_restarts": float(self.restarts["learner"]),
            "fault/reward_restarts": float(self.restarts["reward"]),
            "fault/advantage_restarts": float(self.restarts["advantage"]),
            "fault/replayed_steps": float(self.replayed_steps),
            "fault/recovery_seconds": self.recovery_seconds,
        }
