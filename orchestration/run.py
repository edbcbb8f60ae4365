"""The run's assembly: from the validated config (TrainConf), start or join Ray, place the actor groups, and hold
them in a `Run` with the model, the prompt rows and the loop's helpers.

Each component gets typed, plain arguments: its frozen config from orchestration/config/components.py, never the
config tree; the model and the rows come from orchestration/inputs.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import ray

from advantage import SAMPLE_FILTERS
from advantage.group import AdvantageService
from advantage.stage import AdvantageStageConfig
from learner.group import LearnerGroup
from orchestration.checkpoint import CheckpointManager
from orchestration.cluster import stacks
from orchestration.cluster.cpus import place_this_process
from orchestration.cluster.env import LOCAL_DEFAULTS, apply_env
from orchestration.cluster.faults import Faults
from orchestration.cluster.fit import check_fit
from orchestration.cluster.layout import Layout, describe, record
from orchestration.cluster.preflight import check_shared, preflight
from orchestration.config.components import check_config, engine_kwargs, learner_config, sampling_config
from orchestration.config.schema import SMALL_ACTOR_CPUS, TrainConf
from orchestration.config.sizes import DerivedSizes
from orchestration.data.prompts import (
    PromptRow,
    PromptSampler,
)
from orchestration.inputs import drop_long_rows, load_prompt_rows, prepare_model
from orchestration.sampling import OverlongShaping, RoundSizer
from orchestration.weight_sync import BroadcastPush, push_weights
from reward.group import RewardService
from rollout.group import RolloutGroup
from rollout.types import SamplingConfig

log = logging.getLogger(__name__)

# Environment every Ray worker of a run inherits from the driver, besides cluster.env: the offline defaults
# (hub, wandb) where the user set them, but not Ray's own variables (auth mode and usage stats belong to the
# cluster, not to its workers).
WORKER_ENV = tuple(key for key in LOCAL_DEFAULTS if not key.startswith("RAY_"))


def ray_runtime_env(stack_dir: str | Path, run_env: dict[str, str]) -> dict:
    """The job's runtime env: the run's environment (`run_env`, from apply_env(cluster.env)) and the
    offline defaults the driver has, and the stack-dump hook (orchestration/cluster/stacks.py)."""
    env = {key: os.environ[key] for key in WORKER_ENV if key in os.environ} | run_env
    env[stacks.STACK_DIR_ENV] = str(Path(stack_dir).resolve())
    return {"env_vars": env, "worker_process_setup_hook": "orchestration.cluster.stacks.install"}


def init_ray(cfg: TrainConf, run_env: dict[str, str]) -> bool:
    """Start (cluster.address null) or join Ray; False when Ray was already initialised (by the caller)."""
    if ray.is_initialized():
        return False
    runtime_env = ray_runtime_env(stack_dir(cfg), run_env)
    if cfg.cluster.address is None:
        ray.init(
            address="local",
            num_cpus=cfg.cluster.num_cpus,
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=True,
        )
    else:
        ray.init(address=cfg.cluster.address, runtime_env=runtime_env)
    return True


def stack_dir(cfg: TrainConf) -> str:
    return str(Path(cfg.trainer.output_dir) / "stacks")


@dataclass
class Run:
    """Everything a training run holds. `shutdown()` releases the actors."""

    cfg: TrainConf
    sizes: DerivedSizes
    model_dir: str
    train_rows: list[PromptRow]
    val_rows: list[PromptRow]
    data_report: dict[str, Any]
    sampler: PromptSampler
    rollout: RolloutGroup
    reward: RewardService
    learner: LearnerGroup
    advantage: AdvantageService
    sample_filter: Any
    shaping: OverlongShaping | None
    ckpt: CheckpointManager
    uses_reference: bool
    faults: Faults
    round_sizer: RoundSizer | None = None
    """Adaptive generation rounds (algorithm.adaptive_gen_rounds); None: every round draws gen_batch_prompts."""
    pipeline: Any = None
    """The loop's RolloutPipeline (orchestration/pipeline.py), set by orchestration.train."""
    broadcast: BroadcastPush | None = None
    """The push of a transport the learner drives (rollout.weight_transfer gloo | nccl), with its handshake."""
    pushed_weights: list = field(default_factory=list)
    """With trainer.max_staleness 1: the object refs of the last pushed weight buckets (see recover_weights)."""
    layout: Layout | None = None
    """The run's placement groups (orchestration/cluster/layout.py)."""
    layout_info: dict = field(default_factory=dict)
    """Where every actor started (layout.record): printed at start-up and written to run_info.json."""
    owns_ray: bool = False
    """True when build_run started (or joined) Ray itself: shutdown() then disconnects, so that the next run
    of the same process (a sweep's next member) starts with its own runtime environment."""

    def sampling(self, seed: int, *, evaluation: bool = False) -> SamplingConfig:
        return sampling_config(self.cfg, seed, evaluation=evaluation)

    def push_weights(self, policy_version: int, ranks: list[int] | None = None) -> dict:
        """The learner's weights into every rollout engine (or the engines `ranks`), as `policy_version`, by
        rollout.weight_transfer. With trainer.max_staleness 1 (object_store only) the weights stay in the object
        store until the next push (`recover_weights`)."""
        bucket_bytes = int(self.cfg.learner.weight_bucket_mb * 2**20)
        if self.cfg.rollout.weight_transfer != "object_store":
            if self.broadcast is None or self.broadcast.bucket_bytes != bucket_bytes:
                self.broadcast = BroadcastPush(self.cfg.rollout.weight_transfer, bucket_bytes)
            return self.broadcast(self.learner, self.rollout, policy_version, ranks=ranks)
        keep = self.pushed_weights if self.cfg.trainer.max_staleness else None
        return push_weights(
            self.learner, self.rollout, policy_version, bucket_bytes=bucket_bytes, ranks=ranks, keep=keep
        )

    def recover_weights(self, ranks: list[int]) -> None:
        """Bring restarted engines `ranks` to the version the others hold. Synchronous runs push the learner's
        weights again (the learner holds that version while the engines generate); with trainer.max_staleness 1
        the engines generate while the learner moves on, so the last pushed buckets are sent again instead (and
        the learner, busy in the loop's thread, is never called from the rollout thread)."""
        if self.pushed_weights:
            self.rollout.update_weights(self.pushed_weights, self.rollout.policy_version, ranks=ranks)
        else:
            self.push_weights(self.rollout.policy_version, ranks)

    def replace_learner(self) -> None:
        """Kill the learner group's ranks (also those stuck in a collective) and start a new group with the
        same config (the model's initial weights: restore a checkpoint into it)."""
        self.learner.shutdown()
        self.learner = build_learner(self.cfg, self.sizes, self.model_dir, self.layout)
        self.faults.attach("learner", self.learner)

    @property
    def data_metrics(self) -> dict[str, int]:
        """The dataset's counts logged with every step: prompts dropped as longer than data.max_prompt_tokens."""
        return {
            "data/dropped_long_train_prompts": len(self.data_report["dropped_long_train_prompts"]),
            "data/dropped_long_val_prompts": len(self.data_report["dropped_long_val_prompts"]),
        }

    def shutdown(self) -> None:
        for part in (self.rollout, self.reward, self.learner, self.advantage):
            try:
                part.shutdown()
            except Exception as err:  # shutting down after a failure must not hide the failure
                log.warning("shutdown of %s failed: %s", type(part).__name__, err)
        if self.layout is not None:
            self.layout.remove()
        if self.owns_ray:
            ray.shutdown()


