"""Checkpoints and resume: `checkpoints/step_<k>/` holds everything needed to continue exactly after step k.

step_<k>/learner/             sharded training state (model, optimizer, scheduler, RNG per rank)
step_<k>/hf/                  a Hugging Face export (safetensors + config + tokenizer) vLLM/transformers load
step_<k>/pending.pt           with trainer.max_staleness 1: the batch already collected for step k + 1
                              (orchestration/pipeline.py), so the resumed run trains on exactly that batch
step_<k>/trainer_state.json   step, policy version, sampler position, round sizer, wandb run id; written
                              LAST, so a directory without it is an interrupted save and is ignored (and
                              replaced)

Snapshots (`trainer.snapshot_every`) are the same minus the HF export, in `snapshots/step_<k>/`, only the
newest kept: cheap restore points, so that a learner restart replays fewer steps. Resuming and restarting
use the newest complete checkpoint or snapshot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
PENDING_FILE = "pending.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    """What the driver needs to continue. `step` counts completed training steps."""

    step: int = 0
    policy_version: int = 0
    sampler: dict[str, int] = field(default_factory=dict)
    wandb_run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def step_of(path: Path) -> int:
    """The step a checkpoint or snapshot directory (`.../step_<k>`) was saved after."""
    match = _STEP_DIR.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not a step_<k> directory")
    return int(match.group(1))


class CheckpointManager:
    """Saves and finds checkpoints under `<output_dir>/checkpoints`, keeping the newest `keep` (0 = all), and
    snapshots under `<output_dir>/snapshots`, keeping the newest."""

    def __init__(self, output_dir: str | Path, keep: int = 2) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.snapshot_root = Path(output_dir) / "snapshots"
        self.keep = keep
        self.this_run: list[Path] = []
        """The checkpoints and snapshots this run resumed from or saved: its restore points (a stale checkpoint
        that an earlier run left in the same folder never is one)."""

    def step_dir(self, step: int, *, snapshot: bool = False) -> Path:
        return (self.snapshot_root if snapshot else self.root) / f"step_{step}"

    def complete(self, *, snapshots: bool = False) -> list[Path]:
        """Complete checkpoint (or snapshot) directories, oldest first."""
        root = self.snapshot_root if snapshots else self.root
        if not root.is_dir():
            return []
        found = [path for path in root.iterdir() if _STEP_DIR.match(path.name) and (path / STATE_FILE).is_file()]
        return sorted(found, key=step_of)

    def latest(self) -> Path | None:
        """The newest complete checkpoint or snapshot (a checkpoint when both hold the same step)."""
        return _newest(self.complete(snapshots=True) + self.complete())

    def restore_point(self) -> Path | None:
        """The newest complete checkpoint or snapshot of this run (None: the run's start)."""
        return _newest([path for path in self.this_run if (path / STATE_FILE).is_file()])

    def save(self, state: TrainerState, learner: Any, *, snapshot: bool = False, pending: Any = None) -> Path:
        """Save the learner's sharded state (and, unless a snapshot, an HF export), the `pending` batch when
        there is one, then the trainer state, then prune."""
        path = self.step_dir(state.step, snapshot=snapshot)
        if path.exists():  # an interrupted save of this step, or a re-run after resume: start clean
            shutil.rmtree(path)
        path.mkdir(parents=True)
        learner.save_checkpoint(str(path / "learner"))
        if not snapshot:
            learner.export_hf(str(path / "hf"))
        if pending is not None:
            import torch

            torch.save(pending, path / PENDING_FILE)
        tmp = path / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(state), indent=2))
        os.replace(tmp, path / STATE_FILE)
        self.this_run.append(path)
        self._prune(snapshots=snapshot)
        return path

    @staticmethod
    def pending(path: str | Path) -> Any:
        """The pending batch saved with the checkpoint at `path` (None when it has none)."""
        file = Path(path) / PENDING_FILE
        if not file.is_file():
            return None
        import torch

        return torch.load(file, weights_only=False)  # our own file: a RolloutBatch and its metrics

    def load(self, path: str | Path, learner: Any) -> TrainerState:
        """Restore the learner from `path` and return the trainer state saved with it."""
        path = Path(path)
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
        state = TrainerState(**json.loads(state_file.read_text()))
        learner.load_checkpoint(str(path / "learner"))
        self.this_run.append(path)
        return state

    def _prune(self, *, snapshots: bool) -> None:
        keep = 1 if snapshots else self.keep
        if keep <= 0:
            return
        for old in self.complete(snapshots=snapshots)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _newest(paths: list[Path]) -> Path | None:
    """The path of the highest step; on a tie the later one in `paths`."""
    return max(reversed(paths), key=step_of, default=None)
