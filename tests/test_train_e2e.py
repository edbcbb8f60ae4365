"""The whole system end to end on the CPU: real Ray, vLLM CPU build, 2-rank gloo FSDP2 learner, reward pool.

* a short run writes metrics, checkpoints (loadable HF export) and an offline wandb run;
* a run killed mid-training and resumed with trainer.resume=auto produces the same metrics as an
  uninterrupted run (timings excepted);
* a run whose reward actor, learner rank and rollout engine are SIGKILLed mid-step (trainer.fault_inject)
  completes every step with the same metrics and final weights as the undisturbed run, and reports the
  restarts; a worker killed on every attempt ends the run with the bounded error.
The random tiny model never answers correctly, so these runs keep every group (algorithm.filter_groups=false);
dynamic sampling itself is covered by tests/test_orchestration_stages.py and the demo.
"""

import json
import os
import re
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
    # the synchronous schedule these tests were written for (the pipeline's own test sets max_staleness=1)
    "trainer.max_staleness=0",
    "algorithm.adaptive_gen_rounds=false",
]
# Keys that measure time, not what the run computed (and fault/*: what a run survived).
TIMING_PREFIXES = (
    "timing_s/",
    "perf/",
    "learner/perf/",
    "weight_sync/seconds",
    "weight_sync/gb_per_s",
    "weight_sync/gather_s",
    "fault/",
)
STEPS = ["trainer.total_steps=3", "trainer.save_every=1"]


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


def hold_before_step_1(tmp_path):
    """The overrides that hold the run before step 1 (after step 0 and its checkpoint) until tmp_path/never exists,
    which it never does: a kill sent at the hold lands at a known step, on a machine of any speed (polling for the
    first checkpoint and killing then raced the run's next steps)."""
    return ["trainer.hold_at_step=1", f"trainer.hold_file={tmp_path / 'never'}"]


def wait_until_held(proc, tmp_path, limit_s: float = 600.0) -> None:
    """Wait until the run writes <hold_file>.reached (`limit_s`: the same hang bound as a whole run's)."""
    reached = tmp_path / "never.reached"
    deadline = time.monotonic() + limit_s
    while not reached.exists():
        assert proc.poll() is None, "the run ended before the hold"
        assert time.monotonic() < deadline, f"the run did not reach the hold within {limit_s:g} s"
        time.sleep(0.1)


def metrics(output_dir):
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(TIMING_PREFIXES)} for row in rows]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny") / "model"


@pytest.fixture(scope="module")
def full(tmp_path_factory, tiny_dir):
    """The undisturbed 3-step run both tests compare with."""
    full = tmp_path_factory.mktemp("reference") / "full"
    run_train(full, tiny_dir, *STEPS)
    return full


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_interrupted_run_resumes_to_identical_metrics(tmp_path, tiny_dir, full):
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
    proc = run_train(interrupted, tiny_dir, *STEPS, *hold_before_step_1(tmp_path), background=True)
    wait_until_held(proc, tmp_path)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: driver, Ray and its workers
    proc.wait()
    done = sorted(p.name for p in (interrupted / "checkpoints").iterdir() if (p / "trainer_state.json").exists())
    assert "step_3" not in done, f"the run finished before it was killed ({done}); nothing was resumed"
    run_train(interrupted, tiny_dir, *STEPS, "trainer.resume=auto")
    resumed = metrics(interrupted)
    assert [row["step"] for row in resumed] == [0, 1, 2]
    assert resumed == reference
    assert {"loss", "reward_mean", "accuracy", "response_length_mean"} <= set(resumed[0])
    run_ids = {p.name.rsplit("-", 1)[-1] for p in (interrupted / "wandb").glob("offline-run-*")}
    assert len(run_ids) == 1, f"the resumed run must continue the same wandb run, got {run_ids}"


