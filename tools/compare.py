"""Compare training runs grouped by a config key: what a researcher does after every sweep.

    python -m tools.compare outputs/sweeps/2026-11-30_10-00-00            # every run under a sweep
    python -m tools.compare RUN_DIR... --group-by algorithm              # grouped by algorithm.name
    python -m tools.compare SWEEP --group-by algorithm.decay_rate --baseline 32.0

Reads each run's `metrics.jsonl` and `run_info.json` (written by orchestration/train.py), groups the runs by
the values of `--group-by` (dotted config keys; a config group such as `algorithm` means its `name`), and
writes into `--output-dir`:

    compare.md    one table row per group and metric: mean, 95% confidence interval over the runs (seeds), n;
                  then, per metric, the paired difference of every group against the baseline group over the
                  seeds both have (mean and 95% CI), when runs pair up by `--pair-by` (default: seed)
                  and for FIPO runs the mechanism's activity: the influence weights on the last mini-batch of
                  each step (share of tokens with f off 1 by > 1%, share above the clip, mean and max f),
                  averaged over the run's steps
    compare.json  the same numbers, plus every run's own final values
    compare.png   curves over training steps, per group: the mean over runs with a 95% confidence band (per-step
                  training curves smoothed within each run by a trailing --smooth-step mean; evaluations not)

Final values: the held-out metrics of each run's last evaluation (eval/avg_at_k, cons_at_k, pass_at_k,
response_length_mean), and the training batch's response length, entropy and reward accuracy averaged over the run's
last `--last-steps` steps (default 5: one step is noisy), and the run's wall time (the sum of its steps'
`timing_s/step`, evaluations included). With `--steps N`, every run is read as if it had ended after step N (its
last evaluation and last steps within its first N; runs that have fewer steps are left out and listed): runs that
stopped at different steps compare at one. On the built-in tasks, the habits: held-out shares and accuracies, when
the long habit comes to dominate the training batches, and how soon (its share and the response length over the
first `--first-steps` steps, default 10). Confidence intervals use Student's t with n − 1 degrees of freedom (n runs,
or n paired seeds); n = 1 gives no interval.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestration.data.tasks import HABITS as TASK_HABITS
from orchestration.metrics import RUN_INFO_FILE
from tools.plot import eval_series, last_eval_row, read_metrics, series

# Held-out metrics: the run's last evaluation.
FINAL_EVAL = {
    "eval/avg_at_k": "held-out avg@k",
    "eval/cons_at_k": "held-out cons@k",
    "eval/pass_at_k": "held-out pass@k",
    "eval/response_length_mean": "held-out response length",
}
# Training-batch metrics: mean over the run's last `last_steps` steps.
FINAL_TRAIN = {
    "rollout/response_length_mean": "train response length",
    "learner/entropy": "entropy",
    "reward/accuracy": "train accuracy",
}
# Per run: the sum of its steps' wall times (evaluations and checkpoints included; start-up excluded).
FINAL_RUN = {"train_seconds": "wall time per run (s)"}
# Before RL: the evaluation before the first step (trainer.eval_before_train).
BEFORE_RL = {
    "eval/initial_avg_at_k": "held-out avg@k before RL",
    "eval/initial_response_length_mean": "length before RL",
}
# The built-in tasks' habits (orchestration/data/tasks.py; free_chain: direct | at_once | partial | stepwise; a policy
# that moves to the long habit moves away from the others, the answer alone included): held-out values before RL (the
# answer alone's and the long habit's share and accuracy) and of the last evaluation, the training batches' long-habit
# share over the last steps, and the first step from which that share (trailing mean over --smooth steps) stays >= 1/2
# (None: never).
LONG = TASK_HABITS[-1]  # stepwise: the built-in tasks' habits run shortest first
SHORT = TASK_HABITS[0]  # direct: the answer alone
HABITS = (
    {f"eval/initial_habit/{h}_frac": f"{h} share before RL" for h in (SHORT, LONG)}
    | {f"eval/initial_habit/{h}_accuracy": f"{h} accuracy before RL" for h in (SHORT, LONG)}
    | {f"eval/habit/{habit}_frac": f"{habit.replace('_', '-')} share" for habit in TASK_HABITS}
    | {f"eval/habit/{habit}_accuracy": f"{habit.replace('_', '-')} accuracy" for habit in TASK_HABITS}
    | {f"rollout/habit/{LONG}_frac": f"train {LONG} share", "long_habit_step": f"step {LONG} dominates"}
)
LONG_HABIT = f"rollout/habit/{LONG}_frac"
# How soon: the training batches' long-habit share and response length, mean over the run's first --first-steps steps.
FIRST = "first_steps/"
HABITS |= {
    f"{FIRST}{LONG_HABIT}": f"train {LONG} share, first steps",
    f"{FIRST}rollout/response_length_mean": "train response length, first steps",
}
_HABITS_TITLE = (
    "Habits (orchestration/data/tasks.py): held-out shares and accuracies before RL and at the last evaluation;"
    " the training batches' stepwise share over the last steps; the first step from which it stays >= 50%"
    " (smoothed; runs that never get there are left out, n says how many did); the training batches' stepwise"
    " share and response length over the first steps (--first-steps):"
)
# FIPO's mechanism: the last mini-batch of every step (the first has θ = θ_old: weights ≡ 1), mean over all steps.
MECHANISM = {
    "learner/last_mini_batch/influence_weights_active_frac": "tokens with f off 1 by > 1% (%)",
    "learner/last_mini_batch/influence_weights_clipfrac_upper": "raw weight above the clip (%)",
    "learner/last_mini_batch/influence_weights_mean": "mean weight f",
    "learner/last_mini_batch/influence_weights_max": "max weight f",
}
# Curves of compare.png, one panel each in rows of four: (key, title, is an evaluation metric).
CURVES = (
    ("avg_at_k", "held-out avg@k", True),
    ("cons_at_k", "held-out cons@k", True),
    ("pass_at_k", "held-out pass@k", True),
    ("response_length_mean", "held-out response length (tokens)", True),
    ("reward/accuracy", "training batch accuracy", False),
    ("rollout/response_length_mean", "training response length (tokens)", False),
    ("learner/entropy", "entropy", False),
    ("habit/stepwise_frac", "held-out stepwise (long habit) share", True),
    ("rollout/habit/stepwise_frac", "training stepwise (long habit) share", False),
    ("habit/stepwise_accuracy", "held-out accuracy of stepwise chains", True),
    ("habit/partial_accuracy", "held-out accuracy of partial chains", True),
    ("learner/pg_clipfrac", "PPO ratio clip fraction", False),
    ("learner/last_mini_batch/influence_weights_mean", "FIPO: mean weight f", False),
    ("learner/last_mini_batch/influence_weights_max", "FIPO: max weight f", False),
    ("learner/last_mini_batch/influence_weights_active_frac", "FIPO: share with |f - 1| > 1%", False),
    ("learner/last_mini_batch/influence_weights_clipfrac_upper", "FIPO: share above the weight clip", False),
)
# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then 40, 60, 120, ∞).
_T975 = tuple(
    float(q)
    for q in """12.706 4.303 3.182 2.776 2.571 2.447 2.365 2.306 2.262 2.228 2.201 2.179 2.160 2.145 2.131
    2.120 2.110 2.101 2.093 2.086 2.080 2.074 2.069 2.064 2.060 2.056 2.052 2.048 2.045 2.042""".split()
)
_T975_TAIL = ((40, 2.021), (60, 2.000), (120, 1.980))


def t_quantile_975(dof: int) -> float:
    """The 97.5% quantile of Student's t with `dof` degrees of freedom (a table; beyond 30 the next tabulated
    dof at or below it, which errs on the wide side; 1.96 beyond 120)."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    if dof <= len(_T975):
        return _T975[dof - 1]
    value = _T975[-1]
    for bound, quantile in _T975_TAIL:
        if dof >= bound:
            value = quantile
    return value if dof < 1000 else 1.960


