"""RolloutWorker: one generation engine behind a small, plain interface (no Ray here).

rollout/group.py turns this class into a Ray actor at runtime and runs R of them; tests use it directly.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import Literal

import torch

from rollout.engine import Engine, NamedTensors, iter_buckets
from rollout.types import Prompt, Sample, SamplingConfig

logger = logging.getLogger(__name__)

EngineKind = Literal["vllm", "hf", "auto"]


def make_engine(kind: EngineKind, model_path: str | os.PathLike, **engine_kwargs) -> Engine:
    """Build an engine: "vllm" (VLLMEngine), "hf" (HFEngine) or "auto" (vLLM when installed, else HF)."""
    if kind == "auto":
        try:
            import vllm  # noqa: F401

            kind = "vllm"
        except ImportError:
            logger.warning("vLLM is not installed: rollouts use the (slow) transformers engine")
            kind = "hf"
    if kind == "vllm":
        from rollout.engine import VLLMEngine  # heavy and optional: vLLM

        return VLLMEngine(model_path, **engine_kwargs)
    if kind == "hf":
        from rollout.hf_engine import HFEngine  # heavy: transformers

        return HFEngine(model_path, **engine_kwargs)
    raise ValueError(f"unknown engine {kind!r}; choose vllm, hf or auto")


class RolloutWorker:
    """Hosts one engine. `engine_kwargs` go to the engine's constructor (e.g. dtype, max_model_len,
    tensor_parallel_size, logprobs_mode)."""

    def __init__(self, model_path: str | os.PathLike, *, engine: EngineKind = "vllm", **engine_kwargs) -> None:
        self.engine = make_engine(engine, model_path, **engine_kwargs)

    def info(self) -> dict:
        """Readiness probe: pid, engine type, context length, pad id, current policy version, and the CPU
        seconds this process has used so far (for benchmarks on shared machines)."""
        return {
            "pid": os.getpid(),
            "cpu_seconds": time.process_time(),
            "engine": type(self.engine).__name__,
            "max_model_len": self.engine.max_model_len,
            "pad_token_id": self.engine.pad_token_id,
            "policy_version": self.engine.policy_version,
        }

    def generate(
        self, prompts: Sequence[Prompt], sampling: SamplingConfig, prompt_index_offset: int = 0
    ) -> list[Sample]:
        return self.engine.generate(prompts, sampling, prompt_index_offset=prompt_index_offset)

    def update_weights(self, named_tensors: NamedTensors, policy_version: int) -> dict:
        """Stream Hugging Face-named full tensors into the engine (in buckets of ~256 MiB); afterwards samples
        carry `policy_version`. Returns {"bytes", "seconds", "num_buckets"}."""
        return self.update_weights_from_buckets(iter_buckets(named_tensors), policy_version)

    def update_weights_from_buckets(
        self, buckets: Iterable[Sequence[tuple[str, torch.Tensor]]], policy_version: int
    ) -> dict:
        """Load buckets one at a time as the iterable yields them (only one is held at a time when the
        iterable fetches lazily). Returns {"bytes", "seconds", "num_buckets", "weight_version"} (the engine's
        own record of its version after the update: vLLM's weight version)."""
        start = time.perf_counter()
        self.engine.begin_weight_update()
        nbytes = num_buckets = 0
        try:
            for bucket in buckets:
                nbytes += self.engine.load_weight_bucket(bucket)
                num_buckets += 1
                del bucket  # release it before the next one is fetched
        except BaseException:
            self.engine.abort_weight_update()
            raise
        self.engine.finish_weight_update(policy_version)
        return {
            "bytes": nbytes,
            "seconds": time.perf_counter() - start,
            "num_buckets": num_buckets,
            "weight_version": self.engine.weight_version(),
        }

    # A push driven by learner rank 0 through vLLM's weight-transfer API (rollout.group.EngineClient)
    def init_weight_transfer(self, init_info: dict) -> None:
        self.engine.init_weight_transfer(init_info)

    def start_weight_update(self) -> None:
        self.engine.begin_weight_update()

    def receive_weights(self, update_info: dict) -> None:
        """Take the weights the transport delivers; on failure the update is aborted and the error raised."""
        try:
            self.engine.receive_weights(update_info)
        except BaseException:
            self.engine.abort_weight_update()
            raise

    def finish_weight_update(self, policy_version: int) -> str:
        """End the update; returns the engine's weight version (vLLM's), which is now `policy_version`."""
        self.engine.finish_weight_update(policy_version)
        return self.engine.weight_version()

    def abort_weight_update(self) -> None:
        self.engine.abort_weight_update()

    def shutdown(self) -> None:
        self.engine.shutdown()
