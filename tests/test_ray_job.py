"""`ray job submit` end to end: a real head node (`ray start --head`, Ray 2.60's token auth ON, as a fresh
cluster has it), a job that runs `python -m orchestration.train` with a 2-step configuration uploaded with
`--working-dir .`, SUCCEEDED, and its metrics written. The head gets free ports for every listener so that it
coexists with other local clusters, and is stopped by killing its own process group (never `ray stop`, which
would stop every Ray on the machine)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(count):
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def head(tmp_path):
    gcs, dashboard, agent_http, agent_grpc, env_agent, metrics, client, node_mgr, obj_mgr = free_ports(9)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # the job's `python` is this environment's
    cmd = [
        RAY, "start", "--head", "--block", "--num-cpus=8", "--include-dashboard=true", "--disable-usage-stats",
        f"--port={gcs}", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
        f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
    ]  # fmt: skip
    log = open(tmp_path / "head.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(3)


def submit(address, env, *args, timeout=60):
    return subprocess.run(
        [RAY, "job", *args], cwd=ROOT, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_ray_job_submit_runs_two_training_steps(head, tmp_path):
    address, env = head
    deadline = time.monotonic() + 120
    while submit(address, env, "list", "--address", address).returncode != 0:  # wait for the dashboard
        assert time.monotonic() < deadline, "the head's dashboard did not come up in 120 s"
        time.sleep(2)
    # Without the token a fresh 2.60 cluster refuses the client: the README's instructions must handle this.
    refused = subprocess.run(
        [RAY, "job", "list", "--address", address], cwd=ROOT, env={**env, "RAY_AUTH_MODE": "disabled"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode != 0 and "authentication" in (refused.stdout + refused.stderr).lower()

    out = tmp_path / "job_run"
    entrypoint = (
        "python -m orchestration.train cluster.address=auto cluster.num_cpus=null "
        "algorithm.group_size=4 algorithm.train_batch_prompts=4 algorithm.gen_batch_prompts=4 "
        "algorithm.mini_batch_prompts=2 algorithm.filter_groups=false algorithm.overlong_buffer_tokens=8 "
        "rollout.max_response_tokens=16 data.synthetic_train_prompts=32 data.synthetic_val_prompts=2 "
        "trainer.eval_samples=2 trainer.total_steps=2 model.warm_start_steps=0 model.tiny_hidden_size=64 "
        "model.tiny_layers=2 model.tiny_heads=2 model.tiny_kv_heads=1 model.tiny_intermediate_size=128 "
        f"trainer.output_dir={out} model.tiny_dir={tmp_path / 'tiny'}"
    )
    deadline = time.monotonic() + 120
    while True:  # the dashboard agent takes a few seconds after `ray start`
        result = submit(address, env, "submit", "--address", address, "--working-dir", ".", "--no-wait", "--",
                        *entrypoint.split())  # fmt: skip
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = re.search(r"raysubmit_\w+", result.stdout + result.stderr).group(0)
    size = re.search(r"Uploading package gcs://\S+ \(([\d.]+)(KiB|MiB|B)\)", result.stdout + result.stderr)
    if size:  # the working dir must upload small: .venv, outputs and checkpoints are excluded (.gitignore)
        assert size.group(2) != "MiB" or float(size.group(1)) < 5, size.group(0)

    status = ""
    deadline = time.monotonic() + 480
    while time.monotonic() < deadline:
        status = submit(address, env, "status", "--address", address, job_id)
        status = (status.stdout + status.stderr).lower()
        if any(word in status for word in ("succeeded", "failed", "stopped")):
            break
        time.sleep(3)
    logs = submit(address, env, "logs", "--address", address, job_id).stdout
    assert "succeeded" in status, status + logs[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1]
    assert (out / "checkpoints" / "step_2" / "hf" / "config.json").exists()