def mean_ci(values: Sequence[float]) -> dict[str, float | int | None]:
    """{"mean", "ci95" (half-width; None for n < 2), "std" (sample; None for n < 2), "n"} of `values`."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": None, "std": None, "n": 0}
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "ci95": None, "std": None, "n": 1}
    std = statistics.stdev(values)
    return {"mean": mean, "ci95": t_quantile_975(n - 1) * std / math.sqrt(n), "std": std, "n": n}


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run folders (those with a metrics.jsonl) at or below each path, sorted; a path with none is an error."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such folder")
        found = [path] if (path / "metrics.jsonl").is_file() else sorted(p.parent for p in path.rglob("metrics.jsonl"))
        if not found:
            raise FileNotFoundError(f"{path}: no training run in it (no metrics.jsonl at or below it)")
        runs += [run for run in found if run not in runs]
    return runs


def config_value(config: Mapping[str, Any], key: str) -> Any:
    """The value of dotted `key` in a run's config; a config group (a mapping with a `name`) gives its name."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(key)
        node = node[part]
    if isinstance(node, Mapping):
        if "name" not in node:
            raise KeyError(f"{key} is a section without a name; group by one of its keys ({sorted(node)[:8]} ...)")
        node = node["name"]
    return node


def dominance_step(rows: Sequence[Mapping[str, Any]], key: str = LONG_HABIT, window: int = 5) -> int | None:
    """The first step (1-based: after that many updates' batches) from which the trailing `window`-step mean of
    `key` stays >= 1/2 to the end of the run; None when it never does (or the run has no `key`)."""
    xs, ys = series(rows, key, shift=1)
    smooth = moving_average(ys, window)
    first = None
    for x, y in zip(xs, smooth):
        first = (first or x) if y >= 0.5 else None
    return first