def build_learner(cfg: TrainConf, sizes: DerivedSizes, model_dir: str, layout: Layout) -> LearnerGroup:
    """The learner group (learner.*), its ranks loading `model_dir`, each in its bundle of the layout: at the
    start, and after a lost rank."""
    return LearnerGroup(
        learner_config(cfg, sizes, model_dir),
        cfg.learner.world_size,
        num_cpus_per_rank=cfg.learner.num_cpus_per_rank,
        num_gpus_per_rank=cfg.learner.num_gpus_per_rank,
        call_timeout_s=cfg.learner.timeout_s,
        process_setup=placement_setup(cpus=None, nice=cfg.cluster.learner_nice),
        placement=layout.learner,
    )


def placement_setup(cpus: list[int] | None, nice: int | None) -> Callable[[], dict] | None:
    """What a worker process runs first to sit where cluster.rollout_cpus (positions, resolved on the
    worker's machine) and cluster.learner_nice say; None when there is nothing to do."""
    if cpus is None and nice is None:
        return None
    return partial(place_this_process, cpus=None if cpus is None else list(cpus), nice=nice)


@dataclass
class Groups:
    """The run's actor groups, each in its bundles of `layout`, and where every actor started (layout.record)."""

    layout: Layout
    rollout: RolloutGroup
    reward: RewardService
    learner: LearnerGroup
    advantage: AdvantageService
    layout_info: dict


