"""Where a run's actors go on the Ray cluster (cluster.layout), waited for with a bound, and recorded.

Placement groups reserve the resources before any actor starts:

* the learner: one group, one bundle per rank ({CPU: learner.num_cpus_per_rank, GPU: learner.num_gpus_per_rank}),
  strategy `cluster.learner_strategy` (PACK by default: ranks share a node when they fit there);
* each rollout engine: a group of one bundle ({CPU: rollout.num_cpus_per_worker, GPU:
  rollout.num_gpus_per_worker}), STRICT_PACK: a tensor-parallel engine's GPUs on one node. With
  `cluster.layout=separate` the engines' bundles may only go to nodes that hold no learner rank (a label
  selector on Ray's `ray.io/node-id` label), as on a disaggregated GPU cluster; `packed` lets Ray put them
  wherever they fit;
* each reward scorer and the advantage actor: a group of one bundle ({CPU: 0.25}) wherever there is room.

A group that is not placed within `cluster.placement_timeout_s` (at start-up, or when its bundles are being
re-placed after a node was lost) raises `PlacementError`, naming what the group asked for, what every alive node
has, and the config keys that asked: never an actor pending forever. When a node is lost, Ray re-places the
groups' bundles that were on it on the nodes left (or on a node that joins); the replacement actors wait for
that, within the same bound. (`separate` excludes the learner's nodes of the start: a learner re-placed after a
loss may land beside engines.)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors import on_node
from orchestration.config.errors import ConfigError
from orchestration.config.schema import SMALL_ACTOR_CPUS, TrainConf

NODE_ID_LABEL = "ray.io/node-id"
LEARNER_KEYS = "learner.world_size / learner.num_cpus_per_rank / learner.num_gpus_per_rank / cluster.learner_strategy"
ENGINE_KEYS = "rollout.num_workers / rollout.num_cpus_per_worker / rollout.num_gpus_per_worker / cluster.layout"
SCORER_KEYS = "reward.num_workers (a quarter of a CPU each)"
ADVANTAGE_KEYS = "the advantage actor (a quarter of a CPU; always one)"


class PlacementError(RuntimeError):
    """A placement group was not placed in time; the message names the resources, the nodes and the keys."""


def bundle(cpus: float, gpus: float, keys: str) -> dict[str, float]:
    """A bundle of `cpus` CPUs and `gpus` GPUs (zero amounts left out); ConfigError naming `keys` if empty."""
    resources = {name: float(amount) for name, amount in (("CPU", cpus), ("GPU", gpus)) if amount > 0}
    if not resources:
        raise ConfigError(f"{keys}: an actor that asks for no CPU and no GPU cannot be placed; ask for some")
    return resources


def alive_nodes() -> list[dict]:
    """Ray's alive nodes: {"node_id", "ip", "resources"} each."""
    return [
        {"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "resources": n["Resources"]}
        for n in ray.nodes()
        if n["Alive"]
    ]


def describe_resources(resources: dict[str, float]) -> str:
    return ", ".join(f"{name} {amount:g}" for name, amount in sorted(resources.items()) if name in ("CPU", "GPU"))


@dataclass
class Group:
    """One placement group and what it is for (for errors and the layout record)."""

    pg: PlacementGroup
    what: str
    """e.g. "the learner's 2 bundles", "rollout engine 1's bundle"."""
    keys: str
    """The config keys that sized it."""
    bundles: list[dict[str, float]]
    strategy: str
    excluded_nodes: list[str] = field(default_factory=list)

    def state(self) -> dict:
        return placement_group_table(self.pg)

    def nodes(self) -> list[str]:
        """The node id of each bundle (placed groups only)."""
        placed = self.state()["bundles_to_node_id"]
        return [placed[i] for i in range(len(self.bundles))]


def wait_placed(groups: Sequence[Group], timeout_s: float, *, probe: bool = False) -> None:
    """Return once every group is placed (all bundles on nodes); PlacementError after `timeout_s` for the
    groups that are not, with what they asked for and what the cluster has. With `probe`, a group counts as
    placed only when every node of its bundles runs a task: a node that was just lost still holds its bundles
    until Ray declares it dead (seconds of missed heartbeats), and an actor started there dies unstarted."""
    deadline = time.monotonic() + timeout_s
    pending = list(groups)
    while pending:
        pending = [g for g in pending if not _placed(g, probe)]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if pending:
        raise PlacementError(unplaced_message(pending, timeout_s))


def _placed(group: Group, probe: bool) -> bool:
    state = group.state()
    nodes = set(state["bundles_to_node_id"].values())
    placed = state["state"] == "CREATED" and len(state["bundles_to_node_id"]) == len(group.bundles)
    return placed and (not probe or not silent_nodes(nodes))


def silent_nodes(node_ids: Sequence[str], timeout_s: float = 3.0) -> list[str]:
    """The nodes among `node_ids` where a task pinned to them does not run within `timeout_s` (one each, at once)."""
    refs = {on_node(node, _ok, max_retries=0): node for node in node_ids}
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    silent = [refs[ref] for ref in late]
    for ref in late:
        ray.cancel(ref, force=True)
    for ref in ready:
        try:
            ray.get(ref)
        except ray.exceptions.RayError:
            silent.append(refs[ref])
    return silent


def _ok() -> bool:
    return True


def unplaced_message(groups: Sequence[Group], timeout_s: float) -> str:
    """What could not be placed, what the cluster's alive nodes have, and the keys to change."""
    nodes = alive_nodes()
    total: dict[str, float] = {}
    for node in nodes:
        for name in ("CPU", "GPU"):
            total[name] = total.get(name, 0.0) + node["resources"].get(name, 0.0)
    lines = [f"placement: not placed within cluster.placement_timeout_s={timeout_s:g} s:"]
    for g in groups:
        asked: dict[str, float] = {}
        for b in g.bundles:
            for name, amount in b.items():
                asked[name] = asked.get(name, 0.0) + amount
        short = [f"{name} {amount:g} (the cluster has {total.get(name, 0.0):g})" for name, amount in asked.items()
                 if amount > total.get(name, 0.0)]  # fmt: skip
        why = (
            f"missing {', '.join(short)}"
            if short
            else "the cluster has enough in all, but not free on the nodes allowed"
        )
        excluded = f", not on the learner's node(s) {[n[:8] for n in g.excluded_nodes]}" if g.excluded_nodes else ""
        lines.append(
            f"  {g.what}: {len(g.bundles)} × {{{describe_resources(g.bundles[0])}}}, strategy {g.strategy}{excluded} "
            f"— {why}; set by {g.keys}"
        )
    lines.append(f"the cluster's alive nodes ({len(nodes)}):")
    lines += [
        f"  node {n['node_id'][:8]} ({n['ip']}): {describe_resources(n['resources']) or 'nothing'}" for n in nodes
    ]
    lines.append("add nodes (or wait for lost ones to come back), or ask for less with the keys above")
    return "\n".join(lines)


class Layout:
    """The run's placement groups (see the module doc). `learner(rank)` / `engine(rank)` are the `placement`
    hooks of the learner and rollout groups: they wait (bounded) for the bundle to be placed and return the
    `ray.remote` options that put the actor in it."""

    def __init__(self, cfg: TrainConf) -> None:
        c, ln, r = cfg.cluster, cfg.learner, cfg.rollout
        self.name, self.timeout_s = c.layout, c.placement_timeout_s
        learner_bundle = bundle(ln.num_cpus_per_rank, ln.num_gpus_per_rank, LEARNER_KEYS)
        engine_bundle = bundle(r.num_cpus_per_worker, r.num_gpus_per_worker, ENGINE_KEYS)
        self.groups: list[Group] = []
        try:
            self._create_all(cfg, learner_bundle, engine_bundle)
        except BaseException:  # nothing stays reserved by a layout that could not be placed
            self.remove()
            raise

    def _create_all(self, cfg: TrainConf, learner_bundle: dict, engine_bundle: dict) -> None:
        c, ln, r = cfg.cluster, cfg.learner, cfg.rollout
        self.learner_group = self._create(
            f"the learner's {ln.world_size} rank bundle(s)", LEARNER_KEYS, [learner_bundle] * ln.world_size,
            c.learner_strategy,
        )  # fmt: skip
        excluded: list[str] = []
        if c.layout == "separate":  # the engines avoid the learner's nodes: place the learner first
            wait_placed([self.learner_group], self.timeout_s)
            excluded = sorted(set(self.learner_group.nodes()))
        self.engine_groups = [
            self._create(f"rollout engine {rank}'s bundle", ENGINE_KEYS, [engine_bundle], "STRICT_PACK", excluded)
            for rank in range(r.num_workers)
        ]
        small = [{"CPU": SMALL_ACTOR_CPUS}]
        self.scorer_groups = [
            self._create(f"reward scorer {k}'s bundle", SCORER_KEYS, small, "PACK")
            for k in range(cfg.reward.num_workers)
        ]
        self.advantage_group = self._create("the advantage actor's bundle", ADVANTAGE_KEYS, small, "PACK")
        wait_placed(self.groups, self.timeout_s)

    def _create(
        self, what: str, keys: str, bundles: list[dict], strategy: str, excluded: list[str] | None = None
    ) -> Group:
        selector = [{NODE_ID_LABEL: f"!in({','.join(excluded)})"} for _ in bundles] if excluded else None
        pg = placement_group(bundles, strategy=strategy, bundle_label_selector=selector)
        group = Group(pg, what, keys, bundles, strategy, list(excluded or []))
        self.groups.append(group)
        return group

    def learner(self, rank: int) -> dict[str, Any]:
        """The learner group's `placement` hook: rank `rank` in bundle `rank` of the learner's group."""
        return self._in(self.learner_group, rank)

    def engine(self, rank: int) -> dict[str, Any]:
        """The rollout group's `placement` hook: engine `rank` in its own group."""
        return self._in(self.engine_groups[rank])

    def scorer(self, k: int) -> dict[str, Any]:
        """The reward service's `placement` hook: scorer `k` in its own group."""
        return self._in(self.scorer_groups[k])

    def advantage(self) -> dict[str, Any]:
        """The advantage service's `placement` hook."""
        return self._in(self.advantage_group)

    def _in(self, group: Group, index: int = 0) -> dict[str, Any]:
        """Options that put an actor in bundle `index` of `group`, once the group is placed on nodes that answer."""
        wait_placed([group], self.timeout_s, probe=True)
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group.pg, index)}

    def nodes(self, *, engines: bool = True) -> dict[str, list[str]]:
        """{node id: what it holds, e.g. ["learner rank 0", "rollout engine 1"]} of the placed learner group and,
        with `engines`, the engines' groups."""
        held: dict[str, list[str]] = {}
        for rank, node in enumerate(self.learner_group.nodes()):
            held.setdefault(node, []).append(f"learner rank {rank}")
        for rank, group in enumerate(self.engine_groups if engines else []):
            held.setdefault(group.nodes()[0], []).append(f"rollout engine {rank}")
        return held

    def remove(self) -> None:
        """Release the reserved resources (after the actors were killed)."""
        for group in self.groups:
            try:
                remove_placement_group(group.pg)
            except Exception:  # noqa: BLE001 (already removed, or Ray is going down)
                pass
        self.groups = []


