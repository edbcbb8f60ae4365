"""The fault-injection grammar (`trainer.fault_inject`): config vocabulary, parsed once when the config is
validated. What a fault does to a worker is orchestration/cluster/faults.py.

    KIND:INDEX@STEP:PHASE[:always][:node]     e.g. rollout:0@1:generate, learner:1@2:update:always
"""

from __future__ import annotations

from dataclasses import dataclass

PHASES = {
    "rollout": ("generate", "update_weights"),
    "learner": ("compute_log_probs", "update", "weight_buckets", "save_checkpoint", "export_hf"),
    "reward": ("score",),
    "advantage": ("compute",),
}
"""The phases a fault can be injected in, per kind of worker (the calls that submit work to it)."""
GRAMMAR = "KIND:INDEX@STEP:PHASE[:always][:node] (e.g. rollout:0@1:generate, learner:1@2:update:always)"
FLAGS = ("always", "node")


@dataclass(frozen=True)
class FaultSpec:
    """One injected fault: SIGKILL worker `index` of `kind` at `step` in `phase` (on every attempt if `always`;
    its whole node if `node`)."""

    kind: str
    index: int
    step: int
    phase: str
    always: bool = False
    node: bool = False

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """`KIND:INDEX@STEP:PHASE[:always][:node]` → FaultSpec; ValueError naming what is wrong and the grammar."""
        try:
            worker, when = text.strip().split("@")
            kind, index = worker.split(":")
            step, phase, *flags = when.split(":")
            spec = cls(kind, int(index), int(step), phase, "always" in flags, "node" in flags)
        except ValueError:
            raise ValueError(f"{text!r} is not {GRAMMAR}") from None
        if kind not in PHASES:
            raise ValueError(f"{text!r}: kind must be one of {list(PHASES)}")
        if phase not in PHASES[kind]:
            raise ValueError(f"{text!r}: a {kind} phase must be one of {list(PHASES[kind])}")
        if spec.index < 0 or spec.step < 0 or any(f not in FLAGS for f in flags) or len(set(flags)) < len(flags):
            raise ValueError(f"{text!r}: INDEX and STEP must be >= 0 and the flags are 'always' and 'node'; {GRAMMAR}")
        return spec
