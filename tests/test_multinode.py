"""Several machines, on this one: a real Ray cluster of a head and worker nodes (tools/local_cluster.py:
one `ray start` session per node, each with its own temp dir and ports), runs submitted with the real
`ray job submit`, nodes lost by SIGKILLing every process of their session.

* the layout the config asks for (cluster.layout=separate: learner ranks packed on one node, engines on others)
  is where the actors ran, as run_info.json records it;
* worker nodes lost mid-generation, mid-update and during a weight push: the run ends with the metrics and
  final weights of the undisturbed run;
* a loss the nodes left cannot absorb ends, within cluster.placement_timeout_s, with an error naming what
  could not be placed;
* `cluster=gpu`'s layout on CPU nodes that declare GPUs: every learner rank and engine holds the GPU ids it
  asked for (torch sees no CUDA device: the run trains on the CPU);
* more learner GPUs than the cluster declares: the error comes within the bound and names the keys;
* a node that does not see the driver's trainer.output_dir is refused at start-up, named;
* `ray job stop` mid-run and the same command submitted again: the metrics of an uninterrupted run.

The head declares no CPU (it runs the drivers only, as a GPU cluster's head often does), so a node fault never
takes the driver's node. The random tiny model never answers correctly: the runs keep every group.
"""

import json
import re
import time
from pathlib import Path

import pytest
from test_console import CONSOLE_NOISE, RAY_PREFIX_ONLY
from test_train_e2e import SMALL, metrics

from orchestration.checkpoint import STATE_FILE
from tools.local_cluster import LocalCluster, NodeSpec

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.vllm]
RUN = [*SMALL, "trainer.total_steps=4", "trainer.save_every=1", "rollout.num_workers=2", "learner.world_size=2"]
CPU_NODE = NodeSpec(cpus=6)  # one node holds a whole run (2 ranks + 2 engines + 2 scorers + advantage = 4.75)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")  # a fresh HOME: the token is made there, none is assumed
    with LocalCluster(tmp_path_factory.mktemp("cluster"), home=str(home)) as cluster:
        cluster.start(NodeSpec(cpus=0), [CPU_NODE] * 4)
        yield cluster


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny") / "model"


def ensure_workers(cluster, count, spec=CPU_NODE):
    """Add worker nodes of `spec` until `count` of them are up."""
    while sum(1 for n in cluster.nodes if n.index and n.alive and n.spec == spec) < count:
        cluster.add_node(spec)


def submit(cluster, out, tiny_dir, *overrides, wait=True, submission_id=None, log=None):
    """`ray job submit` of a training run into `out` (absolute paths: every node has its own working dir)."""
    args = [*RUN, "cluster.address=auto", f"trainer.output_dir={out}", f"model.tiny_dir={tiny_dir}", *overrides]
    command = ["job", "submit", "--address", cluster.address, "--working-dir", str(ROOT)]
    command += ["--no-wait"] if not wait else []
    command += ["--submission-id", submission_id] if submission_id else []
    command += ["--", "python", "-m", "orchestration.train", *args]  # the CLI quotes each argument itself
    started = time.monotonic()
    result = cluster.ray(*command, timeout=900, check=False)
    result.seconds = time.monotonic() - started
    Path(log or f"{out}.log").write_text(result.stdout + result.stderr)
    return result


def final_weights(out):
    from safetensors.torch import load_file

    return load_file(Path(out) / "checkpoints" / "step_4" / "hf" / "model.safetensors")


def layout(out):
    return json.loads((Path(out) / "run_info.json").read_text())["layout"]