def load_run(
    run_dir: Path,
    group_by: Sequence[str],
    pair_by: Sequence[str],
    last_steps: int,
    smooth: int = 5,
    first_steps: int = 10,
    steps: int | None = None,
) -> dict[str, Any]:
    """One run: its group label, pairing value (a tuple of the `pair_by` keys' values; None without keys), and
    final values (see the module docstring; `smooth`: the window of long_habit_step's trailing mean;
    `first_steps`: the steps the first_steps/ means cover; `steps`: read only the run's first `steps` steps, as if
    it had ended there; "steps" in the result is how many it has, at most `steps`)."""
    info_path = run_dir / RUN_INFO_FILE
    if not info_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {RUN_INFO_FILE} (written by orchestration.train since it exists)")
    config = json.loads(info_path.read_text())["config"]
    try:
        group = ", ".join(f"{key}={config_value(config, key)}" for key in group_by)
        pair = tuple(config_value(config, key) for key in pair_by) if pair_by else None
    except KeyError as err:
        raise KeyError(f"{run_dir}: the run's config has no key {err}") from None
    rows = read_metrics(run_dir)[:steps]
    last_eval = last_eval_row(rows)
    final = {key: last_eval.get(key) for key in FINAL_EVAL}
    tail = rows[-last_steps:]
    for key in (*FINAL_TRAIN, LONG_HABIT):
        values = [row[key] for row in tail if row.get(key) is not None]
        final[key] = statistics.fmean(values) if values else None
    final["train_seconds"] = sum(row.get("timing_s/step") or 0.0 for row in rows)
    for key in MECHANISM:
        values = [row[key] for row in rows if row.get(key) is not None]
        final[key] = statistics.fmean(values) if values else None
    first = rows[0] if rows else {}
    for key in (*BEFORE_RL, *HABITS):  # held-out values: before RL from the first row, else the last evaluation
        if key.startswith("eval/"):
            final[key] = (first if key.startswith("eval/initial_") else last_eval).get(key)
    final["long_habit_step"] = dominance_step(rows, window=smooth)
    for key in (k for k in HABITS if k.startswith(FIRST)):
        values = [row[key[len(FIRST) :]] for row in rows[:first_steps] if row.get(key[len(FIRST) :]) is not None]
        final[key] = statistics.fmean(values) if values else None
    return {"run": str(run_dir), "group": group, "pair": pair, "steps": len(rows), "final": final, "rows": rows}


