"""Hydra sweeps: `python -m orchestration.train -m algorithm=fipo,dapo seed=0,1,2 trainer.total_steps=60`.

* Every member trains into its own folder, `<hydra.sweep.dir>/<the values it sweeps>`, e.g.
  `outputs/sweeps/2026-11-30_10-00-00/algorithm=dapo,seed=1` (conf/config.yaml: `hydra.sweep.subdir` is
  `${sweep_member:${hydra.overrides.task}}`). Only the swept keys name the folder; the overrides every
  member shares are in its `run_info.json` and `.hydra/overrides.yaml`.
* Every member is its own wandb run; the sweep is the wandb group (its folder's name) and the algorithm the
  job type (orchestration/train.py, `logger.group` / `logger.job_type` override both).
* Members run one after the other in one process; a member that fails does not stop the others (Hydra's basic
  sweeper runs them all, then raises the first failure), and whatever a failed member wrote stays on disk.
* When the sweep ends, `SweepCallback` (tools/sweep.py) compares its members (tools/compare.py), grouped by the swept
  keys other than `seed` (seeds are the repetitions), into `<sweep dir>/compare.md`, `compare.json` and
  `compare.png`. After a sweep with a failed member run the
  comparison yourself: `python -m tools.compare <sweep dir>`.

A folder name with "=" or "," cannot be passed back as an unquoted Hydra value; quote it:
`'trainer.output_dir="outputs/sweeps/x/algorithm=dapo,seed=1"'`. Re-running the same sweep command with
`hydra.sweep.dir=<that sweep>` resumes every member from its latest checkpoint instead.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

SWEPT_KEYS_ENV = "FIPO_SWEPT_KEYS"
"""Set by SweepCallback.on_multirun_start for the members (and any launcher's subprocesses): the swept keys."""
MAX_NAME_CHARS = 120


def swept_keys(overrides: Sequence[str]) -> list[str]:
    """The keys of `overrides` (a sweep's command-line overrides) that take several values."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


def member_dirname(task_overrides: Sequence[str]) -> str:
    """A member's folder name: `key=value` of its swept keys (all its overrides when the sweep's keys are not
    known), sorted and joined by ","; "/" becomes "_", and a name over MAX_NAME_CHARS keeps its start plus a hash
    of the whole."""
    swept = set(filter(None, os.environ.get(SWEPT_KEYS_ENV, "").split(",")))
    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    items = sorted(
        f"{o.get_key_element()}={o.get_value_element_as_str()}"
        for o in parsed
        if o.value_type is not None and (not swept or o.key_or_group in swept)
    )
    name = ",".join(items).replace("/", "_") or "default"
    if len(name) > MAX_NAME_CHARS:
        name = f"{name[: MAX_NAME_CHARS - 9]}~{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def register_resolver() -> None:
    """`${sweep_member:...}` for conf/config.yaml (idempotent)."""
    if not OmegaConf.has_resolver("sweep_member"):
        OmegaConf.register_new_resolver("sweep_member", lambda overrides: member_dirname(list(overrides)))