@pytest.fixture(scope="module")
def reference(cluster, tiny_dir, tmp_path_factory):
    """The undisturbed run, learner and engines on separate nodes."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = submit(cluster, out, tiny_dir, "cluster.layout=separate")
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return out


def test_the_layout_asked_for_is_where_the_actors_ran(cluster, reference):
    info = layout(reference)
    assert info["layout"] == "separate"
    head, workers = cluster.nodes[0].node_id, {n.node_id for n in cluster.nodes[1:]}
    learner = {e["node_id"] for e in info["learner"]}
    engines = {e["node_id"] for e in info["rollout"]}
    assert len(learner) == 1, "PACK: both ranks fit on one node, so they share it"
    assert learner <= workers and engines <= workers and not learner & engines
    assert [e["index"] for e in info["rollout"]] == [0, 1] and len(info["reward"]) == 2
    every = [e for role in ("learner", "rollout", "reward", "advantage") for e in info[role]]
    assert head not in {e["node_id"] for e in every}, "the head declares no CPU: nothing of the run is there"
    assert all(e["gpu_ids"] == [] and e["pid"] > 0 for e in every)
    log = Path(f"{reference}.log").read_text()
    assert "layout (cluster.layout=separate) over" in log and f"node {next(iter(learner))[:12]}" in log
    assert [noise for noise in CONSOLE_NOISE if noise in log] == [], "the console a reader sees (tests/test_console.py)"
    assert RAY_PREFIX_ONLY.findall(log) == [], "empty lines of a Ray worker (a progress bar's)"


def test_lost_nodes_mid_generation_update_and_weight_push_change_nothing(cluster, reference, tiny_dir, tmp_path):
    """Three worker nodes lost in one run (each with every process on it): the node of engine 0 while it
    generates at step 0, the node of learner rank 0 mid-update at step 1 and during the weight push at step 2
    (whose buckets sat in that node's object store). The actors are re-placed on the nodes left, the learner
    restored from its last checkpoint; the metrics and final weights are the undisturbed run's."""
    import torch

    ensure_workers(cluster, 4)
    out = tmp_path / "run"
    kills = "trainer.fault_inject=[rollout:0@0:generate:node,learner:0@1:update:node,learner:0@2:weight_buckets:node]"
    result = submit(cluster, out, tiny_dir, "cluster.layout=packed", kills)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert metrics(out) == metrics(reference)
    expected, got = final_weights(reference), final_weights(out)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    lost = re.findall(r"fault: injected: node \w+ of (\w+) \d+ lost at step (\d) in (\w+)", log)
    assert lost == [("rollout", "0", "generate"), ("learner", "1", "update"), ("learner", "2", "weight_buckets")]
    assert re.search(r"learner restored from \S+step_1; replaying from step 1", log)
    recoveries = [float(s) for s in re.findall(r"continuing ([\d.]+) s after the loss", log)]
    print("recovery seconds (node lost → work continuing):", recoveries)
    assert recoveries and max(recoveries) < 120


def test_a_loss_the_nodes_left_cannot_absorb_ends_with_the_bounded_error(cluster, tiny_dir, tmp_path):
    """One worker node holds the whole run; it is lost and no node can take its actors: the run waits
    cluster.placement_timeout_s for capacity, then ends naming what could not be placed."""
    for node in cluster.nodes[1:]:
        if node.alive:
            cluster.kill_node(node.index)
    cluster.add_node(CPU_NODE)
    out = tmp_path / "run"
    result = submit(
        cluster, out, tiny_dir, "cluster.placement_timeout_s=20", "trainer.fault_inject=[rollout:0@1:generate:node]"
    )
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "placement: not placed within cluster.placement_timeout_s=20 s" in log, log[-5000:]
    lost = (
        r"(the learner's 2 rank bundle\(s\)|rollout engine \d's bundle|reward scorer \d's bundle|the advantage actor's "
    )
    lost += r"bundle): \d × \{CPU [\d.]+\}, strategy \w+ — missing CPU [\d.]+ \(the cluster has 0\); set by \w"
    assert re.search(lost, log), "whichever replacement waits first names its bundle, its keys and what is missing"
    assert result.seconds < 300, "start-up, step 0, then at most a few waits of 20 s"
    assert len(metrics(out)) == 1, "step 0 finished before the loss and stays recorded"


def gpu_args(*extra):
    """`cluster=gpu` on CPU nodes that declare GPUs: the CPU's engine settings and dtypes, no memory plan."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cpu = ["rollout.num_gpus_per_worker=1", "rollout.dtype=float32", "learner.param_dtype=float32"]
    return [
        "cluster=gpu",
        "cluster.check_fit=false",
        *(f"+cluster.env.{k}='{v}'" for k, v in env.items()),
        *cpu,
        *extra,
    ]


def test_the_gpu_layout_on_nodes_that_declare_gpus(cluster, tiny_dir, tmp_path):
    gpu_node = NodeSpec(cpus=4, gpus=2)
    ensure_workers(cluster, 2, gpu_node)
    out = tmp_path / "run"
    result = submit(cluster, out, tiny_dir, *gpu_args("cluster.layout=separate", "trainer.total_steps=2"))
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    info = layout(out)
    gpu_nodes = {n.node_id for n in cluster.nodes if n.alive and n.spec == gpu_node}
    learner, engines = info["learner"], info["rollout"]
    assert len({e["node_id"] for e in learner}) == 1 and {e["node_id"] for e in learner} <= gpu_nodes
    assert {e["node_id"] for e in engines} <= gpu_nodes - {learner[0]["node_id"]}
    for group in (learner, engines):
        ids = [(e["node_id"], gpu) for e in group for gpu in e["gpu_ids"]]
        assert all(len(e["gpu_ids"]) == 1 for e in group) and len(set(ids)) == len(ids), group
    assert [row["step"] for row in metrics(out)] == [0, 1]


def test_more_learner_gpus_than_the_cluster_has_fails_within_the_bound(cluster, tiny_dir, tmp_path):
    out = tmp_path / "run"
    result = submit(cluster, out, tiny_dir, *gpu_args("learner.world_size=8", "cluster.placement_timeout_s=10"))
    log = result.stdout + result.stderr
    assert result.returncode != 0 and result.seconds < 150, result.seconds
    assert "placement: not placed within cluster.placement_timeout_s=10 s" in log, log[-5000:]
    gpus = sum(n.spec.gpus for n in cluster.nodes if n.alive)
    missing = f"missing GPU 8 (the cluster has {gpus})"
    assert f"the learner's 8 rank bundle(s): 8 × {{CPU 1, GPU 1}}, strategy PACK — {missing}" in log
    assert "set by learner.world_size / learner.num_cpus_per_rank / learner.num_gpus_per_rank" in log


def test_a_node_that_cannot_see_the_output_dir_is_refused_by_name(cluster, tiny_dir, tmp_path):
    """A relative trainer.output_dir: every node resolves it in its own copy of the job's working directory (its
    own `--temp-dir`, as on another machine), so the learner's node writes elsewhere than the driver reads."""
    ensure_workers(cluster, 1)
    result = submit(cluster, "outputs/not_shared", tiny_dir, log=tmp_path / "run.log")
    log = result.stdout + result.stderr
    assert result.returncode != 0
    found = re.search(r"trainer\.output_dir: outputs/not_shared \(\S+ on the driver\) is not the same folder on every "
                      r"node that writes it: node (\w+) \(([\d.]+), holds learner rank 0", log)  # fmt: skip
    assert found, log[-5000:]
    assert any(n.node_id.startswith(found.group(1)) for n in cluster.nodes[1:] if n.alive)
    assert "A relative path is relative to each node's own copy" in log


