"""Rollout: generation engines (vLLM; transformers as reference/fallback), rollout workers, weight updates.

`RolloutGroup` (rollout/group.py) is the only Ray-aware name; it is imported on first use so that the rest
stays importable without paying for `import ray`.
See rollout/README.md for the weight-update contract and the GPU path.
"""

from rollout.engine import Engine, VLLMEngine, iter_buckets, render_prompts, resolve_model_path
from rollout.hf_engine import HFEngine
from rollout.tiny import build_tiny_model
from rollout.types import Sample, SamplingConfig, samples_to_batch
from rollout.worker import RolloutWorker, make_engine

__all__ = [
    "Engine",
    "RolloutGroup",
    "HFEngine",
    "RolloutWorker",
    "Sample",
    "SamplingConfig",
    "VLLMEngine",
    "build_tiny_model",
    "iter_buckets",
    "make_engine",
    "render_prompts",
    "resolve_model_path",
    "samples_to_batch",
]


def __getattr__(name: str):
    if name == "RolloutGroup":
        from rollout.group import RolloutGroup  # heavy: Ray, only when a group is asked for

        return RolloutGroup
    raise AttributeError(f"module 'rollout' has no attribute {name!r}")
