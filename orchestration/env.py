"""Environment defaults for a machine without network (this CPU box, CI, a laptop): an offline Hugging Face
hub (a hub id otherwise retries for ~48 s), offline wandb (with an API key and no mode wandb.init hangs),
vLLM's engine in-process with a 1 GiB KV cache, and a local Ray without token auth or usage stats.

`use_local_defaults()` sets each variable only where the user has not set it. Tests, benchmarks and the demo
call it first thing, before vLLM, Ray or wandb are imported.
"""

from __future__ import annotations

import os

LOCAL_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def use_local_defaults() -> None:
    """Set every LOCAL_DEFAULTS variable that is not already set."""
    for key, value in LOCAL_DEFAULTS.items():
        os.environ.setdefault(key, value)