def test_a_stopped_job_submitted_again_resumes_to_the_same_metrics(cluster, reference, tiny_dir, tmp_path):
    """`ray job stop` at a known step (the driver holds before step 2 until a file appears, which it never does:
    the stop cannot race the run's end on any machine), then the same command again: it resumes from the
    newest checkpoint and ends with the uninterrupted run's metrics."""
    ensure_workers(cluster, 2)
    out, gate = tmp_path / "run", tmp_path / "never"
    hold = ["trainer.hold_at_step=2", f"trainer.hold_file={gate}"]
    result = submit(cluster, out, tiny_dir, "cluster.layout=separate", *hold, wait=False, submission_id="fipo-stop")
    assert result.returncode == 0, result.stderr[-3000:]
    reached = Path(f"{gate}.reached")
    while not reached.exists():  # bounded by the job: it ends (failed) or reaches the hold
        status = cluster.ray("job", "status", "--address", cluster.address, "fipo-stop").stdout.lower()
        assert "running" in status or "pending" in status, cluster.ray("job", "logs", "--address", cluster.address,
                                                                       "fipo-stop").stdout  # fmt: skip
        time.sleep(0.5)
    assert len(metrics(out)) == 2 and (out / "checkpoints" / "step_2" / STATE_FILE).exists()
    started = time.monotonic()
    stop = cluster.ray("job", "stop", "--address", cluster.address, "fipo-stop", check=False)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    print(f"`ray job stop` returned after {time.monotonic() - started:.1f} s")
    status = cluster.ray("job", "status", "--address", cluster.address, "fipo-stop")
    assert "stopped" in (status.stdout + status.stderr).lower(), status.stdout + status.stderr
    assert len(metrics(out)) == 2, "nothing ran after the stop"
    again = submit(cluster, out, tiny_dir, "cluster.layout=separate")
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-5000:]
    assert re.search(r"resumed from \S+step_2 \(step 2, policy version 2\)", log), log[-5000:]
    assert metrics(out) == metrics(reference)
