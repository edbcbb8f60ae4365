"""`python -m tools.compare` on runs written by hand (golden values computed by hand below), and the
sweep members' folder names (orchestration/config/sweep.py)."""

import json
import math

import pytest

from orchestration.config.sweep import SWEPT_KEYS_ENV, member_dirname, swept_keys
from tools.compare import config_value, dominance_step, find_runs, main, mean_ci, t_quantile_975

# final held-out avg@k per seed; the training response length of the last steps is 20 + seed for fipo, 10 for dapo
FINAL = {"fipo": [0.5, 0.6, 0.7], "dapo": [0.4, 0.6, 0.5]}


def write_run(path, algorithm, seed, final_avg, steps=8):
    path.mkdir(parents=True)
    rows = []
    for step in range(steps):
        row = {"step": step, "rollout/response_length_mean": (20.0 + seed if algorithm == "fipo" else 10.0) + step}
        row["timing_s/step"] = 2.0
        if algorithm == "fipo":  # FIPO's weights on the last mini-batch: active share 0.1 + seed / 10 every step
            row["learner/last_mini_batch/influence_weights_active_frac"] = 0.1 + seed / 10
        if step == 0:
            row["eval/initial_avg_at_k"] = 0.1
        if step == steps - 1:
            row |= {"eval/avg_at_k": final_avg, "eval/response_length_mean": 30.0}
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"seed": seed, "algorithm": {"name": algorithm, "decay_rate": 32.0}, "learner": {"lr": 1e-4}}
    (path / "run_info.json").write_text(json.dumps({"config": config}))


@pytest.fixture
def sweep_dir(tmp_path):
    for algorithm, values in FINAL.items():
        for seed, value in enumerate(values):
            write_run(tmp_path / "sweep" / f"algorithm={algorithm},seed={seed}", algorithm, seed, value)
    return tmp_path / "sweep"


def test_t_quantiles_and_mean_ci_by_hand():
    assert (t_quantile_975(1), t_quantile_975(2), t_quantile_975(10), t_quantile_975(30)) == (
        12.706,
        4.303,
        2.228,
        2.042,
    )
    assert t_quantile_975(35) == 2.042 and t_quantile_975(10**6) == 1.96  # a table: never narrower than exact
    stats = mean_ci([0.5, 0.6, 0.7])
    assert math.isclose(stats["mean"], 0.6) and math.isclose(stats["std"], 0.1)
    assert math.isclose(stats["ci95"], 4.303 * 0.1 / math.sqrt(3))
    assert mean_ci([0.3]) == {"mean": 0.3, "ci95": None, "std": None, "n": 1}
    assert mean_ci([])["n"] == 0