def compare(
    runs: Sequence[dict[str, Any]], baseline: str | None = None
) -> tuple[dict[str, dict[str, dict]], dict[str, dict[str, dict]]]:
    """(per group: per metric mean_ci of the runs' final values; per non-baseline group: per metric mean_ci of
    the paired differences group − baseline over shared pairing values). The baseline is the group whose label is
    `baseline`, or the one group with a `key=<baseline>` part (e.g. "dapo"); by default the first in sorted order."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        groups[run["group"]].append(run)
    labels = sorted(groups)
    metrics = list(FINAL_EVAL) + list(FINAL_TRAIN) + list(FINAL_RUN) + list(MECHANISM) + list(BEFORE_RL) + list(HABITS)
    table = {
        label: {m: mean_ci([r["final"][m] for r in groups[label] if r["final"][m] is not None]) for m in metrics}
        for label in labels
    }
    base = labels[0]
    if baseline is not None:
        matches = [label for label in labels if label == baseline or any(
            part.split("=", 1)[-1] == baseline for part in label.split(", "))]  # fmt: skip
        if len(matches) != 1:
            raise ValueError(
                f"--baseline {baseline!r} matches {len(matches)} of the groups {labels}; give a full label"
            )
        base = matches[0]
    paired: dict[str, dict[str, dict]] = {}
    for label in labels:
        if label == base:
            continue
        by_pair = {r["pair"]: r for r in groups[base] if r["pair"] is not None}
        shared = [(by_pair[r["pair"]], r) for r in groups[label] if r["pair"] in by_pair]
        if not shared:
            continue
        paired[f"{label} − {base}"] = {
            m: mean_ci([r["final"][m] - b["final"][m] for b, r in shared if None not in (r["final"][m], b["final"][m])])
            for m in metrics
        }
    return table, paired


def _fmt(stats: Mapping[str, Any], scale: float) -> str:
    if stats["mean"] is None:
        return "n/a"
    text = f"{stats['mean'] * scale:.3g}" if scale == 1 else f"{stats['mean'] * scale:.1f}"
    if stats["ci95"] is not None:
        text += f" ± {stats['ci95'] * scale:.3g}" if scale == 1 else f" ± {stats['ci95'] * scale:.1f}"
    return text


def _percent(metric: str) -> float:
    """100 for accuracies and shares (shown in %, differences in points), else 1."""
    return 100.0 if ("_at_k" in metric or "accuracy" in metric or metric.endswith("_frac")) else 1.0


def markdown(table: Mapping[str, Mapping], paired: Mapping[str, Mapping], runs: Sequence[dict]) -> str:
    """The tables of compare.md: accuracies in percent (points for differences), lengths in tokens."""
    names = FINAL_EVAL | FINAL_TRAIN | FINAL_RUN
    scale = {m: _percent(m) for m in names}
    header = "| group | n | " + " | ".join(f"{names[m]}{' (%)' if scale[m] == 100 else ''}" for m in names) + " |"
    lines = [
        f"{len(runs)} runs; mean ± 95% CI over the runs of each group (Student's t); final held-out values are the "
        "last evaluation's, training values the mean of the last steps.",
        "",
        header,
        "|" + "---|" * (len(names) + 2),
    ]
    for label, stats in table.items():
        n = max(s["n"] for s in stats.values())
        lines.append(f"| {label} | {n} | " + " | ".join(_fmt(stats[m], scale[m]) for m in names) + " |")
    if paired:
        lines += [
            "",
            "Paired differences (same pairing values, --pair-by), mean ± 95% CI over the pairs:",
            "",
            header,
            lines[3],
        ]
        for label, stats in paired.items():
            n = max(s["n"] for s in stats.values())
            lines.append(f"| {label} | {n} | " + " | ".join(_fmt(stats[m], scale[m]) for m in names) + " |")
    for title, extra in (("Before RL (the evaluation before the first step):", BEFORE_RL), (_HABITS_TITLE, HABITS)):
        present = [m for m in extra if any(stats[m]["n"] for stats in table.values())]
        if not present:
            continue
        pct = {m: _percent(m) for m in present}
        head = "| group | n | " + " | ".join(f"{extra[m]}{' (%)' if pct[m] == 100 else ''}" for m in present) + " |"
        lines += ["", title, "", head, "|" + "---|" * (len(present) + 2)]
        for prefix, source in (("", table), ("paired: ", paired)):
            for label, stats in source.items():
                n = max(stats[m]["n"] for m in present)
                cells = [
                    _fmt(stats[m], pct[m]) + (f" (n={stats[m]['n']})" if stats[m]["n"] != n else "") for m in present
                ]
                lines.append(f"| {prefix}{label} | {n} | " + " | ".join(cells) + " |")
    fipo = {label: stats for label, stats in table.items() if stats[next(iter(MECHANISM))]["n"]}
    if fipo:
        lines += [
            "",
            "FIPO's influence weights f on the last mini-batch of each step, mean over the run's steps:",
            "",
            "| group | n | " + " | ".join(MECHANISM.values()) + " |",
            "|" + "---|" * (len(MECHANISM) + 2),
        ]
        for label, stats in fipo.items():
            pct = {m: 100.0 if m.endswith("_frac") or m.endswith("_upper") else 1.0 for m in MECHANISM}
            cells = " | ".join(_fmt(stats[m], pct[m]) for m in MECHANISM)
            lines.append(f"| {label} | {stats[next(iter(MECHANISM))]['n']} | {cells} |")
    return "\n".join(lines) + "\n"


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start); window 1 = the values themselves."""
    return [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def plot_groups(runs: Sequence[dict[str, Any]], output: Path, smooth: int = 1) -> Path:
    """compare.png: one panel per CURVES entry; per group the mean over its runs with a 95% band. Per-step
    training curves are first smoothed within each run by a trailing `smooth`-step mean (evaluations are not)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        groups[run["group"]].append(run)
    rows = math.ceil(len(CURVES) / 4)
    fig, axes = plt.subplots(rows, 4, figsize=(20, 4 * rows), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title, is_eval) in zip(axes.flat, CURVES):
        for i, (label, members) in enumerate(sorted(groups.items())):
            points: dict[int, list[float]] = defaultdict(list)
            for run in members:
                xs, ys = eval_series(run["rows"], key) if is_eval else series(run["rows"], key, shift=1)
                ys = ys if is_eval else moving_average(ys, smooth)
                for x, y in zip(xs, ys):
                    points[x].append(y)
            if not points:
                continue
            xs = sorted(points)
            stats = [mean_ci(points[x]) for x in xs]
            mean = [s["mean"] for s in stats]
            half = [s["ci95"] or 0.0 for s in stats]
            color = colors[i % len(colors)]
            ax.plot(xs, mean, color=color, marker="o" if is_eval else None, ms=3, label=f"{label} (n={len(members)})")
            ax.fill_between(
                xs, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)], color=color, alpha=0.2
            )
        ax.set(title=title, xlabel="update (0 = before RL)" if is_eval else "update")
        ax.ticklabel_format(useOffset=False, axis="y")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    smoothed = f"; per-step curves: {smooth}-step trailing mean within each run" if smooth > 1 else ""
    fipo = "; FIPO panels: last mini-batch of each step"
    fig.suptitle(f"mean over runs, 95% confidence band (Student's t){smoothed}{fipo}")
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m tools.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="run folders, or folders holding runs (a sweep)")
    p.add_argument("--group-by", nargs="+", default=["algorithm"], help="dotted config keys (default: algorithm)")
    p.add_argument(
        "--pair-by",
        nargs="*",
        default=["seed"],
        help="config key(s) pairing runs across groups, e.g. model.init_seed seed (none given = no pairing)",
    )
    p.add_argument("--baseline", help="the group the paired differences are taken against (a value of --group-by)")
    p.add_argument("--last-steps", type=int, default=5, help="training metrics: mean over this many last steps")
    p.add_argument("--first-steps", type=int, default=10, help="how soon: training metrics over the first steps")
    p.add_argument(
        "--steps",
        type=int,
        help="compare at this step: each run's first STEPS steps only (its last evaluation is the last within them);"
        " runs with fewer are left out and listed",
    )
    p.add_argument("--smooth", type=int, default=5, help="compare.png: trailing mean over this many steps (per run)")
    p.add_argument(
        "--output-dir", help="where compare.md/json/png go (default: the one path given, else outputs/compare)"
    )
    args = p.parse_args(argv)
    if args.last_steps < 1:
        p.error(f"--last-steps must be >= 1, got {args.last_steps}")
    if args.first_steps < 1:
        p.error(f"--first-steps must be >= 1, got {args.first_steps}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    smooth = max(1, args.smooth)
    runs = [
        load_run(run, args.group_by, args.pair_by, args.last_steps, smooth, args.first_steps, args.steps)
        for run in find_runs(args.paths)
    ]
    short = [run for run in runs if args.steps is not None and run["steps"] < args.steps]
    runs = [run for run in runs if args.steps is None or run["steps"] >= args.steps]
    if not runs:
        raise SystemExit(f"error: no run has {args.steps} steps (--steps)")
    table, paired = compare(runs, args.baseline)
    out = Path(args.output_dir or (args.paths[0] if len(args.paths) == 1 else "outputs/compare"))
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(table, paired, runs)
    if args.steps is not None:
        left_out = "".join(f"\n* left out, {run['steps']} steps: {run['run']}" for run in short)
        text = f"Compared at step {args.steps}: each run's first {args.steps} steps (--steps).{left_out}\n\n" + text
    (out / "compare.md").write_text(text)
    report = {
        "group_by": args.group_by,
        "pair_by": args.pair_by,
        "steps": args.steps,
        "left_out": [{"run": run["run"], "steps": run["steps"]} for run in short],
        "groups": table,
        "paired_differences": paired,
        "runs": [{k: v for k, v in run.items() if k != "rows"} for run in runs],
    }
    (out / "compare.json").write_text(json.dumps(report, indent=1, default=str))
    png = plot_groups(runs, out / "compare.png", smooth=smooth)
    print(text + f"\nwrote {out / 'compare.md'}, {out / 'compare.json'}, {png}", flush=True)
    return report


if __name__ == "__main__":
    main()
