"""Builders: the validated config (TrainConf) → the objects of a run. The only place config meets components.

Each component gets typed, plain arguments (frozen configs of its own), never the config tree.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import ray

from advantage import POLICY_LOSSES, SAMPLE_FILTERS
from advantage.group import AdvantageService
from advantage.stage import AdvantageStageConfig
from learner.config import LearnerConfig, LRScheduleConfig, OptimizerConfig
from learner.group import LearnerGroup
from orchestration import stacks
from orchestration.checkpoint import CheckpointManager
from orchestration.config import SMALL_ACTOR_CPUS, TrainConf
from orchestration.data import (
    DataError,
    PromptRow,
    PromptSampler,
    drop_long_prompts,
    find_duplicates,
    load_datasets,
    load_rows,
)
from orchestration.env import LOCAL_DEFAULTS, apply_env
from orchestration.faults import Faults, FaultSpec
from orchestration.layout import Layout, describe, record
from orchestration.placement import place_this_process
from orchestration.preflight import check_shared, preflight
from orchestration.sampling import OverlongShaping, RoundSizer
from orchestration.sizes import ConfigError, DerivedSizes, derive_sizes
from orchestration.tasks import make_rows, write_jsonl
from orchestration.weight_sync import push_weights
from reward.group import RewardService
from reward.loader import load_reward_fn
from rollout.group import RolloutGroup
from rollout.types import SamplingConfig

log = logging.getLogger(__name__)

# Environment every Ray worker of a run inherits from the driver, besides cluster.env: the offline defaults
# (hub, wandb) where the user set them, but not Ray's own variables (auth mode and usage stats belong to the
# cluster, not to its workers).
WORKER_ENV = tuple(key for key in LOCAL_DEFAULTS if not key.startswith("RAY_"))


def sizes_from_config(cfg: TrainConf) -> DerivedSizes:
    a = cfg.algorithm
    return derive_sizes(
        policy_loss=a.policy_loss,
        group_size=a.group_size,
        train_batch_prompts=a.train_batch_prompts,
        gen_batch_prompts=a.gen_batch_prompts,
        mini_batch_prompts=a.mini_batch_prompts,
        learner_world_size=cfg.learner.world_size,
        micro_batch_tokens=cfg.learner.micro_batch_tokens,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
        max_response_tokens=cfg.rollout.max_response_tokens,
        rollout_workers=cfg.rollout.num_workers,
        filter_groups=a.filter_groups,
    )


def policy_loss_config(cfg: TrainConf) -> Any:
    """The registered loss's own config, with every field the algorithm section sets."""
    loss = POLICY_LOSSES.get(cfg.algorithm.policy_loss)
    names = {f.name for f in dataclasses.fields(loss.default_config)}
    values = {name: getattr(cfg.algorithm, name) for name in names if hasattr(cfg.algorithm, name)}
    return loss.make_config(**values)


def learner_config(cfg: TrainConf, sizes: DerivedSizes, model_dir: str) -> LearnerConfig:
    ln = cfg.learner
    total_optimizer_steps = cfg.trainer.total_steps * sizes.mini_batches_per_step
    return LearnerConfig(
        model_dir=model_dir,
        mini_batch_samples=sizes.mini_batch_samples,
        micro_batch_tokens=ln.micro_batch_tokens,
        policy_loss=cfg.algorithm.policy_loss,
        policy_loss_config=policy_loss_config(cfg),
        optimizer=OptimizerConfig(
            lr=ln.lr,
            betas=tuple(ln.betas),
            weight_decay=ln.weight_decay,
            grad_clip=ln.grad_clip if ln.grad_clip > 0 else None,
        ),
        lr_schedule=LRScheduleConfig(
            warmup_steps=ln.warmup_steps,
            kind=ln.lr_schedule,
            total_steps=total_optimizer_steps if ln.lr_schedule == "cosine" else None,
            min_lr_ratio=ln.min_lr_ratio,
        ),
        param_dtype=ln.param_dtype,
        seed=cfg.seed,
        collective_timeout_s=min(ln.timeout_s, 600.0),
        packing=ln.packing,
        share_prompts=ln.share_prompts,
        activation_checkpointing=ln.activation_checkpointing,
        logprob_chunk_tokens=ln.logprob_chunk_tokens,
    )


