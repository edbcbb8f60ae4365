"""The training loop: `python -m orchestration.train [hydra overrides]` (sweeps: orchestration/config/sweep.py).

With no overrides: FIPO on the built-in synthetic task with the tiny model on the local CPU. Each step:
rollout with dynamic sampling → rewards → old log-probs → advantages → learner update (FIPO's future-KL
weights inside the loss of each micro-batch) → weight push (policy version + 1) → metrics → checkpoint/eval.
With trainer.max_staleness=1 the next step's rollout runs while this step trains (orchestration/pipeline.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from orchestration.checkpoint import TrainerState
from orchestration.config.errors import ConfigError
from orchestration.config.schema import TrainConf, register_configs, to_object
from orchestration.config.sweep import register_resolver
from orchestration.errors import clean_exit
from orchestration.metrics import RUN_INFO_FILE, MetricsLogger, rollout_metrics, run_info, timing_metrics, to_floats
from orchestration.pipeline import RolloutPipeline
from orchestration.run import Run, build_run, stack_dir
from orchestration.steps import (
    PhaseError,
    compute_advantages,
    evaluate,
    learner_metrics,
    phase,
    recover_learner,
    restore,
)


def train(cfg: TrainConf) -> dict[str, float]:
    """Run (or resume) training; returns the last step's metrics. A failed learner group is rebuilt and the
    run replayed from its newest restore point (`recover_learner`); lost engines and reward actors are
    replaced inside their groups (docs/reliability.md)."""
    run = build_run(cfg)
    t, stacks = cfg.trainer, stack_dir(cfg)
    print(run.sizes.describe(), flush=True)
    logger, run.pipeline = None, RolloutPipeline(run, t.max_staleness)
    try:
        latest = run.ckpt.latest() if t.resume == "auto" else None
        state = restore(run, latest)
        logger = open_logger(run, state)
        if latest:
            print(f"resumed from {latest} (step {state.step}, policy version {state.policy_version})", flush=True)
        run.push_weights(state.policy_version)
        metrics: dict[str, float] = {}
        while state.step < t.total_steps:
            step = run.faults.step = state.step
            if step == t.hold_at_step:
                hold(t.hold_file, step)
            timings: dict[str, float] = {}
            start = time.perf_counter()
            metrics = dict(run.data_metrics)
            try:
                if run.val_rows and t.eval_before_train and step == 0:
                    with phase("eval", step, timings, stacks):
                        initial = evaluate(run, run.val_rows, step)
                        metrics |= {k.replace("eval/", "eval/initial_"): v for k, v in initial.items()}
                with phase("rollout", step, timings, stacks):  # collected now, or ahead during the last step
                    batch, rollout_info = run.pipeline.batch(step, state.policy_version)
                metrics |= rollout_info | rollout_metrics(batch, cfg.rollout.max_response_tokens)
                run.pipeline.start(step + 1)  # max_staleness 1: the next batch is generated while this one trains
                with phase("old_log_probs", step, timings, stacks):
                    batch = batch.replace(old_log_probs=run.learner.compute_log_probs(batch))
                if run.uses_reference:
                    with phase("ref_log_probs", step, timings, stacks):
                        batch = batch.replace(ref_log_probs=run.learner.compute_log_probs(batch, reference=True))
                with phase("advantages", step, timings, stacks):
                    batch, adv_metrics = compute_advantages(run, batch)
                with phase("update", step, timings, stacks):
                    metrics |= learner_metrics(run.learner.update(batch)) | to_floats(adv_metrics)
                with phase("rollout_wait", step, timings, stacks):  # the engines finish the next batch first
                    run.pipeline.drain()
                with phase("weight_sync", step, timings, stacks):
                    state.policy_version += 1
                    metrics |= run.push_weights(state.policy_version)
                last = step + 1 == t.total_steps
                if run.val_rows and t.eval_every and ((step + 1) % t.eval_every == 0 or last):
                    with phase("eval", step, timings, stacks):
                        metrics |= evaluate(run, run.val_rows, step + 1)
                state.step, state.sampler = step + 1, run.sampler.state_dict()
                state.extra["round_sizer"] = run.round_sizer.state_dict() if run.round_sizer else {}
                snapshot = not ((t.save_every and state.step % t.save_every == 0) or last)
                if not snapshot or (t.snapshot_every and state.step % t.snapshot_every == 0):
                    with phase("snapshot" if snapshot else "checkpoint", step, timings, stacks):
                        run.ckpt.save(state, run.learner, snapshot=snapshot, pending=run.pipeline.state_dict())
            except PhaseError as err:  # a failed learner: a new group, restored; the loop replays from there
                state = recover_learner(run, err, logger, state.wandb_run_id)
                continue
            timings["timing_s/step"] = time.perf_counter() - start
            metrics |= timing_metrics(timings, metrics) | run.faults.metrics()
            logger.log(step, metrics)
        write_summary(run, metrics)
        return metrics
    finally:
        if logger is not None:
            logger.close()
        run.pipeline.close()
        run.shutdown()


def open_logger(run: Run, state: TrainerState) -> MetricsLogger:
    """Write the run's run_info.json (config, sizes, layout, data report) and open its metrics log (metrics.jsonl
    cut back to `state.step` on a resume, and the same wandb run); `state` takes the wandb run id."""
    cfg, t = run.cfg, run.cfg.trainer
    info = run_info(OmegaConf.to_container(OmegaConf.structured(cfg)), run.sizes.as_dict()) | {
        "layout": run.layout_info,  # where every learner rank, engine and scorer started
        "data": run.data_report,  # prompts kept, and those dropped as too long (source, tokens)
    }
    Path(t.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(t.output_dir) / RUN_INFO_FILE).write_text(json.dumps(info, indent=1, default=str))
    logger = MetricsLogger(
        t.output_dir,
        total_steps=t.total_steps,
        wandb_mode=cfg.logger.wandb_mode,
        project=cfg.logger.project,
        run_name=cfg.logger.run_name or f"{cfg.algorithm.name}-seed{cfg.seed}",
        run_id=state.wandb_run_id,
        group=cfg.logger.group,
        job_type=cfg.logger.job_type or cfg.algorithm.name,
        config=info,
    )
    logger.truncate_after(state.step)
    state.wandb_run_id = logger.run_id
    return logger


def write_summary(run: Run, metrics: dict[str, float]) -> None:
    """summary.json: the last step's metrics; a run resumed at its last step trained nothing, and says so."""
    t = run.cfg.trainer
    if metrics:
        summary = {"steps": t.total_steps, "output_dir": t.output_dir, "final_metrics": metrics}
        (run.ckpt.root.parent / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    else:
        print(f"nothing to do: {t.output_dir} already holds all {t.total_steps} steps", flush=True)


def hold(path: str, step: int) -> None:
    """trainer.hold_at_step: write `<path>.reached`, then wait until `path` exists (tests and drills)."""
    Path(f"{path}.reached").write_text(str(step))
    print(f"hold: waiting before step {step} until {path} exists (trainer.hold_at_step)", flush=True)
    while not Path(path).exists():
        time.sleep(0.2)


def sweep_member(cfg: DictConfig) -> DictConfig:
    """In a sweep (`-m`), this member's output_dir is its own folder (hydra.sweep.dir/subdir); its wandb run is
    named after that folder and grouped by the sweep (unless logger.run_name / logger.group are set)."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return cfg
    if any(o.split("=", 1)[0].lstrip("+~") == "trainer.output_dir" for o in hydra_cfg.overrides.task):
        raise ConfigError(
            "trainer.output_dir: in a sweep (-m) every member writes to its own folder <hydra.sweep.dir>/<its "
            "swept values>; choose the sweep's folder with hydra.sweep.dir=DIR instead"
        )
    member_dir = hydra_cfg.runtime.output_dir
    cfg.trainer.output_dir = member_dir
    cfg.logger.run_name = cfg.logger.run_name or Path(member_dir).name
    cfg.logger.group = cfg.logger.group or Path(hydra_cfg.sweep.dir).name
    return cfg


register_configs()
register_resolver()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # a user's mistake: its message alone, no traceback; in a sweep, the next member still runs
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    with clean_exit(sweep_member=multirun, member=hydra_cfg.runtime.output_dir if multirun else ""):
        train(to_object(sweep_member(cfg)))


if __name__ == "__main__":
    main()
