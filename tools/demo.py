"""The demo: `make demo` (or `python -m tools.demo [hydra overrides]`).

Trains with the embedded default configuration (conf/config.yaml: FIPO on the built-in synthetic arithmetic
task, the tiny model after a cached supervised warm-start, the local CPU), then writes into the run's
output directory (outputs/demo, or outputs/demo_<algorithm> for another algorithm, e.g. `algorithm=dapo`):

    summary.json   initial and final held-out accuracy (avg@k, cons@k, pass@k), steps, wall seconds, algorithm
    metrics.jsonl  every step's metrics (written by the trainer)
    curves.png     reward, held-out accuracy, response length and FIPO's influence weights over the steps
    credit/        FIPO's token credit between the last two checkpoints (tools/credit.py)
    wandb/         the offline wandb run (written by the trainer; `wandb sync` uploads it)

The default task and schedule (conf/config.yaml, conf/model/tiny.yaml, conf/data/synthetic.yaml): left-to-right
arithmetic with 3-4 operations ("Compute left to right: 7 +3 -2 *3 -9", orchestration/data/tasks.py); a 1600-step
warm-start (~7 min, cached) whose targets are the worked chain for half of the problems and the bare answer
line for the other half (model.warm_start_shortcut_frac), so the model starts with two habits, checked before RL
(a failed warm-start stops the demo with a message: docs/warm_start.md); 60 RL steps of 16 prompts × 8 samples
(~1.8-2.0 s each on 2 cores). On this task reasoning first pays, and RL learns it: the
share of answer-first responses falls, responses grow longer and held-out accuracy rises (measured numbers,
FIPO against DAPO over three seeds, in docs/demo.md). summary.json carries, besides accuracy, the initial and
final answer-first share and the accuracy of each habit.

"Initial" is the model after the warm-start and before RL (the trainer's evaluation before step 0), "final"
the evaluation after the last step, both on the task's held-out split. The demo starts fresh: a previous
run in the same output directory is removed first (pass trainer.resume=auto to continue it instead).
Comparing two runs is one command: `python -m tools.plot outputs/demo outputs/demo_dapo`.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir

from orchestration.cluster.env import use_local_defaults
from orchestration.config.schema import register_configs, to_object
from orchestration.errors import clean_exit
from orchestration.evaluation import EVAL_METRIC_KEYS
from orchestration.inputs import WARM_START_CHECK_FILE
from tools.plot import last_eval_row, read_metrics

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_config(overrides: Sequence[str]):
    """The validated TrainConf of conf/config.yaml with `overrides`, plus the demo's output_dir and a fresh
    start unless the overrides set them."""
    register_configs()
    overrides = list(overrides)
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
        extra = []
        if "trainer.output_dir" not in keys:
            name = cfg.algorithm.name
            extra.append(f"trainer.output_dir=outputs/demo{'' if name == 'fipo' else '_' + name}")
        if "trainer.resume" not in keys:
            extra.append("trainer.resume=none")
        if extra:
            cfg = compose("config", overrides=overrides + extra)
    return to_object(cfg)


def accuracy_summary(rows: Sequence[dict]) -> dict[str, float | None]:
    """Initial (before RL) and final (after the last step) held-out avg@k / cons@k / pass@k, response length,
    and the share and accuracy of answer-first responses (no reasoning before the answer) from metrics rows."""
    out: dict[str, float | None] = {}
    first = rows[0] if rows else {}
    last_eval = last_eval_row(rows)
    names = {"accuracy": "avg_at_k"} | {key: key for key in EVAL_METRIC_KEYS if key != "avg_at_k"}
    for name, key in names.items():
        out[f"initial_{name}"] = first.get(f"eval/initial_{key}")
        out[f"final_{name}"] = last_eval.get(f"eval/{key}")
    out["final_eval_step"] = last_eval["step"] + 1 if last_eval else None
    return out


def run_demo(overrides: Sequence[str]) -> dict:
    """Train, then summarise, plot and draw the token credit; returns the summary."""
    use_local_defaults()  # the embedded default needs no network: offline hub and wandb, in-process vLLM
    # imported once the offline environment is set: the hub client, wandb and vLLM read it when imported
    from orchestration.train import train
    from tools.credit import main as credit_main
    from tools.plot import plot_runs

    cfg = compose_config(overrides)
    out = Path(cfg.trainer.output_dir)
    if cfg.trainer.resume == "none" and out.exists():
        print(f"demo: starting fresh, removing the previous run in {out}", flush=True)
        shutil.rmtree(out)
    start = time.monotonic()
    train(cfg)
    wall = time.monotonic() - start
    rows = read_metrics(out)
    summary_path, check_path = out / "summary.json", out / WARM_START_CHECK_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if check_path.is_file():  # the warm-start's check before RL (orchestration.inputs.check_warm_start)
        check = json.loads(check_path.read_text())
        keys = ("chain_exact", "operation_lines", "result_accuracy", "bar")
        summary["warm_start_check"] = {key: check[key] for key in keys}
    summary |= {
        "algorithm": cfg.algorithm.name,
        "steps": len(rows),
        "wall_seconds": wall,
        "eval_samples_per_problem": cfg.trainer.eval_samples,
        "eval_problems": cfg.data.synthetic_val_prompts if not cfg.data.val_files else None,
        "warm_start_steps": cfg.model.warm_start_steps,
        "seed": cfg.seed,
        "overrides": list(overrides),
    } | accuracy_summary(rows)
    if summary["initial_accuracy"] is not None and summary["final_accuracy"] is not None:
        summary["accuracy_gain"] = summary["final_accuracy"] - summary["initial_accuracy"]
    curves = plot_runs([out], out / "curves.png", [cfg.algorithm.name])
    summary["curves"] = str(curves)
    summary_path.write_text(json.dumps(summary, indent=2, default=float))
    try:
        credit = credit_main(["--run-dir", str(out), "--output-dir", str(out / "credit"), "--num-traces", "4"])
        summary["credit"] = str(credit["html"])
    except FileNotFoundError as err:  # fewer than two checkpoints (a very short run)
        print(f"demo: no token-credit picture: {err}", file=sys.stderr)
    summary_path.write_text(json.dumps(summary, indent=2, default=float))
    print(
        f"\ndemo ({cfg.algorithm.name}, {summary['steps']} steps, {wall:.0f} s): held-out accuracy "
        f"{_pct(summary['initial_accuracy'])} before RL → {_pct(summary['final_accuracy'])} after "
        f"(avg@{cfg.trainer.eval_samples} on {summary['eval_problems']} problems)\n"
        f"  summary   {summary_path}\n  metrics   {out / 'metrics.jsonl'}\n  curves    {curves}\n"
        + (f"  credit    {summary['credit']}\n" if "credit" in summary else "")
        + f"  wandb     {out / 'wandb'} (offline; `wandb sync` uploads it)",
        flush=True,
    )
    return summary


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


if __name__ == "__main__":
    with clean_exit():  # a user's mistake: its message alone, no traceback
        run_demo(sys.argv[1:])
