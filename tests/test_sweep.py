"""Hydra sweeps end to end, in a fresh shell (nothing exported, a new home folder, the venv not on PATH):

* a 2×2 sweep `-m experiment=study_fipo_vs_dapo algorithm=fipo,dapo seed=0,1` (the FIPO study's pipeline,
  docs/fipo_vs_dapo.md, shortened: 8 optimizer steps per rollout batch of 8 prompts) writes four runs, each in
  the folder named after its swept values, each its own wandb run grouped by the sweep with the algorithm as
  job type and `trainer/step` as the x axis; FIPO's influence-weight activity is logged for its last
  mini-batch; when the sweep ends, the comparison (table + PNG) is in the sweep folder, with numbers that
  match a hand computation from the members' metrics.jsonl;
* a member that fails (after Ray and its actors started) does not stop the next one: the sweep exits non-zero
  naming the failure, and the other member's results are complete.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from wandb_records import metric_records, run_record

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.vllm]

SMALL = [  # a seconds-long run: random tiny model, 2 steps of 4 prompts × 4 samples, one learner rank
    "model.warm_start_steps=0", "algorithm.group_size=4", "algorithm.train_batch_prompts=4",
    "algorithm.gen_batch_prompts=4", "algorithm.mini_batch_prompts=2", "algorithm.overlong_buffer_tokens=8",
    "rollout.max_response_tokens=16", "data.synthetic_train_prompts=32", "data.synthetic_val_prompts=4",
    "trainer.eval_samples=2", "trainer.eval_every=1", "model.tiny_hidden_size=64", "model.tiny_layers=2",
    "model.tiny_heads=2", "model.tiny_kv_heads=1", "model.tiny_intermediate_size=128", "learner.world_size=1",
    "trainer.total_steps=2",
]  # fmt: skip


def fresh_shell(tmp_path: Path) -> dict[str, str]:
    """A new user's environment: PATH without the venv, an empty HOME, no Ray/vLLM/hub/wandb variables."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != venv_bin)
    return {"PATH": path, "HOME": str(home), "LANG": "C.UTF-8"}


def sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m orchestration.train -m` with `overrides`, then SMALL's keys that `overrides` does not set; stdout
    and stderr in one stream, in the order printed."""
    keys = {o.split("=", 1)[0] for o in overrides}
    small = [o for o in SMALL if o.split("=", 1)[0] not in keys]
    cmd = [sys.executable, "-m", "orchestration.train", "-m", *overrides, *small,
           f"model.tiny_dir={tmp_path / 'tiny'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=fresh_shell(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=900)  # fmt: skip


def final_eval(run_dir: Path, key: str) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row.get(key) is not None][-1][key]


def test_two_by_two_sweep_writes_four_grouped_runs_and_their_comparison(tmp_path):
    study = ["experiment=study_fipo_vs_dapo", "algorithm.train_batch_prompts=8", "algorithm.gen_batch_prompts=8",
             "algorithm.mini_batch_prompts=1"]  # fmt: skip
    result = sweep(tmp_path, *study, "algorithm=fipo,dapo", "seed=0,1", "algorithm.filter_groups=false")
    assert result.returncode == 0, result.stdout[-5000:]
    root = tmp_path / "sweep"
    members = {f"algorithm={a},seed={s}": (a, s) for a in ("fipo", "dapo") for s in (0, 1)}
    assert {p.name for p in root.iterdir() if p.is_dir()} == set(members)
    for name, (algorithm, seed) in members.items():
        run = root / name
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == [0, 1]
        info = json.loads((run / "run_info.json").read_text())
        assert (info["config"]["algorithm"]["name"], info["config"]["seed"]) == (algorithm, seed)
        assert info["config"]["trainer"]["output_dir"] == str(run)
        assert info["sizes"]["mini_batches_per_step"] == 8 and info["git_commit"]
        assert info["config"]["model"]["init_seed"] == 0 and info["config"]["data"]["synthetic_seed"] == 0
        if algorithm == "fipo":
            assert all(0 <= row["learner/last_mini_batch/influence_weights_active_frac"] <= 1 for row in rows)
        (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
        record = run_record(wandb_file)
        assert (record.display_name, record.run_group, record.job_type) == (name, "sweep", algorithm)
        assert ("*", "trainer/step") in {(m.glob_name, m.step_metric) for m in metric_records(wandb_file)}

    # The comparison the sweep wrote when it ended, against a hand computation from the members' metrics.
    report = json.loads((root / "compare.json").read_text())
    assert report["group_by"] == ["algorithm"] and set(report["groups"]) == {"algorithm=fipo", "algorithm=dapo"}
    for algorithm in ("fipo", "dapo"):
        a, b = (final_eval(root / f"algorithm={algorithm},seed={s}", "eval/response_length_mean") for s in (0, 1))
        stats = report["groups"][f"algorithm={algorithm}"]["eval/response_length_mean"]
        assert stats["n"] == 2 and math.isclose(stats["mean"], (a + b) / 2, rel_tol=1e-12)
        assert math.isclose(stats["ci95"], 12.706 * abs(a - b) / 2, rel_tol=1e-9, abs_tol=1e-12)
    assert "algorithm=dapo − algorithm=fipo" in report["paired_differences"] or (
        "algorithm=fipo − algorithm=dapo" in report["paired_differences"]
    )
    table = (root / "compare.md").read_text()
    assert "| algorithm=fipo | 2 |" in table and "| algorithm=dapo | 2 |" in table
    assert (root / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (root / "compare.png").stat().st_size > 20_000


def test_a_failing_member_does_not_lose_the_others(tmp_path):
    # filter_groups=true on an untrained model: every group is all wrong, so dynamic sampling keeps none and
    # step 0 fails after Ray, the engine and the learner have started. The next member must still run.
    result = sweep(tmp_path, "algorithm.filter_groups=true,false", "algorithm.max_gen_rounds=1")
    output = result.stdout
    assert result.returncode != 0
    # its message alone (a condition of the run, not a bug), printed before the next member starts
    failure = "SamplingError: dynamic sampling kept 0 of the 4 groups"
    assert "error: step 0: phase 'rollout' failed after" in output and failure in output, output[-4000:]
    assert output.index(failure) < output.index("#1 : algorithm.filter_groups=False"), output[-4000:]
    failed = tmp_path / "sweep" / "algorithm.filter_groups=True"
    done = tmp_path / "sweep" / "algorithm.filter_groups=False"
    assert (failed / "run_info.json").is_file() and not (failed / "metrics.jsonl").exists()
    rows = [json.loads(line) for line in (done / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1]
    assert (done / "checkpoints" / "step_2" / "trainer_state.json").is_file()
    assert not (tmp_path / "sweep" / "compare.md").exists(), "a sweep with a failed member is not compared"


def test_a_member_with_a_bad_value_prints_its_error_alone_and_the_sweep_goes_on(tmp_path):
    # both members fail their config check in seconds, before Ray: the second must still be launched and its
    # error printed alone (it used to end the whole sweep through the first member's exit)
    result = sweep(tmp_path, "learner.lr=-1,-2")
    output = result.stdout
    assert result.returncode != 0
    for lr in ("-1.0", "-2.0"):
        assert f"error: learner.lr: must be > 0, got {lr}\n" in output, output[-4000:]
    assert "#1 : learner.lr=-2" in output
