"""The cluster path, as docs/cluster.md gives it: its `ray job submit` block is exactly tools/job.sh's
commands (what `make job` runs), and that block, run verbatim with bash on a fresh home folder (no
~/.ray/auth_token, no Ray or project variables exported, the venv not on PATH), starts a head with token auth,
submits a 2-step training run through the real `ray job submit --working-dir .`, reports SUCCEEDED with the
run's folder, and stops its head (and only it)."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = "# --- docs/cluster.md's commands ---\n"


def readme_block() -> str:
    """The bash block that follows the job.sh marker comment in docs/cluster.md."""
    text = (ROOT / "docs" / "cluster.md").read_text()
    match = re.search(r"<!-- job\.sh:[^\n]*-->\n```bash\n(.*?)```", text, re.S)
    assert match, "docs/cluster.md lost its job.sh block"
    return match.group(1)


def test_readme_block_is_what_make_job_runs():
    script = (ROOT / "tools" / "job.sh").read_text()
    assert MARKER in script
    assert readme_block() == script.split(MARKER, 1)[1]
    assert "bash tools/job.sh" in (ROOT / "Makefile").read_text()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_readme_cluster_commands_run_a_job_on_a_fresh_machine(tmp_path):
    assert not port_open(8275), "port 8275 is taken: another Ray head from make job is running"
    home = tmp_path / "home"
    home.mkdir()
    out = tmp_path / "job_run"
    system_path = os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if Path(sys.executable).parent != Path(p)
    )
    env = {  # a fresh shell: no Ray / vLLM / hub / wandb variables, no token, the venv not on PATH
        "PATH": system_path,
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "JOB_OUT": str(out),
        "JOB_ARGS": (
            "trainer.total_steps=2 model.warm_start_steps=0 algorithm.filter_groups=false "
            "algorithm.group_size=4 algorithm.train_batch_prompts=4 algorithm.gen_batch_prompts=4 "
            "algorithm.mini_batch_prompts=2 algorithm.overlong_buffer_tokens=8 rollout.max_response_tokens=16 "
            "data.synthetic_train_prompts=32 data.synthetic_val_prompts=2 trainer.eval_samples=2 "
            f"model.tiny_hidden_size=64 model.tiny_layers=2 model.tiny_heads=2 model.tiny_kv_heads=1 "
            f"model.tiny_intermediate_size=128 model.tiny_dir={tmp_path / 'tiny'}"
        ),
    }
    result = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + readme_block()],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert f"job SUCCEEDED: metrics, checkpoints and wandb run in {out}" in output
    assert re.search(r"Job 'raysubmit_\w+' succeeded", output)
    size = re.search(r"Uploading package gcs://\S+ \(([\d.]+)(KiB|MiB|B)\)", output)
    if size:  # the working dir must upload small: .venv, outputs and checkpoints are excluded (.gitignore)
        assert size.group(2) != "MiB" or float(size.group(1)) < 5, size.group(0)
    assert (home / ".ray" / "auth_token").is_file(), "the commands create the token a fresh machine lacks"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1]
    assert (out / "checkpoints" / "step_2" / "hf" / "config.json").exists()
    assert not port_open(8275), "the head's dashboard is still up: the commands must stop the head they started"
