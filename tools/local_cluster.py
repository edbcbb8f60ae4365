"""A Ray cluster of several nodes on this one machine: the multi-node tests and `make cluster-demo` run on it.

Each node is one `ray start` in a session of its own (setsid), with its own `--temp-dir` (every node unpacks
its own copy of a job's working directory: with a shared temp dir a job's driver lost its folder) and its own
ports, started one at a time (two at once can time out: ENVIRONMENT.md). Token auth is on, as in `make job`:
the token is `$HOME/.ray/auth_token` (created if missing) and every node and client gets RAY_AUTH_MODE=token.
Killing a node's session takes down its raylet, object store and workers at once, as losing the machine does.
`stop()` ends only the sessions this cluster started (never `ray stop`, which stops every Ray on the machine).

    python -m tools.local_cluster up [--dir D] [--head-cpus 0] [--workers 4,4] [--gpus 0,0]
    python -m tools.local_cluster kill-node N [--dir D]    # N: worker node 1, 2, ...
    python -m tools.local_cluster add-node [--dir D] [--workers 4] [--gpus 0]
    python -m tools.local_cluster down [--dir D]
    python -m tools.local_cluster demo [hydra overrides]   # what `make cluster-demo` runs

`up` leaves the cluster running and prints its address and dashboard (submit to it with `ray job submit
--address http://127.0.0.1:PORT`, the venv's bin on PATH); `down` stops it. `demo` brings up a head and two
worker nodes, submits a short run with the real `ray job submit` (learner and engines on separate nodes),
prints where every actor ran (from the run's run_info.json), and stops the cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from orchestration.cluster.processes import kill_session

ROOT = Path(__file__).resolve().parents[1]
STATE_FILE = "cluster.json"
RAY_CLI = str(Path(sys.executable).parent / "ray")
"""The `ray` command of this environment (a job runs with the head's `python`: the head starts from the venv)."""


@dataclass
class NodeSpec:
    """What one node declares to Ray. cpus: logical CPUs (fractional actors share them); gpus: GPUs declared
    (a CPU node may declare them: actors get GPU ids, torch sees no CUDA device); object_store_mb: its object
    store (small: 3 nodes share this machine's memory)."""

    cpus: float = 4
    gpus: int = 0
    object_store_mb: int = 256


@dataclass
class Node:
    index: int
    """0: the head; 1, 2, ...: worker nodes in the order they were added."""
    spec: NodeSpec
    sid: int
    """The session id of its processes (the pid of the `ray start` that led it)."""
    temp_dir: str
    node_id: str = ""
    """Its Ray node id (hex)."""
    alive: bool = True


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free now on 127.0.0.1."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class LocalCluster:
    """A head and worker nodes on this machine; state in `root`/cluster.json (so `down` finds what `up` made).

    root: a folder for the state file and the nodes' logs. home: the HOME of every node and client (the auth
    token lives in home/.ray/auth_token); default: this process's HOME.
    """

    root: Path
    home: str = field(default_factory=lambda: os.environ.get("HOME", str(Path.home())))
    gcs_port: int = 0
    dashboard_port: int = 0
    nodes: list[Node] = field(default_factory=list)

    # ----------------------------------------------------------------------------------------------------------
    # the environment of nodes and clients

    def env(self) -> dict[str, str]:
        """The environment of the nodes and of `ray` commands against them: this process's, with the venv's bin
        first on PATH (a job runs with the head's `python`), token auth, this cluster's HOME, no RAY_ADDRESS."""
        venv_bin = str(Path(sys.executable).parent)
        path = os.pathsep.join([venv_bin] + [p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin])
        env = dict(os.environ) | {"PATH": path, "HOME": self.home, "RAY_AUTH_MODE": "token"}
        env.pop("RAY_ADDRESS", None)
        return env

    @property
    def address(self) -> str:
        """The dashboard's address, for `ray job submit --address`."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def ray(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """`ray ARGS` with this cluster's environment (output captured)."""
        return subprocess.run(
            [RAY_CLI, *args], env=self.env(), capture_output=True, text=True, timeout=timeout, check=check
        )

    # ----------------------------------------------------------------------------------------------------------
    # nodes

    def start(self, head: NodeSpec, workers: list[NodeSpec], timeout_s: float = 120) -> LocalCluster:
        """Start the head, then each worker node in turn; each `ray start` returns once its node is up."""
        self.root.mkdir(parents=True, exist_ok=True)
        Path(self.home, ".ray").mkdir(parents=True, exist_ok=True)
        self.ray("get-auth-token", "--generate")  # the token every node and client reads (made if missing)
        self.gcs_port, self.dashboard_port, client_port = free_ports(3)
        try:
            self._start_node(
                head,
                "--head",
                f"--port={self.gcs_port}",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={client_port}",
                "--include-dashboard=true",
                timeout_s=timeout_s,
            )
            for spec in workers:
                self.add_node(spec, timeout_s=timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def add_node(self, spec: NodeSpec, timeout_s: float = 120) -> Node:
        """Start one more worker node and wait until it is up."""
        return self._start_node(spec, f"--address=127.0.0.1:{self.gcs_port}", timeout_s=timeout_s)

    def _start_node(self, spec: NodeSpec, *role: str, timeout_s: float) -> Node:
        index = len(self.nodes)
        temp_dir = tempfile.mkdtemp(prefix=f"ray{index}_", dir="/tmp")  # short: Ray's socket paths must be
        agent, agent_grpc, metrics, runtime_env = free_ports(4)  # < 108 chars; ports of its own per node
        log = open(self.root / f"node{index}.log", "w")  # noqa: SIM115 (the node's `ray start` writes to it)
        command = [
            RAY_CLI,
            "start",
            *role,
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={spec.cpus:g}",
            f"--num-gpus={spec.gpus}",
            f"--object-store-memory={spec.object_store_mb * 2**20}",
            f"--temp-dir={temp_dir}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}",
            "--disable-usage-stats",
        ]
        proc = subprocess.Popen(command, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(index, spec, sid=proc.pid, temp_dir=temp_dir)
        self.nodes.append(node)
        self._save()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        if rc != 0:
            raise RuntimeError(
                f"node {index} did not start within {timeout_s:.0f} s (`ray start` rc {rc}); its log: "
                f"{self.root / f'node{index}.log'}:\n{(self.root / f'node{index}.log').read_text()[-3000:]}"
            )
        node.node_id = self._node_id(node, timeout_s)
        self._save()
        return node

    def _node_id(self, node: Node, timeout_s: float) -> str:
        """The Ray node id of `node`, read from its raylet's log (the node id is written at start-up)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for out in Path(node.temp_dir).glob("session_*/logs/raylet.out"):
                found = re.search(r"Setting node ID node_id=([0-9a-f]+)", out.read_text(errors="replace"))
                if found:
                    return found.group(1)
            time.sleep(0.5)
        raise RuntimeError(f"node {node.index}: no node id in {node.temp_dir}/session_*/logs/raylet.out")

    def kill_node(self, index: int) -> None:
        """Lose worker node `index` as a machine is lost: SIGKILL every process of its session at once."""
        node = self.nodes[index]
        if index == 0:
            raise ValueError("kill_node: node 0 is the head (the cluster ends with it); kill a worker node")
        kill_session(node.sid)
        node.alive = False
        self._save()

    def stop(self) -> None:
        """End every node this cluster started (worker nodes first, the head last) and remove their temp dirs."""
        for node in reversed(self.nodes):
            kill_session(node.sid, grace_s=3.0 if node.alive else 0.0)
            node.alive = False
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        self._save()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------------------------------
    # state

    def _save(self) -> None:
        state = asdict(self) | {"root": str(self.root)}
        (self.root / STATE_FILE).write_text(json.dumps(state, indent=1))

    @classmethod
    def load(cls, root: Path) -> LocalCluster:
        state = json.loads((root / STATE_FILE).read_text())
        nodes = [Node(**(n | {"spec": NodeSpec(**n["spec"])})) for n in state.pop("nodes")]
        return cls(**(state | {"root": Path(state["root"]), "nodes": nodes}))

    def describe(self) -> str:
        lines = [f"Ray cluster on this machine: {self.address} (GCS 127.0.0.1:{self.gcs_port}); state in {self.root}"]
        for n in self.nodes:
            role = "head" if n.index == 0 else f"worker node {n.index}"
            lines.append(
                f"  {role}: node id {n.node_id[:12]}…, {n.spec.cpus:g} CPUs, {n.spec.gpus} GPUs, "
                f"{'up' if n.alive else 'down'}, log {self.root / f'node{n.index}.log'}"
            )
        return "\n".join(lines)


DEMO_ARGS = (
    "cluster.layout=separate rollout.num_workers=2 learner.world_size=2 reward.num_workers=2 trainer.total_steps=3 "
    "trainer.save_every=1 model.warm_start_steps=0 algorithm.filter_groups=false"
)
"""The demo's run: learner ranks and engines on separate nodes, 3 steps of the embedded default from the untrained
tiny model (no warm-start; every group kept, since dynamic sampling would find no group with a correct answer)."""


def demo(root: Path, overrides: list[str]) -> int:
    """`make cluster-demo`: a head (the driver only) and two worker nodes of 4 logical CPUs here, a short run
    submitted with the real `ray job submit`, where every actor ran, the cluster stopped. Returns the job's rc."""
    out = (root / "run").resolve()
    if out.exists():  # the demo's own folder: a fresh run each time (an old one would only be resumed)
        shutil.rmtree(out)
    args = DEMO_ARGS.split() + [
        "cluster.address=auto",
        f"trainer.output_dir={out}",
        f"model.tiny_dir={ROOT / 'outputs/models/tiny'}",  # absolute: every node unpacks its own working dir
        f"model.warm_start_dir={ROOT / 'outputs/models/warm_start'}",
        *overrides,
    ]
    cluster = LocalCluster(root.resolve())
    with cluster.start(NodeSpec(cpus=0), [NodeSpec(cpus=4), NodeSpec(cpus=4)]):
        print(cluster.describe(), flush=True)
        command = ["job", "submit", "--address", cluster.address, "--working-dir", str(ROOT), "--"]
        command += ["python", "-m", "orchestration.train", *args]
        print("$ ray " + " ".join(command), flush=True)
        rc = subprocess.run([RAY_CLI, *command], env=cluster.env(), cwd=ROOT).returncode
    info = out / "run_info.json"
    if info.is_file():
        from orchestration.cluster.layout import describe  # heavy: Ray (the other commands only run its CLI)

        names = {n.node_id: "head" if n.index == 0 else f"worker node {n.index}" for n in cluster.nodes}
        text = describe(json.loads(info.read_text())["layout"])
        for node_id, name in names.items():
            text = text.replace(f"node {node_id[:12]}", f"{name} {node_id[:12]}")
        print(f"where every actor ran (from {info}):\n{text}")
    print(f"job {'SUCCEEDED' if rc == 0 else 'FAILED'}; cluster stopped (only its own processes); run in {out}")
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.local_cluster", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "kill-node", "add-node", "demo"])
    parser.add_argument("node", nargs="?", type=int, help="kill-node: the worker node (1, 2, ...)")
    parser.add_argument("--dir", type=Path, default=ROOT / "outputs" / "cluster", help="state and logs")
    parser.add_argument("--head-cpus", type=float, default=0, help="logical CPUs of the head (0: the driver only)")
    parser.add_argument("--workers", default="4,4", help="logical CPUs of each worker node, comma-separated")
    parser.add_argument("--gpus", default=None, help="GPUs each worker node declares, comma-separated")
    args, overrides = parser.parse_known_args(argv)
    if args.command == "demo":
        return demo(args.dir, overrides)
    if overrides:
        parser.error(f"unknown arguments {overrides}")
    cpus = [float(c) for c in args.workers.split(",") if c]
    gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else [0] * len(cpus)
    if len(gpus) != len(cpus):
        parser.error(f"--gpus has {len(gpus)} entries for {len(cpus)} worker nodes")
    workers = [NodeSpec(cpus=c, gpus=g) for c, g in zip(cpus, gpus)]
    if args.command == "up":
        cluster = LocalCluster(args.dir.resolve()).start(NodeSpec(cpus=args.head_cpus), workers)
        print(cluster.describe())
        submit = f"ray job submit --address {cluster.address} --working-dir . -- python -m orchestration.train"
        print(
            f"submit with: PATH={Path(sys.executable).parent}:$PATH RAY_AUTH_MODE=token {submit} cluster.address=auto"
        )
        return 0
    cluster = LocalCluster.load(args.dir.resolve())
    if args.command == "kill-node":
        if not args.node:
            parser.error("kill-node needs a worker node: 1, 2, ...")
        cluster.kill_node(args.node)
    elif args.command == "add-node":
        for spec in workers:
            cluster.add_node(spec)
    else:
        cluster.stop()
    print(cluster.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
