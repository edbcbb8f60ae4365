"""Checkpoints cut short and a disk that fills while saving (issue 34, "checkpoints").

Real files: a one-rank learner in-process (the real FSDP2 DCP shard, RNG file, learner state and Hugging Face
export) saved through CheckpointManager; the last test cuts a real 2-rank training run's checkpoints short and
resumes it. Every expected size is read from the disk by the test before the cut, never taken from the
manifest under test.

* a file truncated, grown or missing, trainer_state.json missing, empty, half-written or of another step:
  resume takes the newest complete checkpoint and prints which it skipped and why;
* a checkpoint saved before manifests existed is taken as is, with a line saying so;
* ENOSPC while the driver writes (pending batch, trainer state) or the learner writes (DCP shard, HF export,
  also as it arrives through Ray from a rank): CheckpointError naming the directory, the file and the reason;
  the partial directory is removed, the previous checkpoints are intact and nothing is pruned; the training
  loop's learner recovery stops instead of replaying into the same full disk.
"""

import builtins
import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch.distributed as dist
from test_train_e2e import final_weights, metrics, run_train

import orchestration.checkpoint as checkpoint
from learner.config import LearnerConfig, LRScheduleConfig, OptimizerConfig
from learner.distributed import free_port, init_distributed
from learner.group import LearnerRankError
from learner.worker import LearnerWorker
from orchestration.checkpoint import STATE_FILE, CheckpointError, CheckpointManager, TrainerState, storage_error
from orchestration.steps import PhaseError, recover_learner
from rollout.tiny import build_tiny_model

ENOSPC = os.strerror(errno.ENOSPC)  # "No space left on device"


@pytest.fixture(scope="module")
def learner(tmp_path_factory):
    """A real one-rank learner (world size 1 runs the real FSDP2 and DCP code over a one-process gloo group)."""
    model_dir = build_tiny_model(tmp_path_factory.mktemp("ckpt") / "tiny")
    created = not dist.is_initialized()
    if created:
        init_distributed(0, 1, "127.0.0.1", free_port(), timeout_s=60)
    config = LearnerConfig(
        model_dir=str(model_dir),
        mini_batch_samples=8,
        micro_batch_tokens=4096,
        policy_loss="dapo",
        optimizer=OptimizerConfig(lr=1e-3, grad_clip=None),
        lr_schedule=LRScheduleConfig(warmup_steps=0),
    )
    yield LearnerWorker(config)
    if created:
        dist.destroy_process_group()


def saved(root, learner, steps=(1, 2), keep=0):
    """A CheckpointManager under `root` holding real checkpoints of `steps` (step 2 with a pending batch)."""
    ckpt = CheckpointManager(root, keep=keep)
    for step in steps:
        ckpt.save(TrainerState(step=step, policy_version=step), learner, pending={"batch": step} if step == 2 else None)
    return ckpt


def files_of(path):
    """{relative path: bytes} of every file under `path`, walked independently of the code under test."""
    out = {}
    for folder, _, names in os.walk(path):
        for name in names:
            full = os.path.join(folder, name)
            out[os.path.relpath(full, path).replace(os.sep, "/")] = os.path.getsize(full)
    return out