def prepare_model(cfg: TrainConf) -> str:
    """The policy's HF directory: the configured path, or the tiny model built (once) from the config; then,
    when model.warm_start_steps > 0, the supervised warm-start of it (trained once, cached by a hash)."""
    m = cfg.model
    init_seed = cfg.seed if m.init_seed is None else m.init_seed
    if m.path:
        path = m.path
        if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ConfigError(
                f"model.path: {path!r} is not a local directory and the hub is offline (HF_HUB_OFFLINE=1): "
                "download the model first and point model.path at it"
            )
    else:
        from rollout.tiny import build_tiny_model

        path = build_tiny_model(
            m.tiny_dir,
            hidden_size=m.tiny_hidden_size,
            num_hidden_layers=m.tiny_layers,
            num_attention_heads=m.tiny_heads,
            num_key_value_heads=m.tiny_kv_heads,
            intermediate_size=m.tiny_intermediate_size,
            max_position_embeddings=max(2048, cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens),
            seed=init_seed,
        )
    if m.warm_start_steps > 0:
        from orchestration.warm_start import WarmStartConfig, warm_start, with_shortcuts

        examples = with_shortcuts(warm_start_examples(cfg), m.warm_start_shortcut_frac, init_seed)
        recipe = WarmStartConfig(
            steps=m.warm_start_steps,
            lr=m.warm_start_lr,
            batch_rows=m.warm_start_batch_prompts,
            warmup_steps=m.warm_start_warmup_steps,
            seed=init_seed,
            num_threads=m.warm_start_threads,
        )
        path = warm_start(path, examples, recipe, m.warm_start_dir)
    return str(path)


def synthetic_rows(cfg: TrainConf) -> tuple[list[dict], list[dict]]:
    """The built-in task's (train, val) rows in the verl schema, as data.synthetic_* and the seed define them."""
    d = cfg.data
    return make_rows(
        d.synthetic_train_prompts,
        d.synthetic_val_prompts,
        seed=cfg.seed if d.synthetic_seed is None else d.synthetic_seed,
        min_steps=d.synthetic_min_steps,
        max_steps=d.synthetic_max_steps,
        max_value=d.synthetic_max_value,
        task=d.synthetic_task,
        habit_mix=d.synthetic_habit_mix,
    )


def warm_start_examples(cfg: TrainConf) -> list[tuple[list[dict], str]]:
    """(prompt messages, worked solution) of every training row; a row without `extra_info.solution` is an
    error (the warm-start needs one for every row)."""
    if cfg.data.train_files:
        rows = [(list(r.messages), r.extra.get("solution"), r.source) for r in load_datasets(cfg.data.train_files)]
    else:
        rows = [(r["prompt"], r["extra_info"]["solution"], "synthetic") for r in synthetic_rows(cfg)[0]]
    missing = [source for _, solution, source in rows if not isinstance(solution, str)]
    if missing:
        raise ValueError(
            f"model.warm_start_steps > 0 needs extra_info.solution in every training row; {len(missing)} rows lack "
            f"it (first: {missing[0]}). Set model.warm_start_steps=0 for this dataset."
        )
    return [(messages, solution) for messages, solution, _ in rows]


