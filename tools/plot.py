"""Training curves from a run's metrics.jsonl, for one run or several overlaid (e.g. FIPO vs DAPO).

    python -m tools.plot outputs/demo                                   # → outputs/demo/curves.png
    python -m tools.plot outputs/demo outputs/demo_dapo --output outputs/compare.png

Four panels over training steps: the training batch's reward and accuracy; held-out accuracy (avg@k, and
cons@k / pass@k for a single run) with the evaluation before training at step 0; the mean response length;
FIPO's influence weights (mean over the step's mini-batches, and the last mini-batch's mean / min / max:
the first mini-batch of every step has θ = θ_old and weights ≡ 1, which dilutes the mean). Step axes count
updates: a metrics row `step = s` describes the batch of update s+1, and its evaluation ran after it (x = s+1).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of `<run_dir>/metrics.jsonl`, one dict per step."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir} (is it a training run's output_dir?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_eval_row(rows: Sequence[dict]) -> dict:
    """The last of metrics.jsonl's `rows` that holds an evaluation (eval/avg_at_k); {} when none does."""
    return next((row for row in reversed(rows) if row.get("eval/avg_at_k") is not None), {})


def run_label(run_dir: str | Path) -> str:
    """The algorithm from the run's summary.json, else the directory name."""
    summary = Path(run_dir) / "summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        if "algorithm" in data:
            return str(data["algorithm"])
    return Path(run_dir).name


def series(rows: Sequence[dict], key: str, *, shift: int = 0) -> tuple[list[int], list[float]]:
    """(x, y) of the rows that have `key` (not null); x = step + shift."""
    points = [(row["step"] + shift, row[key]) for row in rows if row.get(key) is not None]
    return [x for x, _ in points], [y for _, y in points]


def eval_series(rows: Sequence[dict], name: str) -> tuple[list[int], list[float]]:
    """Held-out `eval/<name>` over updates: the pre-training evaluation at x = 0, then x = step + 1."""
    x0, y0 = series(rows, f"eval/initial_{name}")
    x, y = series(rows, f"eval/{name}", shift=1)
    return [0] * len(x0) + x, y0 + y


def plot_runs(run_dirs: Sequence[str | Path], output: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Draw the four panels for every run in `run_dirs` into the PNG `output`; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(labels) if labels else [run_label(d) for d in run_dirs]
    single = len(run_dirs) == 1
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    ax_reward, ax_eval, ax_len, ax_w = axes.flat
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run_dir, label) in enumerate(zip(run_dirs, labels)):
        rows = read_metrics(run_dir)
        c = colors[i % len(colors)]
        ax_reward.plot(*series(rows, "reward/accuracy", shift=1), color=c, label=f"{label}: accuracy")
        ax_reward.plot(*series(rows, "reward/mean", shift=1), color=c, ls="--", label=f"{label}: reward")
        ax_eval.plot(*eval_series(rows, "avg_at_k"), color=c, marker="o", label=f"{label}: avg@k")
        if single:
            ax_eval.plot(*eval_series(rows, "cons_at_k"), color=c, marker="s", ls="--", alpha=0.6, label="cons@k")
            ax_eval.plot(*eval_series(rows, "pass_at_k"), color=c, marker="^", ls=":", alpha=0.6, label="pass@k")
        ax_len.plot(*series(rows, "rollout/response_length_mean", shift=1), color=c, label=f"{label}: train batch")
        ax_len.plot(*eval_series(rows, "response_length_mean"), color=c, ls="--", marker=".", label=f"{label}: eval")
        xw, mean = series(rows, "learner/last_mini_batch/influence_weights_mean", shift=1)
        if xw:
            _, lo = series(rows, "learner/last_mini_batch/influence_weights_min", shift=1)
            _, hi = series(rows, "learner/last_mini_batch/influence_weights_max", shift=1)
            ax_w.fill_between(xw, lo, hi, color=c, alpha=0.15, label=f"{label}: last mini-batch min..max")
            ax_w.plot(xw, mean, color=c, label=f"{label}: last mini-batch mean")
            ax_w.plot(*series(rows, "learner/influence_weights_mean", shift=1), color=c, ls=":", label="step mean")
    ax_reward.set(title="training batch (after dynamic sampling)", xlabel="update", ylabel="reward / accuracy")
    ax_eval.set(title="held-out accuracy", xlabel="update (0 = before RL)", ylabel="fraction", ylim=(-0.02, 1.02))
    ax_len.set(title="mean response length", xlabel="update", ylabel="tokens")
    ax_w.set(title="FIPO influence weights f = clip(exp(future-KL))", xlabel="update", ylabel="f")
    if not ax_w.lines:
        ax_w.text(0.5, 0.5, "no influence weights (not a FIPO run)", ha="center", va="center", transform=ax_w.transAxes)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(" vs ".join(labels) if not single else f"{labels[0]}: {Path(run_dirs[0])}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m tools.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", help="training output dirs (each with metrics.jsonl)")
    p.add_argument("--output", help="PNG path (default: <run_dir>/curves.png for one run, compare.png beside them)")
    p.add_argument("--labels", nargs="*", help="legend labels, one per run (default: the runs' algorithms)")
    args = p.parse_args(argv)
    default = Path(args.run_dirs[0]) / "curves.png" if len(args.run_dirs) == 1 else Path("outputs/compare.png")
    path = plot_runs(args.run_dirs, args.output or default, args.labels)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