def final_weights(output_dir):
    from safetensors.torch import load_file

    return load_file(Path(output_dir) / "checkpoints" / "step_3" / "hf" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_killed_workers_are_replaced_and_the_run_ends_as_if_nothing_happened(tmp_path, tiny_dir, full):
    """SIGKILLs (by pid) of a reward actor mid-scoring at step 0, a learner rank mid-update at step 1 (no checkpoint
    yet: a new learner group from the start, step 0 replayed), the rollout engine as step 1's first weight push
    begins (the new learner's), and the rollout engine mid-generation and the advantage actor at step 2: every step
    completes, fault/* counts the restarts, and the metrics and final weights equal the undisturbed run's; wandb got
    every step once. This run pushes its weights by rollout.weight_transfer=gloo (learner rank 0 broadcasting
    through vLLM's API), the undisturbed one through the object store: the transports give the same training, and
    gloo's handshake is redone for the new learner and for each new engine (the object store's push under faults:
    tests/test_multinode.py, tests/test_rollout_ray.py)."""
    import torch
    from wandb_records import logged_steps

    faulted = tmp_path / "faulted"
    kills = (
        "trainer.fault_inject=[reward:1@0:score,learner:1@1:update,rollout:0@1:update_weights,rollout:0@2:generate,"
        "advantage:0@2:compute]"
    )
    run_train(faulted, tiny_dir, "trainer.total_steps=3", "trainer.save_every=2", "rollout.weight_transfer=gloo", kills)
    rows = metrics(faulted)
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert [{k: v for k, v in row.items() if k != "weight_sync/handshakes"} for row in rows] == metrics(full)
    assert rows[-1]["weight_sync/handshakes"] >= 4  # the first, the new learner's, two new engines'
    expected, got = final_weights(full), final_weights(faulted)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)

    last = json.loads((faulted / "metrics.jsonl").read_text().splitlines()[-1])
    kinds = ("rollout", "learner", "reward", "advantage")
    assert {kind: last[f"fault/{kind}_restarts"] for kind in kinds} == {
        "rollout": 2,
        "learner": 1,
        "reward": 1,
        "advantage": 1,
    }
    assert last["fault/replayed_steps"] == 1 and last["fault/recovery_seconds"] > 0
    log = (tmp_path / "faulted.log").read_text()
    recoveries = re.findall(r"fault: (\w+) \d+ lost at step (\d+) in (\w+) .*continuing ([\d.]+) s after", log)
    print("recovery seconds (kill → work continuing):", recoveries)
    assert [(kind, step, phase) for kind, step, phase, _ in recoveries] == [
        ("reward", "0", "score"),
        ("rollout", "1", "update_weights"),  # step 1's first push is the rebuilt learner's: inside its recovery
        ("learner", "1", "update"),
        ("rollout", "2", "generate"),
        ("advantage", "2", "compute"),
    ]
    assert "fault: learner restored from the start of the run; replaying from step 0" in log

    (run_file,) = faulted.glob("wandb/offline-run-*/run-*.wandb")
    assert logged_steps(run_file) == [0, 1, 2], "a replayed step must not be sent to wandb twice"


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_a_worker_killed_on_every_attempt_ends_the_run_with_a_bounded_error(tmp_path, tiny_dir):
    out = tmp_path / "doomed"
    proc = run_train(
        out,
        tiny_dir,
        "trainer.total_steps=1",
        "trainer.eval_before_train=false",
        "trainer.max_restarts=1",
        "trainer.fault_inject=[rollout:0@0:generate:always]",
        background=True,
    )
    assert proc.wait(timeout=600) != 0
    log = (tmp_path / "doomed.log").read_text()
    assert re.search(
        r"(?s)PhaseError: step 0: phase 'rollout' failed .*rollout worker 0 died during generate: The actor died"
        r".*\(1 restart\(s\) in this call, max_restarts=1\)",
        log,
    ), log[-4000:]
    assert log.count("fault: injected: SIGKILL rollout 0") == 2 and log.count("fault: rollout 0 lost") == 1
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_one_step_off_policy_pipeline_is_bounded_deterministic_and_resumes_exactly(tmp_path, tiny_dir):
    """trainer.max_staleness=1: step k+1's batch is generated with version k's weights while step k trains.
    The logged versions show the bound holds (batch of step k sampled by version max(k − 1, 0), the learner at
    version k); an independent second run, killed after its first checkpoint (which holds the batch already
    collected for the next step) and resumed, reproduces every metric of the first."""
    # gen_batch_prompts above the batch: without dynamic sampling a step still generates exactly its 4 prompts
    ahead = [*STEPS, "trainer.max_staleness=1", "algorithm.adaptive_gen_rounds=true", "algorithm.gen_batch_prompts=8"]
    first = tmp_path / "first"
    run_train(first, tiny_dir, *ahead)
    rows = metrics(first)
    assert [row["dynamic_filter/groups_seen"] for row in rows] == [4, 4, 4]
    assert [row["rollout/policy_version"] for row in rows] == [0, 0, 1]
    assert [row["rollout/staleness"] for row in rows] == [0, 1, 1]
    assert [row["weight_sync/policy_version"] for row in rows] == [1, 2, 3]
    timings = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= row["perf/rollout_hidden_frac"] <= 1 for row in timings)
    for row in timings:  # the collection's time is its generation, its scoring and a little bookkeeping
        parts = row["timing_s/rollout_generate"] + row["timing_s/rollout_score"]
        assert row["timing_s/rollout_generate"] > 0 and row["timing_s/rollout_score"] > 0
        assert parts <= row["timing_s/rollout_busy"] and parts > 0.5 * row["timing_s/rollout_busy"], row

    second = tmp_path / "second"
    proc = run_train(second, tiny_dir, *ahead, *hold_before_step_1(tmp_path), background=True)
    checkpoint = second / "checkpoints" / "step_1"
    wait_until_held(proc, tmp_path)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (checkpoint / "trainer_state.json").exists(), "the hold comes after the first checkpoint"
    assert (checkpoint / "pending.pt").is_file(), "the checkpoint keeps the batch collected for step 1"
    assert not (second / "checkpoints" / "step_3" / "trainer_state.json").exists(), "finished before the kill"
    run_train(second, tiny_dir, *ahead, "trainer.resume=auto")
    assert metrics(second) == rows
