"""The whole system end to end on the CPU: real Ray, vLLM CPU build, 2-rank gloo FSDP2 learner, reward pool.

* a short run writes metrics, checkpoints (loadable HF export) and an offline wandb run;
* a run killed mid-training and resumed with trainer.resume=auto produces the same metrics as an
  uninterrupted run (timings excepted).
The random tiny model never answers correctly, so these runs keep every group (algorithm.filter_groups=false);
dynamic sampling itself is covered by tests/test_orchestration_stages.py and the demo.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A small, fast schedule: 2 mini-batches per step (FIPO active on the second), short responses.
SMALL = [
    "algorithm.group_size=4",
    "algorithm.train_batch_prompts=4",
    "algorithm.gen_batch_prompts=4",
    "algorithm.mini_batch_prompts=2",
    "algorithm.filter_groups=false",
    "algorithm.overlong_buffer_tokens=8",
    "rollout.max_response_tokens=24",
    "data.synthetic_train_prompts=64",
    "data.synthetic_val_prompts=4",
    "trainer.eval_samples=2",
    "trainer.eval_every=2",
    "learner.lr=1e-3",
    "learner.warmup_steps=0",
    # the smallest model, untrained: independent of the demo's defaults (size, warm-start)
    "model.tiny_hidden_size=64",
    "model.tiny_layers=2",
    "model.tiny_heads=2",
    "model.tiny_kv_heads=1",
    "model.tiny_intermediate_size=128",
    "model.warm_start_steps=0",
]
# Keys that measure time, not what the run computed.
TIMING_PREFIXES = (
    "timing_s/",
    "perf/",
    "learner/perf/",
    "weight_sync/seconds",
    "weight_sync/gb_per_s",
    "weight_sync/gather_s",
)


def run_train(output_dir, tiny_dir, *overrides, background=False):
    cmd = [
        sys.executable,
        "-m",
        "orchestration.train",
        *SMALL,
        f"trainer.output_dir={output_dir}",
        f"model.tiny_dir={tiny_dir}",
        *overrides,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = open(Path(output_dir).parent / f"{Path(output_dir).name}.log", "ab")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if background:
        return proc
    rc = proc.wait(timeout=600)
    assert rc == 0, Path(log.name).read_text()[-4000:]
    return proc


def metrics(output_dir):
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(TIMING_PREFIXES)} for row in rows]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny") / "model"


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_interrupted_run_resumes_to_identical_metrics(tmp_path, tiny_dir):
    steps = ["trainer.total_steps=3", "trainer.save_every=1"]
    full = tmp_path / "full"
    run_train(full, tiny_dir, *steps)
    reference = metrics(full)
    assert [row["step"] for row in reference] == [0, 1, 2]
    # the learner really trained: FIPO's weights moved away from 1 on the second mini-batch of a step
    assert any(row["learner/last_mini_batch/influence_weights_max"] > 1.0 for row in reference)
    assert "eval/avg_at_k" in reference[1] and "eval/initial_avg_at_k" in reference[0]
    hf = full / "checkpoints" / "step_3" / "hf"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(hf).num_parameters() > 0
    assert list((full / "wandb").glob("offline-run-*")), "an offline wandb run is written"

    interrupted = tmp_path / "interrupted"
    proc = run_train(interrupted, tiny_dir, *steps, background=True)
    first = interrupted / "checkpoints" / "step_1" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not first.exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: driver, Ray and its workers
    proc.wait()
    done = sorted(p.name for p in (interrupted / "checkpoints").iterdir() if (p / "trainer_state.json").exists())
    assert "step_3" not in done, f"the run finished before it was killed ({done}); nothing was resumed"
    run_train(interrupted, tiny_dir, *steps, "trainer.resume=auto")
    resumed = metrics(interrupted)
    assert [row["step"] for row in resumed] == [0, 1, 2]
    assert resumed == reference
    assert {"loss", "reward_mean", "accuracy", "response_length_mean"} <= set(resumed[0])
    run_ids = {p.name.rsplit("-", 1)[-1] for p in (interrupted / "wandb").glob("offline-run-*")}
    assert len(run_ids) == 1, f"the resumed run must continue the same wandb run, got {run_ids}"
