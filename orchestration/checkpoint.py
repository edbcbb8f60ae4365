"""Checkpoints and resume: `checkpoints/step_<k>/` holds everything needed to continue exactly after step k.

step_<k>/learner/             sharded training state (model, optimizer, scheduler, RNG per rank)
step_<k>/hf/                  a Hugging Face export (safetensors + config + tokenizer) vLLM/transformers load
step_<k>/trainer_state.json   step, policy version, sampler position, wandb run id; written LAST, so a
                              directory without it is an interrupted save and is ignored (and replaced)
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
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    """What the driver needs to continue. `step` counts completed training steps."""

    step: int = 0
    policy_version: int = 0
    sampler: dict[str, int] = field(default_factory=dict)
    wandb_run_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class CheckpointManager:
    """Saves and finds checkpoints under `<output_dir>/checkpoints`, keeping the newest `keep` (0 = all)."""

    def __init__(self, output_dir: str | Path, keep: int = 2) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step}"

    def complete(self) -> list[Path]:
        """Complete checkpoint directories, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, state: TrainerState, learner: Any, *, export_hf: bool = True) -> Path:
        """Save the learner's sharded state (and an HF export), then the trainer state, then prune."""
        path = self.step_dir(state.step)
        if path.exists():  # an interrupted save of this step, or a re-run after resume: start clean
            shutil.rmtree(path)
        path.mkdir(parents=True)
        learner.save_checkpoint(str(path / "learner"))
        if export_hf:
            learner.export_hf(str(path / "hf"))
        tmp = path / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(state), indent=2))
        os.replace(tmp, path / STATE_FILE)
        self._prune()
        return path

    def load(self, path: str | Path, learner: Any) -> TrainerState:
        """Restore the learner from `path` and return the trainer state saved with it."""
        path = Path(path)
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
        state = TrainerState(**json.loads(state_file.read_text()))
        learner.load_checkpoint(str(path / "learner"))
        return state

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