def _load_files(key: str, paths: list[str]) -> list[PromptRow]:
    """Rows of the files under config key `key`: a missing file or a directory is a ConfigError naming the key
    and the path, a bad file (an empty one included) a DataError naming the key, the file and the row."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise ConfigError(f"{key}: file(s) not found: {missing} (relative paths are from {Path.cwd()})")
    folders = [p for p in paths if Path(p).is_dir()]
    if folders:
        raise ConfigError(f"{key}: {folders} is a directory, not a file: list the .jsonl / .parquet files in it")
    rows = []
    for path in paths:
        try:
            rows += load_rows(path)
        except DataError as err:
            raise DataError(f"{key}: {err}") from err
    return rows


def report_duplicates(name: str, rows: list[PromptRow]) -> list[tuple[str, str]]:
    """Print how many of `rows` repeat an earlier row's prompt and ground truth (they stay in the dataset, so a
    repeated problem is drawn as often as its copies), naming the first few; returns `find_duplicates(rows)`."""
    duplicates = find_duplicates(rows)
    if duplicates:
        shown = ", ".join(f"{source} (= {first})" for source, first in duplicates[:3])
        more = f" and {len(duplicates) - 3} more" if len(duplicates) > 3 else ""
        print(f"data: {len(duplicates)} {name} row(s) repeat an earlier row's prompt and ground truth (kept, so "
              f"drawn as often as their copies): {shown}{more}", flush=True)  # fmt: skip
    return duplicates


def load_prompt_rows(cfg: TrainConf) -> tuple[list[PromptRow], list[PromptRow]]:
    """Train and validation rows: the files parsed and checked (DataError naming file and row), or the synthetic
    task written under output_dir. Needs no model: bad data fails before the model is built or warm-started.
    Duplicate rows are printed (and kept); with data files but no data.val_files, a line says that there is no
    evaluation."""
    d, t = cfg.data, cfg.trainer
    if d.train_files:
        train, val = _load_files("data.train_files", d.train_files), _load_files("data.val_files", d.val_files)
        report_duplicates("train", train)
        report_duplicates("validation", val)
        if not val and (t.eval_every or t.eval_before_train):
            print("data: no data.val_files, so no evaluation (trainer.eval_every / trainer.eval_before_train have "
                  "nothing to evaluate)", flush=True)  # fmt: skip
        return train, val
    train_rows, val_rows = synthetic_rows(cfg)
    data_dir = Path(cfg.trainer.output_dir) / "data"
    train = load_rows(write_jsonl(train_rows, data_dir / "synthetic_train.jsonl"))
    return train, load_rows(write_jsonl(val_rows, data_dir / "synthetic_val.jsonl"))


def drop_long_rows(
    cfg: TrainConf, tokenizer: Any, train: list[PromptRow], val: list[PromptRow]
) -> tuple[list[PromptRow], list[PromptRow], dict[str, Any]]:
    """The rows whose rendered prompt fits data.max_prompt_tokens, and a report of the dropped ones: their counts
    (logged with every step's metrics as data/dropped_long_*_prompts) and sources (run_info.json), printed."""
    limit = cfg.data.max_prompt_tokens
    train, dropped_train = drop_long_prompts(train, tokenizer, limit)
    val, dropped_val = drop_long_prompts(val, tokenizer, limit)
    for name, dropped in (("train", dropped_train), ("validation", dropped_val)):
        if dropped:
            shown = ", ".join(f"{source} ({n} tokens)" for source, n in dropped[:5])
            more = f" and {len(dropped) - 5} more (run_info.json lists them)" if len(dropped) > 5 else ""
            print(f"data: dropped {len(dropped)} {name} prompt(s) longer than data.max_prompt_tokens={limit}: "
                  f"{shown}{more}", flush=True)  # fmt: skip
    report = {
        "train_prompts": len(train),
        "val_prompts": len(val),
        "dropped_long_train_prompts": [f"{source} ({n} tokens)" for source, n in dropped_train],
        "dropped_long_val_prompts": [f"{source} ({n} tokens)" for source, n in dropped_val],
    }
    return train, val, report


def ray_runtime_env(stack_dir: str | Path, run_env: dict[str, str]) -> dict:
    """The job's runtime env: the run's environment (`run_env`, from apply_env(cluster.env)) and the
    offline defaults the driver has, and the stack-dump hook (orchestration/stacks.py)."""
    env = {key: os.environ[key] for key in WORKER_ENV if key in os.environ} | run_env
    env[stacks.STACK_DIR_ENV] = str(Path(stack_dir).resolve())
    return {"env_vars": env, "worker_process_setup_hook": "orchestration.stacks.install"}


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
    pushed_weights: list = field(default_factory=list)
    """With trainer.max_staleness 1: the object refs of the last pushed weight buckets (see recover_weights)."""
    layout: Layout | None = None
    """The run's placement groups (orchestration/layout.py)."""
    layout_info: dict = field(default_factory=dict)
    """Where every actor started (layout.record): printed at start-up and written to run_info.json."""
    owns_ray: bool = False
    """True when build_run started (or joined) Ray itself: shutdown() then disconnects, so that the next run
    of the same process (a sweep's next member) starts with its own runtime environment."""

    def sampling(self, seed: int, *, evaluation: bool = False) -> SamplingConfig:
        return sampling_config(self.cfg, seed, evaluation=evaluation)

    def push_weights(self, policy_version: int, ranks: list[int] | None = None) -> dict:
        """The learner's weights into every rollout engine (or the engines `ranks`), as `policy_version`. With
        trainer.max_staleness 1 the weights stay in the object store until the next push (`recover_weights`)."""
        bucket_bytes = int(self.cfg.learner.weight_bucket_mb * 2**20)
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


def sampling_config(cfg: TrainConf, seed: int, *, evaluation: bool = False) -> SamplingConfig:
    """Training rollouts' sampling (rollout.*, algorithm.group_size) or the evaluation's (trainer.eval_*)."""
    r, t = cfg.rollout, cfg.trainer
    return SamplingConfig(
        temperature=t.eval_temperature if evaluation else r.temperature,
        top_p=t.eval_top_p if evaluation else r.top_p,
        top_k=0 if evaluation else r.top_k,
        max_tokens=r.max_response_tokens,
        n=t.eval_samples if evaluation else cfg.algorithm.group_size,
        seed=seed,
    )


def check_config(cfg: TrainConf) -> DerivedSizes:
    """Build every component config that needs no model, Ray or data, so that a bad value fails in a second,
    before the model build, the warm-start or Ray, with the config section named; returns the derived sizes.
    (Single keys are checked by the schema's __post_init__, sizes by derive_sizes.)"""
    sizes = sizes_from_config(cfg)
    checks = (
        ("algorithm / learner", lambda: learner_config(cfg, sizes, cfg.model.path or cfg.model.tiny_dir)),
        ("rollout / algorithm.group_size", lambda: sampling_config(cfg, cfg.seed)),
        ("trainer.eval_*", lambda: sampling_config(cfg, cfg.seed, evaluation=True)),
        ("reward.fn", lambda: load_reward_fn(cfg.reward.fn)),
    )
    for keys, build in checks:
        try:
            build()
        except (ValueError, TypeError, KeyError) as err:
            raise ConfigError(f"{keys}: {err}") from err
    return sizes


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


def build_run(cfg: TrainConf) -> Run:
    """Check the config and the machine, set the run's environment, prepare model and data, start Ray and the
    actor groups (with the fault handling of orchestration/faults.py attached)."""
    sizes = check_config(cfg)
    if cfg.cluster.check_fit and cfg.learner.num_gpus_per_rank > 0:  # GPU memory, before any actor exists
        from orchestration.plan import check_fit

        print(check_fit(cfg).render(), flush=True)
    preflight(cfg)
    train_rows, val_rows = load_prompt_rows(cfg)
    run_env = apply_env(cfg.cluster.env)
    model_dir = prepare_model(cfg)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_rows, val_rows, data_report = drop_long_rows(cfg, tokenizer, train_rows, val_rows)
    owns_ray = init_ray(cfg, run_env)
    r = cfg.rollout
    engine_kwargs: dict[str, Any] = {
        "dtype": r.dtype,
        "max_model_len": cfg.data.max_prompt_tokens + r.max_response_tokens,
        "seed": cfg.seed,
    }
    if r.engine != "hf":
        engine_kwargs["tensor_parallel_size"] = r.tensor_parallel_size
        if r.num_gpus_per_worker > 0:
            engine_kwargs["engine_kwargs"] = {"gpu_memory_utilization": r.gpu_memory_utilization}
        if r.tensor_parallel_size > 1:  # vLLM's own processes on the engine's GPUs; inside a placement group it
            # would otherwise start Ray workers of its own, which the engine's bundle has no GPUs left for
            engine_kwargs.setdefault("engine_kwargs", {})["distributed_executor_backend"] = "mp"
    elif r.dtype == "auto":
        engine_kwargs["dtype"] = "float32"
    parts: list[Any] = []
    layout = None
    try:
        layout = Layout(cfg)  # every bundle placed (bounded), before any actor starts
        model_key = "model.path" if cfg.model.path else "model.tiny_dir / model.warm_start_dir"
        check_shared(model_dir, model_key, layout.nodes(), write=False)
        check_shared(cfg.trainer.output_dir, "trainer.output_dir", layout.nodes(engines=False), write=True)
        rollout = RolloutGroup(
            model_dir,
            r.num_workers,
            engine=r.engine,
            engine_kwargs=engine_kwargs,
            num_cpus_per_worker=r.num_cpus_per_worker,
            num_gpus_per_worker=r.num_gpus_per_worker,
            timeout_s=r.timeout_s,
            max_restarts=cfg.trainer.max_restarts,
            process_setup=placement_setup(cpus=cfg.cluster.rollout_cpus, nice=None),
            placement=layout.engine,
        )
        parts.append(rollout)
        reward = RewardService(
            cfg.reward.num_workers,
            cfg.reward.fn,
            timeout_s=cfg.reward.timeout_s,
            num_cpus_per_worker=SMALL_ACTOR_CPUS,
            max_restarts=cfg.trainer.max_restarts,
            placement=layout.scorer,
        )
        parts.append(reward)
        learner = build_learner(cfg, sizes, model_dir, layout)
        parts.append(learner)
        advantage = AdvantageService(
            cfg.algorithm.advantage_estimator,
            AdvantageStageConfig(norm_by_std=True, rollout_is_cap=cfg.algorithm.rollout_is_cap),
            num_cpus=SMALL_ACTOR_CPUS,
            max_restarts=cfg.trainer.max_restarts,
            placement=layout.advantage,
        )
        parts.append(advantage)
        layout_info = record(cfg.cluster.layout, rollout, learner, reward, advantage, cfg.cluster.placement_timeout_s)
    except BaseException:
        for part in parts:
            part.shutdown()
        if layout is not None:
            layout.remove()
        if owns_ray:
            ray.shutdown()
        raise
    a = cfg.algorithm
    run = Run(
        cfg=cfg,
        sizes=sizes,
        model_dir=model_dir,
        train_rows=train_rows,
        val_rows=val_rows,
        data_report=data_report,
        sampler=PromptSampler(len(train_rows), cfg.seed, cfg.data.shuffle),
        rollout=rollout,
        reward=reward,
        learner=learner,
        advantage=advantage,
        sample_filter=SAMPLE_FILTERS.get("correctness_varies") if a.filter_groups else None,
        shaping=OverlongShaping(r.max_response_tokens, a.overlong_buffer_tokens, a.overlong_penalty_factor)
        if a.overlong_buffer_tokens > 0
        else None,
        ckpt=CheckpointManager(cfg.trainer.output_dir, cfg.trainer.keep_checkpoints),
        uses_reference=learner.config.uses_reference,
        round_sizer=RoundSizer(a.gen_batch_prompts, a.gen_round_margin)
        if a.adaptive_gen_rounds and a.filter_groups
        else None,
        faults=Faults([FaultSpec.parse(text) for text in cfg.trainer.fault_inject], cfg.trainer.max_restarts),
        layout=layout,
        layout_info=layout_info,
        owns_ray=owns_ray,
    )
    print(describe(layout_info), flush=True)
    for kind, group in (("rollout", rollout), ("learner", learner), ("reward", reward), ("advantage", advantage)):
        run.faults.attach(kind, group)
    # a restarted engine gets the learner's current weights (the learner of the moment: it may be replaced)
    rollout.recover_weights = run.recover_weights
    return run