def digest(path):
    """A hash of every file's name and bytes under `path`."""
    h = hashlib.sha256()
    for name in sorted(files_of(path)):
        h.update(name.encode() + (Path(path) / name).read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# a checkpoint folder cut short


def test_a_save_records_every_file_with_its_size(tmp_path, learner):
    ckpt = saved(tmp_path, learner)
    path = ckpt.step_dir(2)
    record = json.loads((path / STATE_FILE).read_text())
    on_disk = files_of(path)
    del on_disk[STATE_FILE]
    assert record["manifest"] == on_disk
    expected = {
        "learner/dcp/__0_0.distcp",
        "learner/dcp/.metadata",
        "learner/rng_rank0.pt",
        "learner/learner_state.json",
    }
    assert expected | {"hf/model.safetensors", "hf/config.json", "pending.pt"} <= set(on_disk)
    assert {k: record[k] for k in ("step", "policy_version")} == {"step": 2, "policy_version": 2}
    assert ckpt.latest() == path and ckpt.restore_point() == path
    assert ckpt.load(path, learner) == TrainerState(step=2, policy_version=2)
    assert CheckpointManager.pending(path) == {"batch": 2}


def truncate(file, size=None):
    """Cut `file` to `size` bytes (default: half); returns its size before."""
    before = file.stat().st_size
    with open(file, "r+b") as f:
        f.truncate(before // 2 if size is None else size)
    return before


def cut_shard(path):
    before = truncate(path / "learner/dcp/__0_0.distcp")
    return f"learner/dcp/__0_0.distcp has {before // 2} bytes, {before} when saved (cut short)"


def cut_export(path):
    before = truncate(path / "hf/model.safetensors")
    return f"hf/model.safetensors has {before // 2} bytes, {before} when saved (cut short)"


def grow_pending(path):
    before = (path / "pending.pt").stat().st_size
    with open(path / "pending.pt", "ab") as f:
        f.write(b"\0" * 10)
    return f"pending.pt has {before + 10} bytes, {before} when saved (grew)"


def delete_shard(path):  # the rank's file of a one-rank learner: its only shard
    size = (path / "learner/dcp/__0_0.distcp").stat().st_size
    (path / "learner/dcp/__0_0.distcp").unlink()
    return f"learner/dcp/__0_0.distcp is missing (saved with {size} bytes)"


def delete_rank_rng(path):
    size = (path / "learner/rng_rank0.pt").stat().st_size
    (path / "learner/rng_rank0.pt").unlink()
    return f"learner/rng_rank0.pt is missing (saved with {size} bytes)"


def delete_two(path):
    size = (path / "hf/config.json").stat().st_size
    (path / "hf/config.json").unlink()
    delete_shard(path)  # the first missing file in path order (hf/ before learner/) is named, the rest counted
    return f"hf/config.json is missing (saved with {size} bytes) (and 1 more file(s) of the manifest in {STATE_FILE})"


def half_written_state(path):
    truncate(path / STATE_FILE)
    return "trainer_state.json is not valid JSON ("


def empty_state(path):  # renamed in place, its bytes never reached the disk (a crash without fsync)
    truncate(path / STATE_FILE, 0)
    return "trainer_state.json is not valid JSON (Expecting value: line 1 column 1 (char 0); 0 bytes)"


def no_state(path):  # the save was killed before its last write
    (path / STATE_FILE).unlink()
    return "no trainer_state.json (the save did not finish)"


def state_not_an_object(path):
    (path / STATE_FILE).write_text("[1, 2]")
    return "trainer_state.json holds a JSON list, not a trainer state"


def state_of_another_program(path):
    (path / STATE_FILE).write_text('{"step": 2, "epoch": 1}')
    return "trainer_state.json is not a trainer state (unknown keys ['epoch'])"


CUTS = [cut_shard, cut_export, grow_pending, delete_shard, delete_rank_rng, delete_two]
CUTS += [half_written_state, empty_state, no_state, state_not_an_object, state_of_another_program]


@pytest.mark.parametrize("cut", CUTS, ids=lambda f: f.__name__)
def test_resume_skips_a_checkpoint_cut_short_and_says_why(tmp_path, learner, capsys, cut):
    ckpt = saved(tmp_path, learner)
    newest, previous = ckpt.step_dir(2), ckpt.step_dir(1)
    reason = cut(newest)
    capsys.readouterr()

    resumed = CheckpointManager(tmp_path)  # a new run in the same folder (trainer.resume=auto)
    assert resumed.latest() == previous
    assert f"checkpoint: skipped {newest}: {reason}" in capsys.readouterr().out
    assert resumed.load(previous, learner) == TrainerState(step=1, policy_version=1)
    assert resumed.pending(previous) is None  # step 2's pending batch stays with step 2

    assert ckpt.restore_point() == previous  # a learner restart in the run that saved both
    assert f"checkpoint: skipped {newest}: {reason}" in capsys.readouterr().out
    assert [p.name for p in ckpt.complete()] == ["step_1"]


def test_when_every_checkpoint_is_cut_short_the_run_starts_over(tmp_path, learner, capsys):
    ckpt = saved(tmp_path, learner)
    shard, export = cut_shard(ckpt.step_dir(2)), no_state(ckpt.step_dir(1))
    assert CheckpointManager(tmp_path).latest() is None
    out = capsys.readouterr().out
    assert f"skipped {ckpt.step_dir(2)}: {shard}" in out and f"skipped {ckpt.step_dir(1)}: {export}" in out


def test_a_state_of_another_step_is_not_taken(tmp_path, learner, capsys):
    ckpt = saved(tmp_path, learner, steps=(1,))
    os.rename(ckpt.step_dir(1), ckpt.step_dir(7))  # a folder renamed by hand
    assert ckpt.latest() is None
    assert f"skipped {ckpt.step_dir(7)}: trainer_state.json is the state of step 1, not of step_7" in (
        capsys.readouterr().out
    )


def test_a_checkpoint_from_before_manifests_is_taken_as_is(tmp_path, learner, capsys):
    """What the previous version wrote: trainer_state.json without a manifest. Nothing to check its files
    against, so it is taken as before (a truncated file in it would only show when loading)."""
    ckpt = saved(tmp_path, learner, steps=(1, 2))
    old = ckpt.step_dir(2)
    legacy = {"step": 2, "policy_version": 2, "sampler": {}, "wandb_run_id": None, "extra": {}}
    (old / STATE_FILE).write_text(json.dumps(legacy, indent=2))
    resumed = CheckpointManager(tmp_path)
    assert resumed.latest() == old
    assert f"checkpoint: {old} has no manifest (saved by an older version): taken as is" in capsys.readouterr().out
    assert resumed.load(old, learner) == TrainerState(step=2, policy_version=2)


# ----------------------------------------------------------------------------------------------------------
# the disk filling up while saving


class FullDisk:
    """A file on a disk with `room` bytes left: writes fill it, then raise ENOSPC without a file name (as a
    real write(2) does)."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, data):
        n = min(len(data), self.room)
        self.file.write(bytes(data[:n]))
        self.room -= n
        if n < len(data):
            raise OSError(errno.ENOSPC, ENOSPC)
        return n

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def fill_disk_at(monkeypatch, name, room=100):
    """The driver's writes of files whose name starts with `name` hit a full disk after `room` bytes."""

    def fake_open(file, mode="r", *args, **kwargs):
        real = builtins.open(file, mode, *args, **kwargs)
        return FullDisk(real, room) if Path(file).name.startswith(name) else real

    monkeypatch.setattr(checkpoint, "open", fake_open, raising=False)


def check_previous_intact(ckpt, tmp_path, failed, before):
    """After a failed save of `failed`: it is gone, the older checkpoints are byte for byte as before and are
    the restore points."""
    assert not failed.exists()
    assert {p.name: digest(p) for p in ckpt.step_dirs()} == before
    assert ckpt.latest() == ckpt.restore_point() == ckpt.step_dir(2)
    assert CheckpointManager(tmp_path).latest() == ckpt.step_dir(2)


@pytest.mark.parametrize("name", ["trainer_state.json", "pending.pt"])
def test_a_full_disk_while_the_driver_writes_keeps_the_previous_checkpoint(tmp_path, learner, monkeypatch, name):
    ckpt = saved(tmp_path, learner, steps=(1, 2), keep=2)
    before = {p.name: digest(p) for p in ckpt.step_dirs()}
    fill_disk_at(monkeypatch, name)
    with pytest.raises(CheckpointError) as caught:
        ckpt.save(TrainerState(step=3), learner, pending={"batch": 3})
    step_3, step_2 = ckpt.step_dir(3), ckpt.step_dir(2)
    assert str(caught.value) == (
        f"checkpoint step_3: could not write {step_3 / name}: {ENOSPC} (ENOSPC); the partial {step_3} was "
        f"removed, older checkpoints are intact: a resume (trainer.resume=auto) continues from {step_2}"
    )
    check_previous_intact(ckpt, tmp_path, step_3, before)  # keep=2: step_1 not pruned for the failed step_3

    monkeypatch.undo()  # space freed: the same save succeeds and only then prunes
    ckpt.save(TrainerState(step=3), learner, pending={"batch": 3})
    assert [p.name for p in ckpt.complete()] == ["step_2", "step_3"]


def test_a_full_disk_while_the_learner_writes_its_shard(tmp_path, learner, monkeypatch):
    """The real DCP save: a rank's failed write comes back as torch's CheckpointException (a BaseException)
    carrying the OSError."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    ckpt = saved(tmp_path, learner, steps=(1, 2), keep=1)
    before = {p.name: digest(p) for p in ckpt.step_dirs()}

    def full(self, path, mode):
        raise OSError(errno.ENOSPC, ENOSPC)

    monkeypatch.setattr(FileSystem, "create_stream", full)
    with pytest.raises(CheckpointError, match=rf"^checkpoint step_3: could not write \S+/step_3/learner: {ENOSPC}"):
        ckpt.save(TrainerState(step=3), learner)
    check_previous_intact(ckpt, tmp_path, ckpt.step_dir(3), before)  # keep=1: step_2 was not pruned first
    monkeypatch.undo()
    ckpt.save(TrainerState(step=3), learner)
    assert [p.name for p in ckpt.step_dirs()] == ["step_3"]


def test_a_full_disk_while_the_learner_exports_hf_weights(tmp_path, learner, monkeypatch):
    """safetensors raises its own SafetensorError, not an OSError: 'I/O error: ... (os error 28)'."""
    import safetensors.torch
    from safetensors import SafetensorError

    ckpt = saved(tmp_path, learner, steps=(1, 2))
    before = {p.name: digest(p) for p in ckpt.step_dirs()}

    def full(tensors, filename, metadata=None):
        tmp = Path(filename).with_name(".tmpAbC123")
        tmp.write_bytes(b"\0" * 64)  # what it had written when the disk filled
        raise SafetensorError(f'Error while serializing: I/O error: {ENOSPC} (os error {errno.ENOSPC}) at path "{tmp}"')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CheckpointError) as caught:
        ckpt.save(TrainerState(step=3), learner)
    step_3 = ckpt.step_dir(3)
    assert str(caught.value).startswith(f"checkpoint step_3: could not write {step_3}/hf/.tmpAbC123: {ENOSPC}")
    check_previous_intact(ckpt, tmp_path, step_3, before)


def ray_wrapped(cause):
    """A learner rank's error as the driver gets it: LearnerRankError from Ray's RayTaskError(<cause's type>)."""
    from ray.exceptions import RayTaskError

    task_error = RayTaskError("call", f"Traceback (most recent call last):\n{cause!r}", cause).as_instanceof_cause()
    try:
        raise LearnerRankError("learner rank 1 failed in save_checkpoint:\n...", rank=1, method="x") from task_error
    except LearnerRankError as err:
        return err


class RankFails:
    """A learner group whose rank 1 fails in save_checkpoint with `error` (after writing part of its files)."""

    def __init__(self, error):
        self.error = error

    def save_checkpoint(self, path):
        Path(path).mkdir(parents=True)
        (Path(path) / "rng_rank0.pt").write_bytes(b"0" * 10)
        raise self.error


def test_a_full_disk_on_a_learner_rank_through_ray_stops_the_save(tmp_path, learner):
    ckpt = saved(tmp_path, learner, steps=(1, 2))
    error = ray_wrapped(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/shared/run/step_3/learner/x.distcp"))
    with pytest.raises(CheckpointError, match=r"could not write /shared/run/step_3/learner/x\.distcp: .*\(EDQUOT\)"):
        ckpt.save(TrainerState(step=3), RankFails(error))
    assert not ckpt.step_dir(3).exists()


def test_other_learner_failures_while_saving_keep_their_recovery(tmp_path, learner, capsys):
    """A killed or crashed rank is no storage error: its error passes unchanged (the loop rebuilds the learner and
    replays), and the partial directory is skipped as an interrupted save."""
    ckpt = saved(tmp_path, learner, steps=(1, 2))
    error = ray_wrapped(RuntimeError("Connection closed by peer"))
    assert storage_error(error) is None and storage_error(ray_wrapped(ConnectionResetError(104, "reset"))) is None
    with pytest.raises(LearnerRankError):
        ckpt.save(TrainerState(step=3), RankFails(error))
    assert ckpt.latest() == ckpt.restore_point() == ckpt.step_dir(2)
    assert f"skipped {ckpt.step_dir(3)}: no trainer_state.json (the save did not finish)" in capsys.readouterr().out


class NeverReplace:
    """A Run whose learner group failed; replacing it would be a replay."""

    class learner:  # noqa: N801
        failed = "save_checkpoint: rank 1 failed"

    def replace_learner(self):
        raise AssertionError("a full disk must not replay the steps")


def test_the_training_loop_stops_at_a_checkpoint_the_disk_cannot_take():
    cause = CheckpointError("checkpoint step_3: could not write ...")
    try:
        raise PhaseError("step 2: phase 'checkpoint' failed", phase="checkpoint", step=2) from cause
    except PhaseError as err:
        failed = err
    with pytest.raises(PhaseError) as caught:
        recover_learner(NeverReplace(), failed, logger=None, wandb_run_id=None)
    assert caught.value is failed


# ----------------------------------------------------------------------------------------------------------
# a real run


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_a_real_run_resumes_past_checkpoints_cut_short_to_the_same_metrics(tmp_path):
    """A 3-step run (2 learner ranks) with every checkpoint kept; then step_3 loses rank 1's shard and step_2's
    HF export is cut short: the resumed run says so, continues from step_1 and ends with the metrics and
    weights of the uninterrupted run."""
    tiny, out = tmp_path / "tiny" / "model", tmp_path / "run"
    tiny.parent.mkdir()
    steps = ["trainer.total_steps=3", "trainer.save_every=1", "trainer.keep_checkpoints=0"]
    run_train(out, tiny, *steps)
    reference, weights = metrics(out), final_weights(out)
    assert [row["step"] for row in reference] == [0, 1, 2]

    shard = out / "checkpoints/step_3/learner/dcp/__1_0.distcp"
    shard_bytes = shard.stat().st_size
    shard.unlink()
    export = out / "checkpoints/step_2/hf/model.safetensors"
    export_bytes = truncate(export)
    log = out.parent / f"{out.name}.log"
    start = log.stat().st_size

    run_train(out, tiny, *steps)  # trainer.resume=auto is the default
    text = log.read_text()[start:]
    step_3, step_2, step_1 = (out / "checkpoints" / f"step_{k}" for k in (3, 2, 1))
    assert f"checkpoint: skipped {step_3}: learner/dcp/__1_0.distcp is missing (saved with {shard_bytes} bytes)" in text
    assert (
        f"checkpoint: skipped {step_2}: hf/model.safetensors has {export_bytes // 2} bytes, {export_bytes} when "
        "saved (cut short)"
    ) in text
    assert f"resumed from {step_1} (step 1, policy version 1)" in text
    assert metrics(out) == reference
    resumed = final_weights(out)
    assert resumed.keys() == weights.keys() and all((resumed[k] == weights[k]).all() for k in weights)
    assert CheckpointManager(out).latest() == step_3