def start_groups(cfg: TrainConf, sizes: DerivedSizes, model_dir: str) -> Groups:
    """Place every bundle (bounded wait), check that the model and the output folder are where the actors will
    run, then start every actor at once: the scorers and the advantage actor in the background, the rollout
    engines and the learner ranks each in a thread that waits for its group (vLLM's start and the learner's load
    overlap). On any failure whatever was started is shut down and the placement groups removed before the
    error propagates."""
    parts: list[Any] = []
    layout = None
    try:
        layout = Layout(cfg)  # every bundle placed (bounded), before any actor starts
        model_key = "model.path" if cfg.model.path else "model.tiny_dir / model.warm_start_dir"
        check_shared(model_dir, model_key, layout.nodes(), write=False)
        check_shared(cfg.trainer.output_dir, "trainer.output_dir", layout.nodes(engines=False), write=True)
        r = cfg.rollout
        start_rollout = partial(
            RolloutGroup,
            model_dir,
            r.num_workers,
            engine=r.engine,
            engine_kwargs=engine_kwargs(cfg),
            num_cpus_per_worker=r.num_cpus_per_worker,
            num_gpus_per_worker=r.num_gpus_per_worker,
            timeout_s=r.timeout_s,
            max_restarts=cfg.trainer.max_restarts,
            process_setup=placement_setup(cpus=cfg.cluster.rollout_cpus, nice=None),
            placement=layout.engine,
        )
        # the scorers and the advantage actor start in the background (their constructors do not wait)
        reward = RewardService(
            cfg.reward.num_workers,
            cfg.reward.fn,
            timeout_s=cfg.reward.timeout_s,
            num_cpus_per_worker=SMALL_ACTOR_CPUS,
            max_restarts=cfg.trainer.max_restarts,
            placement=layout.scorer,
        )
        parts.append(reward)
        advantage = AdvantageService(
            cfg.algorithm.advantage_estimator,
            AdvantageStageConfig(norm_by_std=True, rollout_is_cap=cfg.algorithm.rollout_is_cap),
            num_cpus=SMALL_ACTOR_CPUS,
            max_restarts=cfg.trainer.max_restarts,
            placement=layout.advantage,
        )
        parts.append(advantage)
        rollout, learner = start_together(start_rollout, partial(build_learner, cfg, sizes, model_dir, layout))
        parts += [rollout, learner]
        layout_info = record(cfg.cluster.layout, rollout, learner, reward, advantage, cfg.cluster.placement_timeout_s)
    except BaseException:
        for part in parts:
            part.shutdown()
        if layout is not None:
            layout.remove()
        raise
    return Groups(layout, rollout, reward, learner, advantage, layout_info)


def start_together(*starts: Callable[[], Any]) -> list[Any]:
    """Call the zero-argument `starts` at once, one thread each (each blocks in `ray.get` while its actors
    start), and return their results in order. When any raises, the ones that started are shut down and the
    first error (in the order of `starts`) propagates."""
    with ThreadPoolExecutor(max_workers=len(starts), thread_name_prefix="start") as pool:
        futures = [pool.submit(start) for start in starts]
        wait(futures)
    errors = [future.exception() for future in futures if future.exception() is not None]
    if errors:
        for future in futures:
            if future.exception() is None:
                future.result().shutdown()
        raise errors[0]
    return [future.result() for future in futures]


def build_run(cfg: TrainConf) -> Run:
    """Check the config and the machine, set the run's environment, prepare model and data, start Ray and the
    actor groups (with the fault handling of orchestration/cluster/faults.py attached)."""
    sizes = check_config(cfg)
    if cfg.cluster.check_fit and cfg.learner.num_gpus_per_rank > 0:  # GPU memory, before any actor exists
        print(check_fit(cfg).render(), flush=True)
    preflight(cfg)
    train_rows, val_rows = load_prompt_rows(cfg)
    run_env = apply_env(cfg.cluster.env)
    model_dir = prepare_model(cfg)
    from transformers import AutoTokenizer  # heavy: transformers

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_rows, val_rows, data_report = drop_long_rows(cfg, tokenizer, train_rows, val_rows)
    owns_ray = init_ray(cfg, run_env)
    try:
        groups = start_groups(cfg, sizes, model_dir)
    except BaseException:
        if owns_ray:
            ray.shutdown()
        raise
    a, r = cfg.algorithm, cfg.rollout
    run = Run(
        cfg=cfg,
        sizes=sizes,
        model_dir=model_dir,
        train_rows=train_rows,
        val_rows=val_rows,
        data_report=data_report,
        sampler=PromptSampler(len(train_rows), cfg.seed, cfg.data.shuffle),
        rollout=groups.rollout,
        reward=groups.reward,
        learner=groups.learner,
        advantage=groups.advantage,
        sample_filter=SAMPLE_FILTERS.get("correctness_varies") if a.filter_groups else None,
        shaping=OverlongShaping(r.max_response_tokens, a.overlong_buffer_tokens, a.overlong_penalty_factor)
        if a.overlong_buffer_tokens > 0
        else None,
        ckpt=CheckpointManager(cfg.trainer.output_dir, cfg.trainer.keep_checkpoints),
        uses_reference=groups.learner.config.uses_reference,
        round_sizer=RoundSizer(a.gen_batch_prompts, a.gen_round_margin)
        if a.adaptive_gen_rounds and a.filter_groups
        else None,
        faults=Faults(cfg.trainer.fault_specs, cfg.trainer.max_restarts),
        layout=groups.layout,
        layout_info=groups.layout_info,
        owns_ray=owns_ray,
    )
    print(describe(groups.layout_info), flush=True)
    for kind in ("rollout", "learner", "reward", "advantage"):
        run.faults.attach(kind, getattr(run, kind))
    # a restarted engine gets the learner's current weights (the learner of the moment: it may be replaced)
    run.rollout.recover_weights = run.recover_weights
    return run