def record(layout_name: str, rollout: Any, learner: Any, reward: Any, advantage: Any, timeout_s: float) -> dict:
    """Where every actor of the run is: {"layout", "nodes": {node_id: ip}, "learner": [...], "rollout": [...],
    "reward": [...], "advantage": [...]}, each actor as {"index", "node_id", "ip", "pid", "gpu_ids"}. The reward
    and advantage actors are waited for at most `timeout_s` (their resources are placed already)."""
    scorers, advantage_actor = reward.locations(timeout_s), advantage.location(timeout_s)

    def entries(locations: Sequence[dict]) -> list[dict]:
        keys = ("node_id", "ip", "pid", "gpu_ids")
        return [{"index": i} | {k: where.get(k) for k in keys} for i, where in enumerate(locations)]

    out = {
        "layout": layout_name,
        "learner": entries(learner.locations),
        "rollout": entries(rollout.worker_info),
        "reward": entries(scorers),
        "advantage": entries([advantage_actor]),
    }
    out["nodes"] = {e["node_id"]: e["ip"] for role in ("learner", "rollout", "reward", "advantage") for e in out[role]}
    return out


def describe(layout: dict) -> str:
    """The layout as lines, one per node: which learner ranks, engines and scorers it holds (and GPU ids)."""
    names = {
        "learner": "learner rank",
        "rollout": "rollout engine",
        "reward": "reward scorer",
        "advantage": "advantage",
    }
    per_node: dict[str, list[str]] = {node: [] for node in layout["nodes"]}
    for role, name in names.items():
        for e in layout[role]:
            gpus = f" [GPU {','.join(e['gpu_ids'])}]" if e.get("gpu_ids") else ""
            per_node[e["node_id"]].append(f"{name} {e['index']}{gpus}" if role != "advantage" else f"{name}{gpus}")
    lines = [f"layout (cluster.layout={layout['layout']}) over {len(per_node)} node(s):"]
    for node, actors in per_node.items():
        lines.append(f"  node {node[:12]} ({layout['nodes'][node]}): {', '.join(actors)}")
    return "\n".join(lines)
