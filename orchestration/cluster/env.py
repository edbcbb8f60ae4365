"""Environment variables: the run's own (`cluster.env`), and the defaults of a machine without network.

* `cluster.env` (conf/cluster/*.yaml) holds what the run's engines need, e.g. on the CPU cluster vLLM's engine
  core in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`; otherwise its CPU worker reserves 92% of the machine's
  RAM and refuses to start) and a 1 GiB KV cache. `apply_env` sets them in the driver before anything starts,
  and orchestration.run hands them to every Ray worker, so `python -m orchestration.train`, `ray job
  submit` and the demo work the same with nothing exported in the shell.
* `use_local_defaults()` is for tests, benchmarks and the demo on an offline machine (this CPU box, CI, a
  laptop): an offline Hugging Face hub (a hub id otherwise retries for ~48 s), offline wandb (with an API key
  and no mode wandb.init hangs), a local Ray without token auth or usage stats, plus the CPU cluster's env.

Both set a variable only where it is not set already: what the user exported wins.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

LOCAL_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def cluster_env(name: str = "local_cpu") -> dict[str, str]:
    """The `cluster.env` that conf/cluster/<name>.yaml declares."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(CONF_DIR / "cluster" / f"{name}.yaml")
    return {str(key): str(value) for key, value in (node.cluster.get("env") or {}).items()}


def apply_env(env: Mapping[str, str]) -> dict[str, str]:
    """Set each variable of `env` that is not already set; returns the values now in effect."""
    for key, value in env.items():
        os.environ.setdefault(key, str(value))
    return {key: os.environ[key] for key in env}


def use_local_defaults() -> None:
    """LOCAL_DEFAULTS and the CPU cluster's env, where not already set."""
    apply_env(LOCAL_DEFAULTS | cluster_env("local_cpu"))
