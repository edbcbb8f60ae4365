"""Fault handling without Ray: the injection grammar and its config key, the learner restart budget, restore
points (checkpoints and snapshots of this run only), the metrics logger's wandb de-duplication of replayed
steps, and the start-up checks (preflight). The real kills are in tests/test_train_e2e.py,
tests/test_rollout_ray.py, tests/test_learner_ray.py, tests/test_reward_service.py and
tests/test_advantage_service.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_orchestration_config import load as load_config

from orchestration.checkpoint import STATE_FILE, CheckpointManager, TrainerState
from orchestration.cluster.faults import Faults, RestartBudgetError
from orchestration.config.errors import ConfigError
from orchestration.config.faults import FaultSpec
from rollout.tiny import build_tiny_model


def test_fault_specs_parse_and_bad_ones_say_the_grammar():
    assert FaultSpec.parse("rollout:0@2:generate") == FaultSpec("rollout", 0, 2, "generate", False, False)
    assert FaultSpec.parse(" learner:1@3:update:always ") == FaultSpec("learner", 1, 3, "update", True)
    assert FaultSpec.parse("advantage:0@1:compute") == FaultSpec("advantage", 0, 1, "compute", False)
    assert FaultSpec.parse("rollout:1@2:generate:node") == FaultSpec("rollout", 1, 2, "generate", False, True)
    assert FaultSpec.parse("learner:0@1:update:always:node").node
    for bad, match in [
        ("rollout0@2:generate", "is not KIND:INDEX@STEP:PHASE"),
        ("trainer:0@2:generate", "kind must be one of"),
        ("reward:0@1:update", "a reward phase must be one of"),
        ("rollout:-1@2:generate", "INDEX and STEP must be >= 0"),
        ("rollout:0@2:generate:twice", "the flags are .always. and .node."),
        ("rollout:0@2:generate:node:node", "the flags are .always. and .node."),
    ]:
        with pytest.raises(ValueError, match=match):
            FaultSpec.parse(bad)


def test_fault_inject_and_max_restarts_are_checked_naming_the_key():
    cfg = load_config("trainer.fault_inject=[rollout:0@1:generate,learner:1@0:update:always]")
    assert cfg.trainer.max_restarts == 3 and cfg.trainer.snapshot_every == 0
    with pytest.raises(ConfigError, match=r"trainer\.fault_inject: .*kind must be one of"):
        load_config("trainer.fault_inject=[gpu:0@1:generate]")
    with pytest.raises(ConfigError, match=r"trainer\.fault_inject: .*targets learner 2 .* 2 learner worker"):
        load_config("trainer.fault_inject=[learner:2@0:update]")
    with pytest.raises(ConfigError, match=r"trainer\.fault_inject: .*targets advantage 1 .* 1 advantage worker"):
        load_config("trainer.fault_inject=[advantage:1@0:compute]")
    with pytest.raises(ConfigError, match=r"trainer\.max_restarts"):
        load_config("trainer.max_restarts=-1")


def test_a_learner_step_failing_past_the_budget_ends_the_run_naming_worker_step_stage():
    faults = Faults([], max_restarts=2)
    error = RuntimeError("learner rank 1 died in update:\nThe actor died unexpectedly")
    faults.learner_failed(3, "update", "learner rank 1", error)
    faults.learner_failed(4, "update", "learner rank 1", error)  # another step: its own budget
    faults.learner_failed(3, "update", "learner rank 1", error)
    with pytest.raises(RestartBudgetError, match=r"(?s)learner rank 1 failed at step 3 in phase 'update' \(3 fail.*"
                       r"trainer\.max_restarts=2.*Last error:\nlearner rank 1 died in update"):  # fmt: skip
        faults.learner_failed(3, "update", "learner rank 1", error)


def test_restarts_are_counted_with_the_time_from_the_loss(capsys):
    faults = Faults([], max_restarts=1)
    faults.step = 5
    faults.restarted("rollout", 1, "generate", "died during generate: The actor died\n\tpid: 12", lost_at=0.0)
    metrics = faults.metrics()
    assert metrics["fault/rollout_restarts"] == 1.0 and metrics["fault/learner_restarts"] == 0.0
    assert metrics["fault/recovery_seconds"] > 0 and faults.events[0]["step"] == 5
    assert "fault: rollout 1 lost at step 5 in generate (died during generate: The actor died pid: 12)" in (
        capsys.readouterr().err
    )


def test_an_injected_fault_kills_only_the_chosen_process_once():
    """A real SIGKILL by pid (plain child processes stand in for the workers of this machine); `always` kills
    on every attempt. The victims wait for a signal (never for a time), so a victim still running after the
    others were killed is one that was left alone, on a machine of any speed."""
    victims = [subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"]) for _ in range(3)]
    try:
        faults = Faults([FaultSpec.parse("rollout:1@2:generate")], max_restarts=1)
        processes = {rank: (proc.pid, None) for rank, proc in enumerate(victims[:2])}
        faults.step = 1
        faults.submitted("rollout", "generate", processes)  # not the step
        faults.step = 2
        faults.submitted("rollout", "update_weights", processes)  # not the phase
        faults.submitted("reward", "generate", processes)  # not the kind
        assert [proc.poll() for proc in victims] == [None, None, None]
        faults.submitted("rollout", "generate", processes)
        assert victims[1].wait(timeout=60) == -9 and victims[0].poll() is None  # 60 s: a hang bound only
        retry = {1: (victims[2].pid, None)}
        faults.submitted("rollout", "generate", retry)  # once: the retry is left alone
        assert victims[2].poll() is None
        faults.specs = [FaultSpec.parse("rollout:1@2:generate:always")]
        faults.submitted("rollout", "generate", retry)
        assert victims[2].wait(timeout=60) == -9
    finally:
        for proc in victims:
            proc.kill()


class FakeLearner:
    """Writes what a learner would, so that CheckpointManager can be tested without one."""

    def save_checkpoint(self, path):
        Path(path).mkdir(parents=True)

    def export_hf(self, path):
        Path(path).mkdir(parents=True)

    def load_checkpoint(self, path):
        assert Path(path).is_dir()


def test_restore_points_are_this_runs_checkpoints_and_snapshots(tmp_path):
    stale = CheckpointManager(tmp_path)
    stale.save(TrainerState(step=50), FakeLearner())  # an earlier run in the same folder
    ckpt = CheckpointManager(tmp_path, keep=2)
    assert ckpt.restore_point() is None and ckpt.latest().name == "step_50"
    ckpt.save(TrainerState(step=2), FakeLearner())
    ckpt.save(TrainerState(step=3), FakeLearner(), snapshot=True)
    ckpt.save(TrainerState(step=5), FakeLearner(), snapshot=True)
    assert [p.name for p in ckpt.complete(snapshots=True)] == ["step_5"]  # only the newest snapshot is kept
    assert not (ckpt.step_dir(5, snapshot=True) / "hf").exists() and (ckpt.step_dir(2) / "hf").is_dir()
    assert ckpt.restore_point() == ckpt.step_dir(5, snapshot=True)
    ckpt.save(TrainerState(step=5), FakeLearner())  # a checkpoint wins a tie
    assert ckpt.latest() == ckpt.step_dir(50) and ckpt.restore_point() == ckpt.step_dir(5)
    assert [p.name for p in ckpt.complete()] == ["step_5", "step_50"]  # keep=2 pruned step_2

    resumed = CheckpointManager(tmp_path)
    state = resumed.load(ckpt.step_dir(5, snapshot=True), FakeLearner())
    assert state.step == 5 and resumed.restore_point() == ckpt.step_dir(5, snapshot=True)
    (ckpt.step_dir(5, snapshot=True) / STATE_FILE).unlink()  # incomplete: never a restore point
    assert resumed.restore_point() is None


def test_replayed_steps_go_to_metrics_jsonl_again_but_not_twice_to_wandb(tmp_path):
    import wandb
    from wandb_records import logged_steps

    from orchestration.metrics import MetricsLogger

    service_before = os.environ.get("WANDB_SERVICE")
    logger = MetricsLogger(tmp_path, total_steps=3, wandb_mode="offline", run_name="replay")
    try:
        for step in (0, 1):
            logger.log(step, {"reward/mean": float(step)})
        logger.truncate_after(0)  # a learner restart restored the start: step 0 is replayed
        for step in (0, 1, 2):
            logger.log(step, {"reward/mean": float(step)})
    finally:
        logger.close()
        # this process's wandb service must not outlive the test: runs started later as subprocesses would
        # inherit its address (WANDB_SERVICE) and share it
        wandb.teardown()
        if service_before is None:
            os.environ.pop("WANDB_SERVICE", None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2]
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    assert logged_steps(run_file) == [0, 1, 2]


def test_preflight_names_the_key(tmp_path, monkeypatch):
    import shutil

    from orchestration.cluster import preflight

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"trainer\.output_dir: .* is not writable"):
        preflight.preflight(load_config(f"trainer.output_dir={blocker}/run"))
    with pytest.raises(ConfigError, match=r"model\.path: .*no_such_model.* does not exist"):
        preflight.preflight(load_config(f"trainer.output_dir={tmp_path}/run", f"model.path={tmp_path}/no_such_model"))
    with pytest.raises(ConfigError, match=r"cluster\.rollout_cpus: \[0, 4096\] is not .* usable cores"):
        preflight.preflight(load_config(f"trainer.output_dir={tmp_path}/run", "cluster.rollout_cpus=[0,4096]"))

    cfg = load_config(f"trainer.output_dir={tmp_path}/run", "trainer.keep_checkpoints=2")
    one, snapshot = preflight.checkpoint_bytes(cfg)
    params = preflight.model_params(cfg)[0]
    m = cfg.model
    built = build_tiny_model(
        tmp_path / "tiny", hidden_size=m.tiny_hidden_size, num_hidden_layers=m.tiny_layers,
        num_attention_heads=m.tiny_heads, num_key_value_heads=m.tiny_kv_heads,
        intermediate_size=m.tiny_intermediate_size,
    )  # fmt: skip
    assert params == pytest.approx((built / "model.safetensors").stat().st_size / 4, rel=0.02)
    assert one == params * 16 and snapshot == params * 12  # 3 × 4 B of learner state + the float32 export
    assert preflight.disk_needed(cfg) == 3 * one  # two kept + the one being written
    assert preflight.disk_needed(load_config("trainer.keep_checkpoints=0", "trainer.save_every=10")) == 7 * one
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=one))
    with pytest.raises(ConfigError, match=r"trainer\.output_dir / trainer\.keep_checkpoints / trainer\.save_every"):
        preflight.preflight(cfg)
