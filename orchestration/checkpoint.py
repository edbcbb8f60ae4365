"""Checkpoints and resume: `checkpoints/step_<k>/` holds everything needed to continue exactly after step k.

step_<k>/learner/             sharded training state (model, optimizer, scheduler, RNG per rank)
step_<k>/hf/                  a Hugging Face export (safetensors + config + tokenizer) vLLM/transformers load
step_<k>/pending.pt           with trainer.max_staleness 1: the batch already collected for step k + 1
                              (orchestration/pipeline.py), so the resumed run trains on exactly that batch
step_<k>/trainer_state.json   step, policy version, sampler position, round sizer, wandb run id, and the
                              manifest: every other file of the directory with its size in bytes; written
                              LAST (through a temporary file, flushed, then renamed)

Snapshots (`trainer.snapshot_every`) are the same minus the HF export, in `snapshots/step_<k>/`, only the
newest kept: cheap restore points, so that a learner restart replays fewer steps. Resuming and restarting
use the newest complete checkpoint or snapshot.

Complete means: trainer_state.json is there, is valid JSON holding a trainer state of this step, and every
file its manifest lists is there with the size it had when saved. Anything else (a save interrupted before
the state file, a state file cut short, a shard or rank file deleted, a file truncated) is skipped by
`latest()` and `restore_point()`, which print one line per skipped directory with the file and the reason,
and take the next older complete one. Sizes catch truncation, missing files and files that grew; they do not
catch a file whose bytes changed at the same size (bit rot, an overwrite of the same length): the files are
never read back (on a real model that costs minutes per save and per resume). A checkpoint saved before
manifests existed (no `manifest` in its state) is taken as before, unchecked, with a line saying so.

A save that fails on storage (disk full, quota, read-only or failing file system; `storage_error`) removes its
partial directory and raises CheckpointError naming the directory, the file and the OS's reason; the older
checkpoints are untouched (pruning to `keep` only runs after a save is complete), so the run can be resumed
once there is space.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
PENDING_FILE = "pending.pt"
MANIFEST_KEY = "manifest"
"""The key of trainer_state.json that lists the directory's other files: {relative posix path: bytes}."""
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM})
"""OS errors that say the storage cannot take the checkpoint (and retrying the step would fail the same way)."""
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint or snapshot could not be written; the message names its directory, the file and the OS's
    reason, and where the run can resume from."""


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

    def step_dirs(self, *, snapshots: bool = False) -> list[Path]:
        """Every `step_<k>` directory, complete or not, oldest first."""
        root = self.snapshot_root if snapshots else self.root
        if not root.is_dir():
            return []
        return sorted((path for path in root.iterdir() if _STEP_DIR.match(path.name) and path.is_dir()), key=step_of)

    def complete(self, *, snapshots: bool = False) -> list[Path]:
        """Complete checkpoint (or snapshot) directories (`problem` finds none), oldest first."""
        return [path for path in self.step_dirs(snapshots=snapshots) if problem(path) is None]

    def latest(self) -> Path | None:
        """The newest complete checkpoint or snapshot (a checkpoint when both hold the same step); prints a line
        for each newer directory it skipped, naming the file and the reason."""
        return _newest_complete(self.step_dirs(snapshots=True) + self.step_dirs())

    def restore_point(self) -> Path | None:
        """The newest complete checkpoint or snapshot of this run (None: the run's start); prints a line for each
        newer one it skipped, as `latest`."""
        return _newest_complete(list(reversed(dict.fromkeys(reversed(self.this_run)))))

    def save(self, state: TrainerState, learner: Any, *, snapshot: bool = False, pending: Any = None) -> Path:
        """Save the learner's sharded state (and, unless a snapshot, an HF export), the `pending` batch when
        there is one, then the trainer state with the manifest of the files written, then prune. A storage
        error (`storage_error`) removes the partial directory and raises CheckpointError; the older
        checkpoints stay as they were."""
        path = self.step_dir(state.step, snapshot=snapshot)
        if path.exists():  # an interrupted save of this step, or a re-run after resume: start clean
            shutil.rmtree(path)
        target = path
        try:
            path.mkdir(parents=True)
            target = path / "learner"
            learner.save_checkpoint(str(target))
            if not snapshot:
                target = path / "hf"
                learner.export_hf(str(target))
            if pending is not None:
                import torch

                target, buffer = path / PENDING_FILE, io.BytesIO()
                torch.save(pending, buffer)  # in memory first: torch's own file writer hides the OS error
                _write(target, buffer.getbuffer())
            target = path / STATE_FILE
            _write(target, json.dumps(asdict(state) | {MANIFEST_KEY: manifest(path)}, indent=2).encode())
        except BaseException as err:  # torch.distributed.checkpoint raises a BaseException
            cause = storage_error(err)
            if cause is None:
                raise
            shutil.rmtree(path, ignore_errors=True)
            raise CheckpointError(self._failed_save(path, snapshot, cause, target)) from err
        self.this_run.append(path)
        self._prune(snapshots=snapshot)
        return path

    def _failed_save(self, path: Path, snapshot: bool, cause: OSError, target: Path) -> str:
        reason = os.strerror(cause.errno) if cause.errno is not None else str(cause)
        code = errno.errorcode.get(cause.errno, "") if cause.errno is not None else ""
        previous = _newest(self.complete(snapshots=True) + self.complete())
        then = f"a resume (trainer.resume=auto) continues from {previous}" if previous else "nothing to resume from yet"
        return (
            f"{'snapshot' if snapshot else 'checkpoint'} {path.name}: could not write {cause.filename or target}: "
            f"{reason}{f' ({code})' if code else ''}; the partial {path} was removed, older checkpoints are intact: "
            f"{then}"
        )

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
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
        record = _read_state(path)
        if isinstance(record, str):
            raise ValueError(f"{path} is not a complete checkpoint: {record}")
        record.pop(MANIFEST_KEY, None)
        state = TrainerState(**record)
        learner.load_checkpoint(str(path / "learner"))
        self.this_run.append(path)
        return state

    def _prune(self, *, snapshots: bool) -> None:
        keep = 1 if snapshots else self.keep
        if keep <= 0:
            return
        for old in self.complete(snapshots=snapshots)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def manifest(path: Path) -> dict[str, int]:
    """Every file under `path` but the trainer state (and its temporary file): {relative posix path: bytes}."""
    skip = {STATE_FILE, STATE_FILE + ".tmp"}
    return {
        file.relative_to(path).as_posix(): file.stat().st_size
        for file in sorted(path.rglob("*"))
        if file.is_file() and file.relative_to(path).as_posix() not in skip
    }


def problem(path: Path) -> str | None:
    """Why the directory `path` is not a complete checkpoint or snapshot (None: it is, or it was saved before
    manifests existed and cannot be checked): no or invalid trainer_state.json, or a file of its manifest
    missing or of another size."""
    record = _read_state(path)
    if isinstance(record, str):
        return record
    files = record.get(MANIFEST_KEY)
    if files is None:
        return None
    wrong = []
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            wrong.append(f"{name} is missing (saved with {size} bytes)")
        elif (actual := file.stat().st_size) != size:
            wrong.append(f"{name} has {actual} bytes, {size} when saved ({'cut short' if actual < size else 'grew'})")
    if not wrong:
        return None
    more = f" (and {len(wrong) - 1} more file(s) of the manifest in {STATE_FILE})" if len(wrong) > 1 else ""
    return wrong[0] + more


def storage_error(err: BaseException) -> OSError | None:
    """The OSError of a full disk, a quota, a read-only or failing file system (STORAGE_ERRNOS) behind `err`:
    `err` itself, an error it was raised from, the original of a Ray task error (`.cause`: a learner rank's),
    a rank's failure inside torch.distributed.checkpoint's CheckpointException (`.failures`), or a safetensors
    I/O error ("os error 28"); None when there is none (a killed rank, a bug: handled as before)."""
    todo: list[Any] = [err]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return e
        if type(e).__name__ == "SafetensorError" and (code := re.search(r"os error (\d+)", str(e))):
            if int(code[1]) in STORAGE_ERRNOS:
                at = re.search(r'at path "([^"]+)"', str(e))
                return OSError(int(code[1]), os.strerror(int(code[1])), at[1] if at else None)
        todo += [e.__cause__, getattr(e, "cause", None)]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return None


def _read_state(path: Path) -> dict[str, Any] | str:
    """trainer_state.json of `path` as a dict, or why it is not a trainer state of this step."""
    file = path / STATE_FILE
    if not file.is_file():
        return f"no {STATE_FILE} (the save did not finish)"
    try:
        record = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"{STATE_FILE} is not valid JSON ({err}; {file.stat().st_size} bytes): cut short or overwritten"
    if not isinstance(record, dict):
        return f"{STATE_FILE} holds a JSON {type(record).__name__}, not a trainer state"
    if unknown := set(record) - {f.name for f in fields(TrainerState)} - {MANIFEST_KEY}:
        return f"{STATE_FILE} is not a trainer state (unknown keys {sorted(unknown)})"
    if not isinstance(record.get("step"), int):
        return f"{STATE_FILE} is not a trainer state (no integer 'step')"
    if record["step"] != step_of(path):
        return f"{STATE_FILE} is the state of step {record['step']}, not of {path.name}"
    if not isinstance(record.get(MANIFEST_KEY, {}), dict):
        return f"{STATE_FILE}: its manifest is not a mapping of file to size"
    return record


def _write(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` through `<path>.tmp`, flushed to disk, then renamed: `path` is whole or absent."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def _newest_complete(paths: list[Path]) -> Path | None:
    """The newest complete one of `paths` (on a tie the later one in `paths`). Prints a line for each newer one
    skipped, and one when the one taken predates manifests (unchecked)."""
    for i in sorted(range(len(paths)), key=lambda i: (step_of(paths[i]), i), reverse=True):
        reason = problem(paths[i])
        if reason is None:
            record = _read_state(paths[i])
            if isinstance(record, dict) and MANIFEST_KEY not in record:
                print(f"checkpoint: {paths[i]} has no manifest (saved by an older version): taken as is", flush=True)
            return paths[i]
        print(f"checkpoint: skipped {paths[i]}: {reason}", flush=True)
    return None


def _newest(paths: list[Path]) -> Path | None:
    """The path of the highest step; on a tie the later one in `paths`."""
    return max(reversed(paths), key=step_of, default=None)
