"""Placement on a local one-node Ray (orchestration/cluster/layout.py); several nodes: tests/test_multinode.py.

* every role's bundles are placed and the placement hooks put each actor in its own bundle;
* a placement the cluster cannot satisfy raises PlacementError within cluster.placement_timeout_s, naming the
  bundle, what is missing and the keys; `separate` on one node cannot place the engines;
* an actor that asks for nothing cannot be placed: ConfigError naming the keys;
* the layout record and its description name each actor's node.
"""

import re
import time

import pytest
import ray
from test_orchestration_config import load as load_config

from orchestration.cluster.layout import Layout, PlacementError, bundle, describe
from orchestration.config.errors import ConfigError

pytestmark = pytest.mark.ray


def wait_for_cpus(expected: float, message: str, limit_s: float = 60.0) -> None:
    """Wait until Ray's view of the free CPUs is `expected`: the GCS learns of a placement or a removal from the
    raylet's next resource report, so the view lags the call that made it (no sleep stands for that lag here).
    `limit_s` is a bound against a hang only."""
    deadline = time.monotonic() + limit_s
    while ray.available_resources().get("CPU", 0) != pytest.approx(expected):
        assert time.monotonic() < deadline, f"{message}: {ray.available_resources().get('CPU', 0)} CPUs free"
        time.sleep(0.05)


def test_every_role_is_placed_and_each_actor_gets_its_bundle(local_ray):
    cfg = load_config("learner.world_size=2", "rollout.num_workers=1", "reward.num_workers=2")
    layout = Layout(cfg)
    try:
        here = ray.get_runtime_context().get_node_id()
        assert layout.nodes() == {here: ["learner rank 0", "learner rank 1", "rollout engine 0"]}
        assert len(layout.groups) == 1 + 1 + 2 + 1  # learner, engine, 2 scorers, advantage
        strategy = layout.learner(1)["scheduling_strategy"]
        assert strategy.placement_group == layout.learner_group.pg and strategy.placement_group_bundle_index == 1
        assert layout.engine(0)["scheduling_strategy"].placement_group == layout.engine_groups[0].pg
        wait_for_cpus(4 - 2 - 1 - 3 * 0.25, "the layout reserves its bundles")
    finally:
        layout.remove()
    wait_for_cpus(4, "remove() returns every reservation")


@pytest.mark.parametrize(
    ("overrides", "what", "missing", "keys"),
    [
        (["learner.num_gpus_per_rank=1"], r"the learner's 2 rank bundle\(s\): 2 × \{CPU 1, GPU 1\}, strategy PACK",
         r"missing GPU 2 \(the cluster has 0\)", "learner.world_size / learner.num_cpus_per_rank"),
        (["rollout.num_workers=9"], r"rollout engine \d's bundle: 1 × \{CPU 1\}, strategy STRICT_PACK",
         "the cluster has enough in all, but not free on the nodes allowed", "rollout.num_workers"),
        (["cluster.layout=separate"], r"rollout engine 0's bundle: 1 × \{CPU 1\}, strategy STRICT_PACK, not on the "
         r"learner's node\(s\) \['\w+'\]", "not free on the nodes allowed", "cluster.layout"),
    ],
)  # fmt: skip
def test_an_impossible_placement_fails_within_the_bound_naming_it(local_ray, overrides, what, missing, keys):
    # cluster.address=auto: the config's own check of a local Ray's CPUs and GPUs would refuse the first two
    cfg = load_config("learner.world_size=2", "cluster.placement_timeout_s=2", "cluster.address=auto", *overrides)
    start = time.monotonic()
    with pytest.raises(PlacementError) as error:
        Layout(cfg)
    # within the configured bound: one wait of placement_timeout_s (2 s), then the diagnosis and the removal (a
    # few GCS queries: 0.1-0.3 s at a load average of 20 on 2 cores); 10 s of margin covers a machine 5x slower
    assert time.monotonic() - start < 2 + 10
    message = str(error.value)
    assert "placement: not placed within cluster.placement_timeout_s=2 s" in message
    assert re.search(f"{what} — .*{missing}", message), message
    assert keys in message and "the cluster's alive nodes (1):" in message
    wait_for_cpus(4, "a failed layout leaves nothing reserved")


def test_an_actor_that_asks_for_nothing_cannot_be_placed():
    with pytest.raises(ConfigError, match="learner.world_size / learner.num_cpus_per_rank.*asks for no CPU and no GPU"):
        bundle(0, 0, "learner.world_size / learner.num_cpus_per_rank")
    assert bundle(0.5, 2, "k") == {"CPU": 0.5, "GPU": 2.0}


def test_the_layout_description_names_every_actor_per_node():
    entry = lambda i, node, gpus=(): {"index": i, "node_id": node, "ip": "10.0.0.1", "pid": 1, "gpu_ids": list(gpus)}  # noqa: E731
    info = {
        "layout": "separate",
        "learner": [entry(0, "a" * 20, ["0"]), entry(1, "a" * 20, ["1"])],
        "rollout": [entry(0, "b" * 20, ["0"])],
        "reward": [entry(0, "b" * 20)],
        "advantage": [entry(0, "a" * 20)],
        "nodes": {"a" * 20: "10.0.0.1", "b" * 20: "10.0.0.2"},
    }
    assert describe(info).splitlines() == [
        "layout (cluster.layout=separate) over 2 node(s):",
        f"  node {'a' * 12} (10.0.0.1): learner rank 0 [GPU 0], learner rank 1 [GPU 1], advantage",
        f"  node {'b' * 12} (10.0.0.2): rollout engine 0 [GPU 0], reward scorer 0",
    ]
