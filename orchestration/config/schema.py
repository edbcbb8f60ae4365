"""The trainer's configuration schema: Hydra structured configs, one docstring per key with its unit.

Naming: `*Conf` classes are Hydra nodes (what a user sets on the command line, e.g. `algorithm.group_size=8`);
orchestration/config/components.py turns them into the components' own frozen configs. Defaults here are
the official FIPO 32B recipe (FIPO_SPEC §5.1) where one exists; `conf/` YAML files only override values, and
struct mode rejects unknown keys (a typo is an error, never a silently ignored `+key=`).
Validation of single values happens in `__post_init__`, which runs when `to_object` turns the composed
config into these dataclasses; checks across sections live in `validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from orchestration.config.errors import ConfigError
from orchestration.config.faults import FaultSpec
from orchestration.config.gpus import GPU_MEMORY_GIB
from orchestration.data.tasks import TASKS, check_habit_mix


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


SMALL_ACTOR_CPUS = 0.25
"""Ray CPUs of each reward scorer and of the advantage actor (their bundles: orchestration/cluster/layout.py)."""


def _positive(value: float, key: str) -> None:
    _check(value > 0, key, f"must be > 0, got {value}")


def _non_negative(value: float, key: str) -> None:
    _check(value >= 0, key, f"must be >= 0, got {value}")


def _one_of(value: Any, choices: Any, key: str) -> None:
    _check(value in tuple(choices), key, f"must be one of {list(choices)}, got {value!r}")


@dataclass
class AlgorithmConf:
    """FIPO / DAPO / GRPO: the loss, the advantage estimator, batch sizes and dynamic sampling."""

    name: str = "fipo"
    """A label for logs and run names."""
    policy_loss: str = "fipo"
    """Registry name in advantage.POLICY_LOSSES: fipo | dapo | grpo."""
    advantage_estimator: str = "grpo"
    """Registry name in advantage.ADVANTAGE_ESTIMATORS: grpo (std-normalised) | drgrpo (mean only)."""
    group_size: int = 16
    """Responses sampled per prompt (G; `rollout.n` in verl)."""
    train_batch_prompts: int = 512
    """Prompts (groups) per training step, after dynamic sampling."""
    gen_batch_prompts: int = 2048
    """Prompts per generation round (dynamic sampling generates rounds until train_batch_prompts are kept); with
    adaptive_gen_rounds, the size of the run's first round and the largest any round may be. Unused without
    dynamic sampling (filter_groups false): a step then generates exactly train_batch_prompts prompts."""
    adaptive_gen_rounds: bool = False
    """Size each generation round from dynamic sampling's running keep-rate (missing groups / keep-rate ×
    gen_round_margin; orchestration.sampling.RoundSizer) instead of always gen_batch_prompts (DAPO's recipe,
    which generates up to 2× what it keeps when most groups carry signal). Only with filter_groups."""
    gen_round_margin: float = 1.25
    """Adaptive rounds: safety factor over the expected need (>= 1; more = fewer extra rounds, more surplus)."""
    mini_batch_prompts: int = 64
    """Prompts per optimizer step (`ppo_mini_batch_size`); train_batch_prompts / this = optimizer steps per
    training step. FIPO needs at least 2 (on the first, π_θ = π_old and FIPO equals DAPO)."""
    filter_groups: bool = True
    """DAPO dynamic sampling: keep only groups whose correctness varies (not all right, not all wrong)."""
    max_gen_rounds: int = 10
    """Most generation rounds per step when filter_groups is on; running out is an error, not a silent skip."""
    overlong_buffer_tokens: int = 4096
    """Length of DAPO's soft overlong penalty ramp, tokens (penalty starts at max_response_tokens − this);
    0 disables overlong shaping."""
    overlong_penalty_factor: float = 1.0
    """Penalty at max_response_tokens (reward units)."""
    clip_low: float = 0.2
    """PPO ε_low: the ratio is clipped below at 1 − clip_low."""
    clip_high: float = 0.28
    """PPO ε_high (DAPO clip-higher): the ratio is clipped above at 1 + clip_high."""
    clip_c: float | None = 10.0
    """Dual-clip bound c (also FIPO's participation filter: tokens with ratio > c leave the future-KL).
    null disables dual-clip (GRPO; not allowed for FIPO)."""
    loss_agg_mode: str = "token-mean"
    """token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm."""
    kl_coef: float = 0.0
    """β of the KL-to-reference loss term (GRPO: 0.001); 0 = no reference model."""
    kl_estimator: str = "low_var_kl"
    """k1 | k2 | k3 | low_var_kl (= k3)."""
    decay_rate: float = 32.0
    """FIPO τ: half-life of the future-KL discount, tokens (γ = 2^(−1/τ))."""
    weight_clip: float = 0.2
    """FIPO ε_f: influence weights are clipped to [1 − ε_f, 1 + ε_f] (or [1, 1 + ε_f]); 0 = cap at 10."""
    weight_clip_high_only: bool = True
    """FIPO: clip weights to [1, 1 + ε_f] (32B recipe) instead of [1 − ε_f, 1 + ε_f] (7B recipe)."""
    safety_threshold: float = 10.0
    """FIPO: tokens with negative advantage and ratio above this get their weight clamped to [0.8, 1.0]."""
    drop_seq_on_dual_clip: bool = True
    """FIPO (official code): drop a sequence with ≥ 2 dual-clipped negative-advantage tokens from the loss."""
    rollout_is_cap: float | None = None
    """Truncated importance sampling of the behaviour gap (verl's rollout correction): each token's advantage ×
    min(π_old / π_rollout, this); null = off (the official recipes). Worth turning on with stale rollouts."""

    def __post_init__(self) -> None:
        from advantage import ADVANTAGE_ESTIMATORS, POLICY_LOSSES  # heavy: torch (the schema loads without it)
        from advantage.losses import LOSS_AGG_MODES  # heavy: torch

        _one_of(self.policy_loss, POLICY_LOSSES.names(), "algorithm.policy_loss")
        _one_of(self.advantage_estimator, ADVANTAGE_ESTIMATORS.names(), "algorithm.advantage_estimator")
        for key in ("group_size", "train_batch_prompts", "gen_batch_prompts", "mini_batch_prompts", "max_gen_rounds"):
            _positive(getattr(self, key), f"algorithm.{key}")
        _check(self.gen_round_margin >= 1, "algorithm.gen_round_margin", f"must be >= 1, got {self.gen_round_margin}")
        _check(self.overlong_buffer_tokens >= 0, "algorithm.overlong_buffer_tokens", "must be >= 0")
        _check(self.overlong_penalty_factor >= 0, "algorithm.overlong_penalty_factor", "must be >= 0")
        _check(0 <= self.clip_low < 1, "algorithm.clip_low", f"must be in [0, 1), got {self.clip_low}")
        _check(self.clip_high >= 0, "algorithm.clip_high", f"must be >= 0, got {self.clip_high}")
        _check(self.clip_c is None or self.clip_c > 1, "algorithm.clip_c", f"must be > 1 or null, got {self.clip_c}")
        _one_of(self.loss_agg_mode, LOSS_AGG_MODES, "algorithm.loss_agg_mode")
        _check(self.kl_coef >= 0, "algorithm.kl_coef", f"must be >= 0, got {self.kl_coef}")
        _one_of(self.kl_estimator, ("k1", "k2", "k3", "low_var_kl"), "algorithm.kl_estimator")
        _check(self.decay_rate > 0, "algorithm.decay_rate", f"must be > 0 tokens, got {self.decay_rate}")
        _check(0 <= self.weight_clip < 1, "algorithm.weight_clip", f"must be in [0, 1), got {self.weight_clip}")
        _check(self.safety_threshold > 0, "algorithm.safety_threshold", f"must be > 0, got {self.safety_threshold}")
        _check(
            self.rollout_is_cap is None or self.rollout_is_cap > 0, "algorithm.rollout_is_cap", "must be > 0 or null"
        )
        _check(
            not (self.policy_loss == "fipo" and self.clip_c is None),
            "algorithm.clip_c",
            "FIPO needs the dual-clip bound c (it is also the participation filter)",
        )


@dataclass
class ModelConf:
    """The policy model: a Hugging Face directory (or hub id on a connected cluster), or a built tiny model."""

    path: str | None = None
    """Hugging Face model directory or hub id. null builds the tiny model below (CPU development)."""
    tiny_hidden_size: int = 64
    """Tiny model (path: null): hidden size."""
    tiny_layers: int = 2
    """Tiny model: decoder layers."""
    tiny_heads: int = 2
    """Tiny model: attention heads (head_dim = hidden / heads must be one vLLM CPU supports, e.g. 16, 32)."""
    tiny_kv_heads: int = 1
    """Tiny model: key/value heads (GQA)."""
    tiny_intermediate_size: int = 128
    """Tiny model: MLP width."""
    tiny_dir: str = "outputs/models/tiny"
    """Where the tiny model is built: one sub-directory per architecture and init seed (`seed<S>-<hash>`, reused
    when it already holds that model), so that runs of different tiny models never rebuild each other's."""
    warm_start_steps: int = 0
    """Supervised warm-start (orchestration/data/warm_start.py) before RL: SFT optimizer steps on the training
    rows' worked solutions (`extra_info.solution`); 0 = off. Cached in warm_start_dir."""
    warm_start_stepwise_steps: int = 0
    """Warm-start curriculum (built-in task only): SFT steps on the training problems' stepwise chains (one
    operation per line, no shortcut targets) before the warm_start_steps on the rows' own solutions; 0 = none.
    For free_chain, whose mixed-habit targets give few lines to learn the k-th-operation lookup from
    (docs/warm_start.md). A stage of its own: its own lr warm-up and decay, its own cache entry."""
    warm_start_stepwise_rounds: int = 1
    """Warm-start curriculum: at most this many rounds of the stepwise stage, each warm_start_stepwise_steps from
    the last round's model with its own warm-up and decay (and cache entry); a round stops them when its greedy
    stepwise chains come out right in full for warm_start_stepwise_target of 200 development problems (drawn with
    another seed than the training and held-out ones). The lookup forms late on some init seeds and thread counts
    (docs/warm_start.md): they train another round, the others stop after the first."""
    warm_start_stepwise_target: float = 0.0
    """Warm-start curriculum: the share of development chains right in full (teacher-forced, greedy) that ends
    the stepwise rounds; 0 = every round is trained."""
    warm_start_stepwise_lr: float | None = None
    """Warm-start curriculum: the stepwise stage's peak learning rate; null = warm_start_lr. With it set, the
    second stage's warm_start_lr can be lower, so that fine-tuning on the mixed habits does not undo the
    lookup the first stage learned (docs/warm_start.md)."""
    warm_start_lr: float = 3e-3
    """Warm-start: peak AdamW learning rate (linear warm-up, cosine decay to 10%)."""
    warm_start_batch_prompts: int = 32
    """Warm-start: (prompt, solution) pairs per optimizer step."""
    warm_start_warmup_steps: int = 20
    """Warm-start: linear lr warm-up, optimizer steps."""
    warm_start_shortcut_frac: float = 0.0
    """Warm-start: fraction of examples (seeded) whose target is only the solution's last line (the answer,
    no worked chain), so that the warm-started model has two habits, reasoning first or answering at once, and
    RL learns which one pays (on the built-in task: reasoning first). 0 = always the full solution."""
    warm_start_threads: int = 1
    """Warm-start: torch CPU threads while training. The result is deterministic for a given machine and thread
    count; another count (like another CPU) rounds differently and, over hundreds of steps, gives a different
    model (docs/fipo_vs_dapo.md measures how much). Part of the cache key."""
    warm_start_dir: str = "outputs/models/warm_start"
    """Warm-start cache: one sub-directory per hash of (base model files, training texts, recipe)."""
    warm_start_min_chain_accuracy: float = 0.0
    """Warm-start check (tiny model on the built-in task): the least share of held-out problems whose worked
    chain the warm-started model writes right in full, greedily (orchestration.data.warm_start_eval); below it
    the run stops before RL with a message saying what failed (a failed warm-start, from which RL learns
    nothing). 0 = no check."""
    init_seed: int | None = None
    """Seed of the tiny model's random init and of the warm-start (batch order, shortcut targets); null = the
    run's `seed`. Fix it to start every seed of a study from the same model (one cached warm-start), so that
    `seed` varies only the RL run (sampling, data order, learner RNG)."""

    def __post_init__(self) -> None:
        for key in ("tiny_hidden_size", "tiny_layers", "tiny_heads", "tiny_kv_heads", "tiny_intermediate_size"):
            _positive(getattr(self, key), f"model.{key}")
        _check(
            self.tiny_hidden_size % self.tiny_heads == 0 and self.tiny_heads % self.tiny_kv_heads == 0,
            "model.tiny_hidden_size/tiny_heads/tiny_kv_heads",
            f"heads must divide the hidden size and kv heads the heads, got {self.tiny_hidden_size}, "
            f"{self.tiny_heads}, {self.tiny_kv_heads}",
        )
        _non_negative(self.warm_start_steps, "model.warm_start_steps")
        _non_negative(self.warm_start_stepwise_steps, "model.warm_start_stepwise_steps")
        _positive(self.warm_start_stepwise_rounds, "model.warm_start_stepwise_rounds")
        _check(0.0 <= self.warm_start_stepwise_target <= 1.0, "model.warm_start_stepwise_target", "must be in [0, 1]")
        _positive(self.warm_start_lr, "model.warm_start_lr")
        _check(self.warm_start_stepwise_lr is None or self.warm_start_stepwise_lr > 0, "model.warm_start_stepwise_lr",
               "must be > 0 or null")  # fmt: skip
        _positive(self.warm_start_batch_prompts, "model.warm_start_batch_prompts")
        _non_negative(self.warm_start_warmup_steps, "model.warm_start_warmup_steps")
        _positive(self.warm_start_threads, "model.warm_start_threads")
        _check(0.0 <= self.warm_start_shortcut_frac <= 1.0, "model.warm_start_shortcut_frac", "must be in [0, 1]")
        _check(
            0.0 <= self.warm_start_min_chain_accuracy <= 1.0, "model.warm_start_min_chain_accuracy", "must be in [0, 1]"
        )
        _check(self.init_seed is None or self.init_seed >= 0, "model.init_seed", "must be >= 0 or null")


@dataclass
class DataConf:
    """Prompt datasets in verl's DAPO-Math schema, or the built-in synthetic task."""

    train_files: list[str] = field(default_factory=list)
    """Training .jsonl/.parquet files; empty = the built-in synthetic arithmetic task."""
    val_files: list[str] = field(default_factory=list)
    """Evaluation files; empty with an empty train_files = the synthetic task's held-out split; empty with
    train_files = no evaluation (a start-up line says so). Duplicate rows in either are kept, and their count
    printed at start-up."""
    max_prompt_tokens: int = 2048
    """Prompts longer than this many tokens, rendered as the engines render them (chat template with the
    generation prompt, rollout.types.chat_prompt_ids), are dropped at start-up: counted in every metrics row
    (data/dropped_long_*_prompts), listed by file:line in run_info.json's `data`, the first five printed. The
    engines' context is this + rollout.max_response_tokens."""
    shuffle: bool = True
    """Shuffle the training prompts every epoch (seeded; the position is part of the checkpoint)."""
    synthetic_train_prompts: int = 2000
    """Synthetic task: training problems."""
    synthetic_val_prompts: int = 200
    """Synthetic task: held-out problems."""
    synthetic_min_steps: int = 3
    """Synthetic task: at least this many operations per problem (at least 1)."""
    synthetic_max_steps: int = 4
    """Synthetic task: at most this many operations per problem (at least synthetic_min_steps)."""
    synthetic_max_value: int = 30
    """Synthetic task: every intermediate value stays in 0..this (at least 9, the largest start value)."""
    synthetic_seed: int | None = None
    """Synthetic task: seed of its problems (and of the train / held-out split); null = the run's `seed`."""
    synthetic_task: str = "chain"
    """Synthetic task family (orchestration/data/tasks.py): chain (one operation per line, the length fixed by the
    problem) | free_chain (the same problems; a solution writes any number of operations one per line and the
    rest in one line: the length is the policy's choice and more written work is right more often)."""
    synthetic_habit_mix: dict[str, float] = field(
        default_factory=lambda: {"at_once": 0.2, "partial": 0.5, "stepwise": 0.3}
    )
    """free_chain: the share of training rows whose worked solution (the warm-start's target) is written in each
    habit (direct | at_once | partial | stepwise; weights >= 0 summing to 1), drawn per row with the data seed (a
    partial solution writes 1..n-2 operations one per line, uniformly, and the rest in one line). A dict given on
    the command line merges into the configured one, so give every habit's weight (0 to leave one out)."""

    def __post_init__(self) -> None:
        _positive(self.max_prompt_tokens, "data.max_prompt_tokens")
        _positive(self.synthetic_train_prompts, "data.synthetic_train_prompts")
        _non_negative(self.synthetic_val_prompts, "data.synthetic_val_prompts")
        _check(self.synthetic_seed is None or self.synthetic_seed >= 0, "data.synthetic_seed", "must be >= 0 or null")
        _check(
            1 <= self.synthetic_min_steps <= self.synthetic_max_steps,
            "data.synthetic_min_steps / data.synthetic_max_steps",
            f"need 1 <= min <= max, got {self.synthetic_min_steps}, {self.synthetic_max_steps}",
        )
        max_value = self.synthetic_max_value
        _check(max_value >= 9, "data.synthetic_max_value", f"must be >= 9 (the largest start value), got {max_value}")
        task = self.synthetic_task
        _check(task in TASKS, "data.synthetic_task", f"must be one of {TASKS}, got {task!r}")
        if task == "free_chain":
            try:
                check_habit_mix(self.synthetic_habit_mix)
            except ValueError as err:
                hint = "; a command-line dict merges into the configured one: give every habit, e.g. {at_once: 0, ...}"
                raise ConfigError(f"data.synthetic_habit_mix: {err}{hint}") from None
            min_steps = self.synthetic_min_steps
            _check(min_steps >= 3, "data.synthetic_min_steps", f"free_chain needs >= 3 operations, got {min_steps}")


WEIGHT_TRANSFERS = ("gloo", "object_store", "nccl")
"""The values of rollout.weight_transfer (vLLM's ipc and sparse_nccl transports are not wired: they need a
trainer side this project has not built; docs/weight_sync.md)."""


@dataclass
class RolloutConf:
    """Generation: vLLM engines in Ray actors."""

    engine: str = "vllm"
    """vllm | hf (transformers reference engine) | auto."""
    num_workers: int = 1
    """R: rollout workers (engines)."""
    tensor_parallel_size: int = 1
    """GPUs per engine (1 on CPU)."""
    max_response_tokens: int = 20480
    """Most response tokens per sample; reaching it is finish reason `length`."""
    temperature: float = 1.0
    """Sampling temperature for training rollouts."""
    top_p: float = 1.0
    """Nucleus mass for training rollouts (1 = off)."""
    top_k: int = 0
    """Top-k for training rollouts (0 = off)."""
    dtype: str = "auto"
    """Engine dtype: auto (the checkpoint's) | float32 | bfloat16."""
    gpu_memory_utilization: float = 0.85
    """GPU only: fraction of GPU memory vLLM may use."""
    num_cpus_per_worker: float = 1.0
    """Ray logical CPUs per rollout actor."""
    num_gpus_per_worker: float = 0.0
    """Ray GPUs per rollout actor (= tensor_parallel_size on a GPU cluster)."""
    timeout_s: float = 1800.0
    """Deadline of one generate / weight-update call, seconds; past it the run fails naming the phase."""
    weight_transfer: str = "object_store"
    """How the learner's weights reach the engines, always through vLLM's RL weight-transfer API (vllm engines):
    gloo (ours: learner rank 0 broadcasts each bucket to the engines over a gloo group; CPU or GPU hosts) |
    object_store (ours: buckets through Ray's object store, fetched by each engine; also the hf engine) |
    nccl (vLLM's: GPU to GPU; needs GPU engines; not run by this project yet: docs/weight_sync.md).
    trainer.max_staleness 1 brings a restarted engine back from the object store's copy: object_store only."""

    def __post_init__(self) -> None:
        _one_of(self.engine, ("vllm", "hf", "auto"), "rollout.engine")
        _one_of(self.weight_transfer, WEIGHT_TRANSFERS, "rollout.weight_transfer")
        for key in ("num_workers", "tensor_parallel_size", "max_response_tokens", "timeout_s"):
            _positive(getattr(self, key), f"rollout.{key}")
        _non_negative(self.temperature, "rollout.temperature")
        _check(0 < self.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {self.top_p}")
        _non_negative(self.top_k, "rollout.top_k")
        _one_of(self.dtype, ("auto", "float32", "bfloat16", "float16"), "rollout.dtype")
        _check(0 < self.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "must be in (0, 1]")
        _non_negative(self.num_cpus_per_worker, "rollout.num_cpus_per_worker")
        _non_negative(self.num_gpus_per_worker, "rollout.num_gpus_per_worker")


@dataclass
class RewardConf:
    """Outcome reward: an isolated, timed-out verifier pool."""

    fn: str = "reward.math:score_math"
    """Reward function as "module:function" (response, ground_truth, extra) -> RewardResult | float | bool."""
    num_workers: int = 2
    """Reward workers (each owns an isolated child process)."""
    timeout_s: float = 10.0
    """Per-sample time limit, seconds; a sample over it gets status `timeout` and leaves the loss."""

    def __post_init__(self) -> None:
        _positive(self.num_workers, "reward.num_workers")
        _positive(self.timeout_s, "reward.timeout_s")


@dataclass
class LearnerConf:
    """The FSDP2 learner group: optimizer, schedule, micro-batching, placement."""

    world_size: int = 2
    """Learner ranks (processes / GPUs) sharing one FSDP2 model."""
    lr: float = 1e-6
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (β1, β2)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables clipping)."""
    warmup_steps: int = 10
    """Linear lr warm-up, optimizer steps."""
    lr_schedule: str = "constant"
    """constant | cosine (over all optimizer steps of the run)."""
    min_lr_ratio: float = 0.0
    """cosine: final lr as a fraction of the peak."""
    micro_batch_tokens: int = 22528
    """Token budget per micro-batch and rank (positions computed: Σ tokens when packed, else rows × padded length)."""
    param_dtype: str = "float32"
    """float32 (CPU) | bfloat16 (GPU, fp32 master weights and reductions)."""
    num_cpus_per_rank: float = 1.0
    """Ray logical CPUs per learner rank."""
    num_gpus_per_rank: float = 0.0
    """Ray GPUs per learner rank (1 on a GPU cluster)."""
    weight_bucket_mb: float = 256.0
    """Weight broadcast bucket size, MiB."""
    timeout_s: float = 1800.0
    """Deadline of one learner call (log-probs, update, checkpoint), seconds."""
    packing: bool = True
    """Pack each micro-batch's samples into one row, no padding (block-diagonal causal attention)."""
    share_prompts: bool = True
    """Packed only: a group's samples in one micro-batch share one copy of their prompt (computed once, same
    log-probs and gradients); the GPU cluster config turns it off (long responses: little to save, and the
    CUDA varlen kernel cannot take a shared prompt)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward (far less memory, ~1/3 more compute)."""
    logprob_chunk_tokens: int = 1024
    """Tokens per chunk of the LM head's log-softmax, bounding its memory (0 = all logits at once)."""

    def __post_init__(self) -> None:
        for key in ("world_size", "lr", "micro_batch_tokens", "weight_bucket_mb", "timeout_s"):
            _positive(getattr(self, key), f"learner.{key}")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "learner.betas",
            f"must be two numbers in [0, 1), got {list(self.betas)}",
        )
        for key in ("weight_decay", "grad_clip", "warmup_steps", "num_cpus_per_rank", "num_gpus_per_rank"):
            _non_negative(getattr(self, key), f"learner.{key}")
        _non_negative(self.logprob_chunk_tokens, "learner.logprob_chunk_tokens")
        _one_of(self.lr_schedule, ("constant", "cosine"), "learner.lr_schedule")
        _check(0 <= self.min_lr_ratio <= 1, "learner.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _one_of(self.param_dtype, ("float32", "bfloat16"), "learner.param_dtype")
        _check(
            self.packing or not self.share_prompts,
            "learner.share_prompts",
            "needs learner.packing=true (shared prompts live in packed rows); set learner.share_prompts=false",
        )


@dataclass
class TrainerConf:
    """The run: length, outputs, checkpoints, evaluation, resume."""

    total_steps: int = 600
    """Training steps (one step = one generation batch and one weight push)."""
    output_dir: str = "outputs/run"
    """Where metrics.jsonl, checkpoints/ and the wandb run go."""
    save_every: int = 50
    """Save a checkpoint every this many steps (and at the end); 0 = only at the end."""
    eval_every: int = 5
    """Evaluate on data.val_files every this many steps; 0 = never."""
    eval_before_train: bool = True
    """Evaluate once before the first step."""
    eval_samples: int = 32
    """k: samples per evaluation problem (avg@k, cons@k, pass@k)."""
    eval_temperature: float = 1.0
    """Evaluation sampling temperature (the paper's AIME protocol: 1.0)."""
    eval_top_p: float = 0.7
    """Evaluation nucleus mass (the paper's AIME protocol: 0.7)."""
    resume: str = "auto"
    """auto: continue from the latest checkpoint in output_dir if there is one | none: start fresh."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept on disk (older ones are deleted); 0 keeps all."""
    max_staleness: int = 0
    """0: each step's batch is generated with the weights that step trains from (synchronous, on-policy; the
    official recipes). 1: step k + 1's batch is generated with version k's weights while step k trains, so
    generation and training overlap (one-step off-policy; orchestration/pipeline.py). Larger values are not
    supported."""
    snapshot_every: int = 0
    """Save a learner snapshot every this many steps, between checkpoints: the sharded training state and the
    trainer state without the HF export, in <output_dir>/snapshots/ (only the newest kept). A learner restart
    (or a resume) continues from the newest checkpoint or snapshot, so it replays fewer steps; 0 = none (a
    learner restart then replays up to save_every − 1 steps)."""
    max_restarts: int = 3
    """Restarts of lost workers allowed: per call for rollout engines, reward actors and the advantage actor (a
    generation, a weight update, a scoring batch, an advantage computation), per step for the learner group
    (its replays included). One more loss ends the run with an error naming the worker, the step, the phase
    and the last error; 0 = any lost worker ends it."""
    fault_inject: list[str] = field(default_factory=list)
    """Faults to inject, for tests and drills: each "KIND:INDEX@STEP:PHASE[:always]" SIGKILLs the process of
    that worker (rollout | learner | reward | advantage, from 0) at that step (from 0) right after the phase's
    calls are submitted (the advantage actor: just before), once (or on every attempt with :always). Phases:
    rollout generate | update_weights; learner compute_log_probs | update | weight_buckets | save_checkpoint |
    export_hf; reward score; advantage compute (the grammar: orchestration/config/faults.py; what a fault does:
    orchestration/cluster/faults.py). Empty = none. Parsed once into `fault_specs` (FaultSpec) when validated."""
    hold_at_step: int | None = None
    """For tests and drills: before this step (from 0) the driver waits until trainer.hold_file exists, having
    written <hold_file>.reached, so that an outside action (`ray job stop`, a node loss) lands at a known step
    whatever the machine's speed. null = never."""
    hold_file: str = ""
    """The file whose creation releases trainer.hold_at_step (required with it)."""

    def __post_init__(self) -> None:
        _positive(self.total_steps, "trainer.total_steps")
        if self.hold_at_step is not None:
            _non_negative(self.hold_at_step, "trainer.hold_at_step")
            _check(bool(self.hold_file), "trainer.hold_file", "must be set with trainer.hold_at_step")
        _check(bool(self.output_dir), "trainer.output_dir", "must not be empty")
        for key in (
            "save_every",
            "eval_every",
            "keep_checkpoints",
            "eval_temperature",
            "snapshot_every",
            "max_restarts",
        ):
            _non_negative(getattr(self, key), f"trainer.{key}")
        try:  # parsed once, here: validate() and the run read fault_specs
            self.fault_specs = [FaultSpec.parse(spec) for spec in self.fault_inject]
        except ValueError as err:
            raise ConfigError(f"trainer.fault_inject: {err}") from None
        _positive(self.eval_samples, "trainer.eval_samples")
        _check(0 < self.eval_top_p <= 1, "trainer.eval_top_p", f"must be in (0, 1], got {self.eval_top_p}")
        _one_of(self.resume, ("auto", "none"), "trainer.resume")
        _one_of(self.max_staleness, (0, 1), "trainer.max_staleness")


@dataclass
class LoggerConf:
    """Metrics: metrics.jsonl always, wandb optionally, a progress line on the console."""

    wandb_mode: str = "offline"
    """online | offline (no network; `wandb sync` later) | disabled."""
    project: str = "fipo-trainer"
    """wandb project."""
    run_name: str | None = None
    """wandb run name; null = the sweep member's folder name in a sweep (`-m`), else "<algorithm>-seed<seed>"."""
    group: str | None = None
    """wandb group; null = the sweep's folder name in a sweep (`-m`: its members are one group), else none."""
    job_type: str | None = None
    """wandb job type; null = the algorithm's name (so a sweep's runs split by algorithm within the group)."""

    def __post_init__(self) -> None:
        _one_of(self.wandb_mode, ("online", "offline", "disabled"), "logger.wandb_mode")
        _check(bool(self.project), "logger.project", "must not be empty")


@dataclass
class ClusterConf:
    """Where Ray runs."""

    name: str = "local_cpu"
    """A label: local_cpu | gpu."""
    address: str | None = None
    """Ray address: null starts a local Ray; "auto" joins the cluster a `ray job submit` job runs in."""
    num_cpus: int | None = 8
    """Local Ray only: logical CPUs to declare (more than the cores, so fractional actors fit on 2 cores)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables of the run: set in the driver before anything starts (a variable already set in
    the launching shell wins) and handed to every Ray worker. conf/cluster/local_cpu.yaml sets what vLLM's
    CPU build needs (engine core in-process, a small KV cache), so every entry point works without exports."""
    rollout_cpus: list[int] | None = None
    """The cores every rollout worker's process is bound to, as positions among the cores its machine lets it
    use (0 = the first; null: any core). On a 2-core box the single-threaded CPU engine then keeps one
    core (and its caches) while the learner ranks run beside it; see orchestration/cluster/cpus.py."""
    learner_nice: int | None = None
    """Niceness the learner ranks raise themselves to, so that the engine wins a shared core
    (null: as Ray started them, 15 like every Ray worker; never lowered)."""
    gpu: str = "h100"
    """The GPU every learner rank and engine runs on, for the memory plan (orchestration/cluster/fit.py): h100 (80 GB),
    h200 (141 GB), a100-80gb or a100-40gb; its memory is what nvidia-smi reports as the total."""
    gpu_memory_gib: float | None = None
    """Memory per GPU, GiB; null = the named `cluster.gpu`'s."""
    gpu_reserved_gib: float = 2.0
    """Memory per GPU that PyTorch's allocator never sees, GiB: the CUDA context, cuBLAS and NCCL workspaces."""
    check_fit: bool = True
    """On a GPU cluster (learner.num_gpus_per_rank > 0), run the memory plan at start-up, before any actor is
    created, and stop with its advice if a learner rank or an engine cannot fit; false skips it."""
    layout: str = "packed"
    """Where the engines go relative to the learner ranks (orchestration/cluster/layout.py): packed (wherever they fit,
    also beside learner ranks) | separate (only on nodes that hold no learner rank: learner and rollout nodes
    disaggregated). Every engine's resources are one STRICT_PACK bundle (a tensor-parallel engine on one node)."""
    learner_strategy: str = "PACK"
    """Ray placement strategy of the learner's placement group (one bundle per rank): PACK (ranks share a node
    when they fit) | SPREAD | STRICT_PACK (all on one node, or not at all) | STRICT_SPREAD (one rank per node)."""
    placement_timeout_s: float = 180.0
    """The longest the run waits for its actors' resources (at start-up, and after losing a node for the lost
    actors' replacements) before it stops with an error naming the missing resources and the keys that asked."""

    def __post_init__(self) -> None:
        _one_of(self.layout, ("packed", "separate"), "cluster.layout")
        _one_of(self.learner_strategy, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"), "cluster.learner_strategy")
        _positive(self.placement_timeout_s, "cluster.placement_timeout_s")
        _check(
            self.num_cpus is None or self.num_cpus >= 1,
            "cluster.num_cpus",
            f"must be >= 1 or null, got {self.num_cpus}",
        )
        bad = [key for key in self.env if not key or "=" in key]
        _check(not bad, "cluster.env", f"invalid variable names {bad}")

        _one_of(self.gpu, GPU_MEMORY_GIB, "cluster.gpu")
        _check(self.gpu_memory_gib is None or self.gpu_memory_gib > 0, "cluster.gpu_memory_gib", "must be > 0 or null")
        _non_negative(self.gpu_reserved_gib, "cluster.gpu_reserved_gib")
        _check(
            self.learner_nice is None or 0 <= self.learner_nice <= 19,
            "cluster.learner_nice",
            f"must be a niceness in [0, 19] (it is only ever raised) or null, got {self.learner_nice}",
        )


@dataclass
class TrainConf:
    """The whole run. See conf/config.yaml for the default groups."""

    seed: int = 0
    """Seed of everything (data order, sampling, init of the tiny model, learner RNG)."""
    algorithm: AlgorithmConf = field(default_factory=AlgorithmConf)
    model: ModelConf = field(default_factory=ModelConf)
    data: DataConf = field(default_factory=DataConf)
    rollout: RolloutConf = field(default_factory=RolloutConf)
    reward: RewardConf = field(default_factory=RewardConf)
    learner: LearnerConf = field(default_factory=LearnerConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    logger: LoggerConf = field(default_factory=LoggerConf)
    cluster: ClusterConf = field(default_factory=ClusterConf)


def validate(cfg: TrainConf) -> None:
    """Checks that involve several keys (sizes are checked by orchestration.config.sizes.derive_sizes)."""
    _check(
        cfg.algorithm.overlong_buffer_tokens <= cfg.rollout.max_response_tokens,
        "algorithm.overlong_buffer_tokens",
        f"{cfg.algorithm.overlong_buffer_tokens} exceeds rollout.max_response_tokens={cfg.rollout.max_response_tokens}",
    )
    if cfg.cluster.address is None and cfg.learner.num_gpus_per_rank + cfg.rollout.num_gpus_per_worker > 0:
        import torch

        needed = cfg.learner.world_size * cfg.learner.num_gpus_per_rank
        needed += cfg.rollout.num_workers * cfg.rollout.num_gpus_per_worker
        have = torch.cuda.device_count()
        _check(
            needed <= have,
            "learner.num_gpus_per_rank / rollout.num_gpus_per_worker",
            f"the placement needs {needed:g} GPUs (learner.world_size × learner.num_gpus_per_rank + "
            f"rollout.num_workers × rollout.num_gpus_per_worker) but this machine has {have}",
        )
    transfer = cfg.rollout.weight_transfer
    if transfer == "nccl":
        _check(
            cfg.rollout.num_gpus_per_worker > 0 and cfg.learner.num_gpus_per_rank > 0,
            "rollout.weight_transfer",
            "nccl moves weights between GPUs: it needs GPU engines and learner ranks (rollout.num_gpus_per_worker "
            f"= {cfg.rollout.num_gpus_per_worker:g}, learner.num_gpus_per_rank = {cfg.learner.num_gpus_per_rank:g}); "
            "on CPU hosts use gloo or object_store",
        )
    if transfer != "object_store":
        _check(
            cfg.rollout.engine == "vllm",
            "rollout.weight_transfer",
            f"{transfer} drives vLLM's weight-transfer API: it needs rollout.engine=vllm (got {cfg.rollout.engine}; "
            "the hf engine takes rollout.weight_transfer=object_store)",
        )
        _check(
            cfg.trainer.max_staleness == 0,
            "rollout.weight_transfer",
            f"{transfer} with trainer.max_staleness=1: an engine restarted while the learner has moved on is brought "
            "back from the object store's copy of the last push, which only object_store keeps",
        )
    workers = {
        "rollout": cfg.rollout.num_workers,
        "learner": cfg.learner.world_size,
        "reward": cfg.reward.num_workers,
        "advantage": 1,
    }
    for text, spec in zip(cfg.trainer.fault_inject, cfg.trainer.fault_specs):
        _check(
            spec.index < workers[spec.kind] and spec.step < cfg.trainer.total_steps,
            "trainer.fault_inject",
            f"{text!r} targets {spec.kind} {spec.index} at step {spec.step}, but the run has {workers[spec.kind]} "
            f"{spec.kind} worker(s) and trainer.total_steps={cfg.trainer.total_steps}",
        )
    if cfg.cluster.address is None and cfg.cluster.num_cpus is not None:
        needed = cfg.learner.world_size * cfg.learner.num_cpus_per_rank
        needed += cfg.rollout.num_workers * cfg.rollout.num_cpus_per_worker
        needed += (cfg.reward.num_workers + 1) * SMALL_ACTOR_CPUS  # the scorers and the advantage actor
        _check(
            needed <= cfg.cluster.num_cpus,
            "cluster.num_cpus",
            f"{cfg.cluster.num_cpus} logical CPUs cannot place learner.world_size × learner.num_cpus_per_rank + "
            f"rollout.num_workers × rollout.num_cpus_per_worker + (reward.num_workers + 1) × {SMALL_ACTOR_CPUS} = "
            f"{needed:g}",
        )


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (conf/config.yaml lists `base_config` first)."""
    ConfigStore.instance().store(name="base_config", node=TrainConf)


def to_object(cfg: Any) -> TrainConf:
    """A composed DictConfig → TrainConf dataclasses (runs every __post_init__), then cross-key checks."""
    from omegaconf import OmegaConf

    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, TrainConf), type(obj)
    validate(obj)
    return obj


__all__ = ["MISSING", "TrainConf", "register_configs", "to_object", "validate"]
