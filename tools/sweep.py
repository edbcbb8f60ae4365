"""The sweep's Hydra callback (conf/config.yaml, `hydra.callbacks.sweep`): it tells the members which keys the
sweep varies (their folders are named by them: orchestration/config/sweep.py), and when the sweep ends it
compares the members (tools/compare.py) into `<sweep dir>/compare.md`, `compare.json` and `compare.png`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from orchestration.config.sweep import SWEPT_KEYS_ENV, swept_keys
from tools.compare import main as compare_main


class SweepCallback(Callback):
    """Hydra callback (conf/config.yaml, hydra.callbacks.sweep): names members' folders by the swept keys, and
    compares the members when the sweep ends."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        os.environ[SWEPT_KEYS_ENV] = ",".join(swept_keys(list(config.hydra.overrides.task)))

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        group_by = [key for key in swept_keys(list(config.hydra.overrides.task)) if key != "seed"]
        try:
            compare_main(
                [str(sweep_dir), "--output-dir", str(sweep_dir), *(["--group-by", *group_by] if group_by else [])]
            )
        except Exception as err:  # the members' results are on disk; a failed comparison must not hide them
            print(f"sweep: could not compare the runs in {sweep_dir}: {type(err).__name__}: {err}", flush=True)
