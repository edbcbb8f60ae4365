"""The validated config (TrainConf) → the plain, typed configs of the components: the one place a config
section becomes a component's arguments. Pure: no model, data, Ray or process is touched.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from advantage import POLICY_LOSSES
from learner.config import LearnerConfig, LRScheduleConfig, OptimizerConfig
from orchestration.config.errors import ConfigError
from orchestration.config.schema import TrainConf
from orchestration.config.sizes import DerivedSizes, derive_sizes
from reward.loader import load_reward_fn
from rollout.types import SamplingConfig


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


def init_seed(cfg: TrainConf) -> int:
    """The seed of the model's initial weights and of its warm-start: model.init_seed, else the run's seed."""
    return cfg.seed if cfg.model.init_seed is None else cfg.model.init_seed


def tiny_model_args(cfg: TrainConf) -> dict[str, int]:
    """rollout.tiny.build_tiny_model's keyword arguments for the tiny model (model.path null) model.tiny_* sets."""
    m = cfg.model
    return {
        "hidden_size": m.tiny_hidden_size,
        "num_hidden_layers": m.tiny_layers,
        "num_attention_heads": m.tiny_heads,
        "num_key_value_heads": m.tiny_kv_heads,
        "intermediate_size": m.tiny_intermediate_size,
        "max_position_embeddings": max(2048, cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens),
        "seed": init_seed(cfg),
    }


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


def engine_kwargs(cfg: TrainConf) -> dict[str, Any]:
    """The rollout engines' keyword arguments (rollout.*): dtype, context (data.max_prompt_tokens +
    rollout.max_response_tokens), seed, and for vLLM the tensor parallelism and GPU memory share."""
    r = cfg.rollout
    kwargs: dict[str, Any] = {
        "dtype": r.dtype,
        "max_model_len": cfg.data.max_prompt_tokens + r.max_response_tokens,
        "seed": cfg.seed,
    }
    if r.engine != "hf":
        kwargs["tensor_parallel_size"] = r.tensor_parallel_size
        if r.num_gpus_per_worker > 0:
            kwargs["engine_kwargs"] = {"gpu_memory_utilization": r.gpu_memory_utilization}
        if r.weight_transfer == "nccl":  # vLLM's own transport on the engines (the others are ours, one backend)
            kwargs.setdefault("engine_kwargs", {})["weight_transfer_config"] = {"backend": "nccl"}
        if r.tensor_parallel_size > 1:  # vLLM's own processes on the engine's GPUs; inside a placement group it
            # would otherwise start Ray workers of its own, which the engine's bundle has no GPUs left for
            kwargs.setdefault("engine_kwargs", {})["distributed_executor_backend"] = "mp"
    elif r.dtype == "auto":
        kwargs["dtype"] = "float32"
    return kwargs