def test_compare_groups_intervals_and_paired_differences(sweep_dir, capsys):
    report = main([str(sweep_dir), "--group-by", "algorithm", "--baseline", "dapo", "--last-steps", "3"])
    groups = report["groups"]
    assert set(groups) == {"algorithm=fipo", "algorithm=dapo"}
    fipo, dapo = groups["algorithm=fipo"], groups["algorithm=dapo"]
    half = 4.303 * 0.1 / math.sqrt(3)  # both groups have a sample std of 0.1 over three seeds
    assert math.isclose(fipo["eval/avg_at_k"]["mean"], 0.6) and math.isclose(fipo["eval/avg_at_k"]["ci95"], half)
    assert math.isclose(dapo["eval/avg_at_k"]["mean"], 0.5) and math.isclose(dapo["eval/avg_at_k"]["ci95"], half)
    # training response length: mean of the last 3 steps (5, 6, 7 added) = base + 6; fipo's base is 20 + seed
    assert math.isclose(fipo["rollout/response_length_mean"]["mean"], 21 + 6)
    assert dapo["rollout/response_length_mean"] == {"mean": 16.0, "ci95": 0.0, "std": 0.0, "n": 3}
    # paired by seed: fipo − dapo = 0.1, 0.0, 0.2 → mean 0.1, sample std 0.1
    diff = report["paired_differences"]["algorithm=fipo − algorithm=dapo"]["eval/avg_at_k"]
    assert diff["n"] == 3 and math.isclose(diff["mean"], 0.1) and math.isclose(diff["ci95"], half)
    assert fipo["train_seconds"]["mean"] == 16.0  # 8 steps of 2 s
    active = fipo["learner/last_mini_batch/influence_weights_active_frac"]  # seeds 0, 1, 2: 0.1, 0.2, 0.3
    assert math.isclose(active["mean"], 0.2) and math.isclose(active["ci95"], half)
    assert dapo["learner/last_mini_batch/influence_weights_active_frac"]["n"] == 0
    table = (sweep_dir / "compare.md").read_text()
    assert (
        "| algorithm=fipo | 3 | 60.0 ± 24.8 |" in table
        and "| algorithm=fipo − algorithm=dapo | 3 | 10.0 ± 24.8 |" in table
    )
    assert "| algorithm=fipo | 3 | 20.0 ± 24.8 |" in table.split("FIPO's influence weights")[1]
    assert (sweep_dir / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "algorithm=dapo" in capsys.readouterr().out


def test_group_by_a_plain_key_and_errors_that_name_the_problem(sweep_dir, tmp_path):
    report = main([str(sweep_dir), "--group-by", "algorithm.decay_rate", "--output-dir", str(tmp_path / "out")])
    assert list(report["groups"]) == ["algorithm.decay_rate=32.0"] and not report["paired_differences"]
    assert report["groups"]["algorithm.decay_rate=32.0"]["eval/avg_at_k"]["n"] == 6
    with pytest.raises(ValueError, match="matches 0 of the groups"):
        main([str(sweep_dir), "--baseline", "grpo", "--output-dir", str(tmp_path / "out")])
    two_keys = main([str(sweep_dir), "--group-by", "algorithm", "learner.lr", "--baseline", "dapo",
                     "--output-dir", str(tmp_path / "out")])  # fmt: skip
    assert list(two_keys["paired_differences"]) == [
        "algorithm=fipo, learner.lr=0.0001 − algorithm=dapo, learner.lr=0.0001"
    ]
    with pytest.raises(KeyError, match="no key 'trainer.nope'"):
        main([str(sweep_dir), "--group-by", "trainer.nope", "--output-dir", str(tmp_path / "out")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no training run in it"):
        find_runs([tmp_path / "empty"])
    config = {"algorithm": {"name": "fipo", "clip": {"low": 0.2}}, "seed": 3}
    assert (config_value(config, "algorithm"), config_value(config, "seed")) == ("fipo", 3)
    with pytest.raises(KeyError, match="section without a name"):
        config_value(config, "algorithm.clip")


def test_sweep_member_folder_names(monkeypatch):
    overrides = ["algorithm=dapo", "seed=1", "trainer.total_steps=60", "model.path=/models/qwen", "learner.lr=1e-4"]
    assert swept_keys(["algorithm=fipo,dapo", "seed=range(3)", "trainer.total_steps=60"]) == ["algorithm", "seed"]
    monkeypatch.setenv(SWEPT_KEYS_ENV, "algorithm,seed")
    assert member_dirname(overrides) == "algorithm=dapo,seed=1"
    monkeypatch.delenv(SWEPT_KEYS_ENV)  # sweep keys unknown: every override names the folder, "/" never nests
    assert member_dirname(overrides) == (
        "algorithm=dapo,learner.lr=0.0001,model.path=_models_qwen,seed=1,trainer.total_steps=60"
    )
    long_name = member_dirname([f"data.synthetic_train_prompts={10**100}", f"seed={10**90}"])
    assert len(long_name) == 120 and long_name.startswith("data.synthetic_train_prompts=1000")
    assert long_name != member_dirname([f"data.synthetic_train_prompts={10**100}", f"seed={10**90 + 1}"])


def test_moving_average_is_trailing():
    from tools.compare import moving_average

    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert moving_average([5.0, 7.0], 1) == [5.0, 7.0]


def test_dominance_step_by_hand():
    def rows(shares):
        return [{"step": i, "rollout/habit/stepwise_frac": v} for i, v in enumerate(shares)]

    # window 1: the share itself; it must stay >= 0.5 to the end (the dip at step index 3 restarts the count)
    assert dominance_step(rows([0.2, 0.6, 0.7, 0.4, 0.5, 0.9]), window=1) == 5  # x = index + 1
    # window 2: trailing means 0.2, 0.4, 0.65, 0.55, 0.45, 0.7 → from index 5
    assert dominance_step(rows([0.2, 0.6, 0.7, 0.4, 0.5, 0.9]), window=2) == 6
    assert dominance_step(rows([0.1, 0.2]), window=1) is None
    assert dominance_step([{"step": 0}], window=1) is None


def test_pairing_by_two_keys_and_habit_tables(tmp_path):
    # 2 warm-starts × 2 seeds × 2 algorithms; stepwise share per step = slope·(step + 1), fipo's slope 0.1, dapo's
    # 0.05 + 0.01·init_seed; held-out stepwise share at the end = 0.5 + 0.1·init_seed + (0.2 for fipo)
    for init_seed in (0, 1):
        for seed in (0, 1):
            for algorithm in ("fipo", "dapo"):
                path = tmp_path / "sweep" / f"i={init_seed},s={seed},a={algorithm}"
                path.mkdir(parents=True)
                slope = 0.1 if algorithm == "fipo" else 0.05 + 0.01 * init_seed
                rows = [{"step": s, "rollout/habit/stepwise_frac": slope * (s + 1)} for s in range(10)]
                rows[0] |= {"eval/initial_avg_at_k": 0.3 + 0.1 * init_seed, "eval/initial_habit/stepwise_frac": 0.25,
                            "eval/initial_habit/direct_accuracy": 0.05 * init_seed}  # fmt: skip
                final = 0.5 + 0.1 * init_seed + (0.2 if algorithm == "fipo" else 0.0)
                rows[-1] |= {"eval/avg_at_k": 0.5, "eval/habit/stepwise_frac": final}
                (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
                config = {"seed": seed, "model": {"init_seed": init_seed}, "algorithm": {"name": algorithm}}
                (path / "run_info.json").write_text(json.dumps({"config": config}))
    report = main([str(tmp_path / "sweep"), "--baseline", "dapo", "--pair-by", "model.init_seed", "seed",
                   "--smooth", "1", "--last-steps", "2", "--first-steps", "4"])  # fmt: skip
    fipo, dapo = report["groups"]["algorithm=fipo"], report["groups"]["algorithm=dapo"]
    diff = report["paired_differences"]["algorithm=fipo − algorithm=dapo"]
    # 4 pairs (not 2: seed alone would pair runs of different warm-starts, and the dict would keep one of each)
    assert diff["eval/habit/stepwise_frac"]["n"] == 4 and math.isclose(diff["eval/habit/stepwise_frac"]["mean"], 0.2)
    assert diff["eval/habit/stepwise_frac"]["ci95"] == pytest.approx(0.0, abs=1e-12)
    # fipo: 0.1·(s + 1) >= 0.5 from s = 4, i.e. step 5; dapo init 0: 0.05·(s+1) from s = 9 (step 10); init 1:
    # 0.06·(s + 1) >= 0.5 from s = 8 (step 9)
    assert fipo["long_habit_step"] == {"mean": 5.0, "ci95": 0.0, "std": 0.0, "n": 4}
    assert math.isclose(dapo["long_habit_step"]["mean"], 9.5) and dapo["long_habit_step"]["n"] == 4
    assert math.isclose(diff["long_habit_step"]["mean"], -4.5)
    # the training share over the last 2 steps (s = 8, 9): fipo 0.95; before RL: 0.3 and 0.4 by warm-start
    assert math.isclose(fipo["rollout/habit/stepwise_frac"]["mean"], 0.95)
    assert math.isclose(fipo["eval/initial_avg_at_k"]["mean"], 0.35)
    assert math.isclose(fipo["eval/initial_habit/direct_accuracy"]["mean"], 0.025)
    # how soon: the share over the first 4 steps (s = 0..3) is slope·2.5: fipo 0.25, dapo 0.125 and 0.15 by warm-start
    assert math.isclose(fipo["first_steps/rollout/habit/stepwise_frac"]["mean"], 0.25)
    assert math.isclose(diff["first_steps/rollout/habit/stepwise_frac"]["mean"], 0.25 - (0.125 + 0.15) / 2)
    table = (tmp_path / "sweep" / "compare.md").read_text()
    assert "Before RL" in table and "step stepwise dominates" in table and "stepwise share, first steps" in table
    assert "| paired: algorithm=fipo − algorithm=dapo | 4 |" in table


def test_runs_that_stopped_at_different_steps_compare_at_one(tmp_path):
    # 10-step runs with evaluations after steps 5 and 10 (avg@k 0.2 + seed / 10 at 5, 0.9 at 10); one 3-step run
    for seed in (0, 1):
        path = tmp_path / "sweep" / f"seed={seed}"
        path.mkdir(parents=True)
        rows = [{"step": s, "rollout/response_length_mean": 10.0 * (s + 1), "timing_s/step": 1.0} for s in range(10)]
        rows[4] |= {"eval/avg_at_k": 0.2 + seed / 10}
        rows[9] |= {"eval/avg_at_k": 0.9}
        (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = {"seed": seed, "algorithm": {"name": "dapo"}}
        (path / "run_info.json").write_text(json.dumps({"config": config}))
    write_run(tmp_path / "sweep" / "seed=2", "dapo", 2, 0.5, steps=3)
    report = main([str(tmp_path / "sweep"), "--steps", "5", "--last-steps", "2", "--pair-by"])
    (group,) = report["groups"].values()
    assert group["eval/avg_at_k"]["n"] == 2 and math.isclose(group["eval/avg_at_k"]["mean"], 0.25)
    # the training length over the last 2 of the first 5 steps (s = 3, 4): 45; the wall time: 5 steps of 1 s
    assert math.isclose(group["rollout/response_length_mean"]["mean"], 45.0)
    assert math.isclose(group["train_seconds"]["mean"], 5.0)
    assert report["left_out"] == [{"run": str(tmp_path / "sweep" / "seed=2"), "steps": 3}]
    text = (tmp_path / "sweep" / "compare.md").read_text()
    assert text.startswith("Compared at step 5: each run's first 5 steps (--steps).\n* left out, 3 steps: ")
    # without --steps, every run's own last evaluation
    report = main([str(tmp_path / "sweep"), "--pair-by"])
    assert report["groups"]["algorithm=dapo"]["eval/avg_at_k"]["n"] == 3
    assert math.isclose(report["groups"]["algorithm=dapo"]["eval/avg_at_k"]["mean"], (0.9 + 0.9 + 0.5) / 3)
