"""Will it fit? Each role's GPU memory, from the config alone, before a single GPU is reserved.

    python -m tools.plan [the same Hydra overrides as train]     e.g. experiment=fipo_32b cluster.gpu=h200

prints, for the configured cluster and recipe, a table per role and a verdict (orchestration/cluster/fit.py says
how each number is found), and one JSON line last. The same check runs at start-up of a GPU run.
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

from orchestration.cluster.fit import plan
from orchestration.config.schema import register_configs, to_object
from orchestration.errors import clean_exit


def _main() -> None:
    register_configs()

    @hydra.main(config_path="../conf", config_name="config", version_base="1.3")
    def main(cfg: DictConfig) -> None:
        result = plan(to_object(cfg))
        print(result.render(), flush=True)
        print(json.dumps(result.summary()), flush=True)

    main()


if __name__ == "__main__":
    with clean_exit():  # a configuration that cannot work: its message alone, no traceback
        _main()
