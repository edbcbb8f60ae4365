"""The learner's configuration: small frozen dataclasses, one docstring per field with its unit.

Validation happens in `__post_init__`; a conflict raises an error that names the fields involved. The policy
loss is chosen by registry name (`advantage.POLICY_LOSSES`); its own config object travels next to the name
and defaults to the algorithm's published values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from advantage import POLICY_LOSSES

LR_SCHEDULES = ("constant", "cosine")
PARAM_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with decoupled weight decay and global-norm gradient clipping (FIPO/DAPO recipe values)."""

    lr: float = 1e-6
    """Peak learning rate (after warm-up), per optimizer step."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (β1, β2): decay rates of the first and second moment estimates, per optimizer step."""
    weight_decay: float = 0.1
    """Decoupled weight decay coefficient (AdamW), applied as lr · weight_decay · θ per step."""
    eps: float = 1e-8
    """AdamW denominator epsilon (same unit as the gradient)."""
    grad_clip: float | None = 1.0
    """Maximum global L2 norm of the gradient (over all parameters and ranks); None disables clipping."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"OptimizerConfig.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"OptimizerConfig.betas must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or not self.eps > 0:
            raise ValueError(
                f"OptimizerConfig: weight_decay must be >= 0 and eps > 0, got {self.weight_decay}, {self.eps}"
            )
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"OptimizerConfig.grad_clip must be > 0 or None, got {self.grad_clip}")


@dataclass(frozen=True)
class LRScheduleConfig:
    """Learning-rate schedule: linear warm-up, then constant or cosine decay. Counted in optimizer steps."""

    warmup_steps: int = 10
    """Optimizer steps of linear warm-up: step k (0-based) uses lr · (k + 1) / warmup_steps. 0 = none."""
    kind: str = "constant"
    """"constant" (the FIPO/DAPO recipe) or "cosine" (decay from lr to lr · min_lr_ratio after warm-up)."""
    total_steps: int | None = None
    """Total optimizer steps of the run (steps × mini-batches per step); required for "cosine"."""
    min_lr_ratio: float = 0.0
    """Cosine only: the final learning rate as a fraction of the peak lr."""

    def __post_init__(self) -> None:
        if self.kind not in LR_SCHEDULES:
            raise ValueError(f"LRScheduleConfig.kind must be one of {LR_SCHEDULES}, got {self.kind!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"LRScheduleConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.kind == "cosine" and (self.total_steps is None or self.total_steps <= self.warmup_steps):
            raise ValueError(
                f"LRScheduleConfig: kind='cosine' needs total_steps > warmup_steps, got total_steps="
                f"{self.total_steps}, warmup_steps={self.warmup_steps}"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"LRScheduleConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak lr at optimizer step `step` (0-based; the first step uses factor(0))."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LearnerConfig:
    """Everything one learner rank needs: the model, the batch split, the loss and the optimizer."""

    model_dir: str
    """Local Hugging Face model directory (config, safetensors, tokenizer) loaded with AutoModelForCausalLM."""
    mini_batch_samples: int
    """Samples (prompts × group size) per optimizer step; a step's batch must divide evenly into these, and
    each mini-batch evenly over the ranks."""
    micro_batch_tokens: int
    """Token budget per micro-batch and rank, in positions the model computes: Σ (prompt + response) tokens
    of its samples when packed, rows × (longest prompt + longest response) when padded. A single sample longer
    than the budget is a micro-batch of its own."""
    policy_loss: str = "fipo"
    """Name in advantage.POLICY_LOSSES: "fipo", "dapo" or "grpo"."""
    policy_loss_config: Any = None
    """The loss's own frozen config (FIPOLossConfig / PPOLossConfig); None = the registry default."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW and gradient clipping."""
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    """Warm-up and decay of the learning rate."""
    param_dtype: str = "float32"
    """Dtype of the parameters in forward/backward: "float32" (CPU) or "bfloat16" (GPU; FSDP2
    MixedPrecisionPolicy with float32 sharded master weights and float32 gradient reduction)."""
    ref_model_dir: str | None = None
    """Reference policy for a KL term (GRPO); None = model_dir. Loaded only when the loss has kl_coef > 0."""
    seed: int = 0
    """Seed of every rank's torch RNG (offset by the rank)."""
    collective_timeout_s: float = 120.0
    """Timeout of the process group's collectives, seconds: a stuck collective raises after this long."""
    packing: bool = True
    """Pack each micro-batch's samples into one row (positions restart per sample, block-diagonal causal
    attention): no padding is computed. False: one right-padded row per sample (the reference layout)."""
    share_prompts: bool = False
    """Packed only: the samples of a micro-batch that have the same prompt (a group) share one copy of it,
    [prompt | response 1 | response 2 | ...], each response seeing the prompt and itself (learner/attention.py):
    the prompt's positions are computed once instead of once per sample, with the same log-probs and
    gradients (a group's samples produce identical outputs at their prompt). Pays when prompts are a large
    share of the tokens (the CPU demo: ~60%). It runs SDPA over gathered attention rows with a
    [rows × longest query × longest key] mask, also on CUDA (not the varlen kernel): meant for short responses."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of storing them (about 1/3 more compute
    for far less activation memory); the GPU presets turn it on."""
    logprob_chunk_tokens: int = 1024
    """Tokens per chunk of the LM head + log-softmax (peak extra memory ≈ 3 × chunk × vocab × 4 bytes);
    0 = all response tokens of a micro-batch at once, materialising [tokens × vocab] float32 logits."""

    def __post_init__(self) -> None:
        if self.mini_batch_samples <= 0 or self.micro_batch_tokens <= 0:
            raise ValueError(
                f"LearnerConfig: mini_batch_samples ({self.mini_batch_samples}) and micro_batch_tokens "
                f"({self.micro_batch_tokens}) must be > 0"
            )
        if self.param_dtype not in PARAM_DTYPES:
            raise ValueError(f"LearnerConfig.param_dtype must be one of {PARAM_DTYPES}, got {self.param_dtype!r}")
        loss = POLICY_LOSSES.get(self.policy_loss)  # raises with the valid names
        if self.policy_loss_config is None:
            object.__setattr__(self, "policy_loss_config", loss.default_config)
        elif type(self.policy_loss_config) is not type(loss.default_config):
            raise TypeError(
                f"LearnerConfig: policy_loss {self.policy_loss!r} takes a {type(loss.default_config).__name__}, "
                f"got policy_loss_config of type {type(self.policy_loss_config).__name__}"
            )
        if self.collective_timeout_s <= 0:
            raise ValueError(f"LearnerConfig.collective_timeout_s must be > 0, got {self.collective_timeout_s}")
        if self.logprob_chunk_tokens < 0:
            raise ValueError(f"LearnerConfig.logprob_chunk_tokens must be >= 0, got {self.logprob_chunk_tokens}")
        if self.share_prompts and not self.packing:
            raise ValueError("LearnerConfig.share_prompts needs packing=True (shared prompts live in packed rows)")

    @property
    def uses_reference(self) -> bool:
        """True when the loss has a KL-to-reference term (then a frozen reference model is loaded)."""
        return getattr(self.policy_loss_config, "kl_coef", 0.0) > 0
