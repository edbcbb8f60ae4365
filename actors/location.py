"""Where the calling process runs, as a Ray actor reports it (for the run's layout: run_info.json)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def location() -> dict:
    """{"pid", "node_id", "ip", "gpu_ids"} of the calling Ray worker process: its Ray node's id and IP address,
    and the GPU ids Ray assigned to it (strings; [] when it asked for no GPU). On a CPU node that declares GPUs
    (`ray start --num-gpus=N`) the ids are assigned all the same, and torch sees no CUDA device."""
    import ray

    return {
        "pid": os.getpid(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "ip": ray.util.get_node_ip_address(),
        "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
    }


def on_node(node_id: str, fn: Callable, *args: Any, **options: Any) -> Any:
    """The ref of `fn(*args)` run as a zero-CPU Ray task on node `node_id` and nowhere else (`options`: further
    task options, e.g. max_retries)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    pinned = NodeAffinitySchedulingStrategy(node_id, soft=False)
    return ray.remote(num_cpus=0, **options)(fn).options(scheduling_strategy=pinned).remote(*args)
