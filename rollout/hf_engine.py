"""A small transformers generation engine: the reference for tests and the fallback where vLLM is missing.

Same contract as `VLLMEngine` (rollout/engine.py), same log-prob semantics:
* "raw_logprobs": log_softmax(logits) of the model at temperature 1, before any processing;
* "processed_logprobs": log_softmax after temperature, top-k and top-p masking (the sampling distribution).
Sampling follows vLLM's order: temperature, then top-k, then top-p, then a draw from the processed softmax.
It is slow (one prompt at a time, its n samples as one batch with a KV cache) and meant for small models.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from rollout.engine import (
    NamedTensors,
    bucket_nbytes,
    generation_prompt_ids,
    resolve_model_path,
    stream_weight_update,
)
from rollout.types import LogprobsMode, Prompt, Sample, SamplingConfig


def process_logits(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """[N, V] float32 raw logits -> [N, V] logits of the sampling distribution (-inf on masked tokens)."""
    logits = logits / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= sampling.top_p  # keep the smallest prefix reaching top_p (>= 1 token)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class HFEngine:
    """A transformers `AutoModelForCausalLM` that generates with the `Engine` contract.

    model_path:    local Hugging Face model directory.
    dtype:         parameter dtype, e.g. "float32" (exact comparisons), "bfloat16", or "auto" (the checkpoint's).
    device:        "cpu" or a CUDA device.
    max_model_len: context length (prompt + response); None = config.max_position_embeddings.
    seed:          seeds unseeded sampling (a torch.Generator owned by the engine).
    logprobs_mode: "raw_logprobs" (default) or "processed_logprobs"; see the module docstring.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
        max_model_len: int | None = None,
        seed: int = 0,
        logprobs_mode: LogprobsMode = "raw_logprobs",
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_path = resolve_model_path(model_path)
        if logprobs_mode not in ("raw_logprobs", "processed_logprobs"):
            raise ValueError(f"logprobs_mode must be raw_logprobs or processed_logprobs, got {logprobs_mode!r}")
        self.logprobs_mode = logprobs_mode
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype).to(self.device).eval()
        self.max_model_len = max_model_len or self.model.config.max_position_embeddings
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = self.tokenizer.eos_token_id if pad is None else pad
        eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.policy_version = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._update_active = False

    def _sample_generators(self, sampling: SamplingConfig, prompt_index: int) -> list[torch.Generator]:
        generators = []
        for i in range(sampling.n):
            seed = sampling.sample_seed(prompt_index, i)
            if seed is None:
                seed = int(torch.randint(0, 2**62, (), generator=self._generator))
            generators.append(torch.Generator().manual_seed(seed))
        return generators

    @torch.no_grad()
    def _generate_group(self, prompt_ids: list[int], sampling: SamplingConfig, prompt_index: int):
        """n samples of one prompt: lists of (token ids, log-probs, finish reason, text)."""
        n = sampling.n
        generators = self._sample_generators(sampling, prompt_index)
        stop_ids = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(self.eos_token_ids))
        tokens: list[list[int]] = [[] for _ in range(n)]
        log_probs: list[list[float]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        texts: list[str | None] = [None] * n  # set when a stop string ends a sample (text cut before it)
        input_ids = torch.tensor([prompt_ids] * n, device=self.device)
        past = None
        for _ in range(sampling.max_tokens):
            out = self.model(input_ids=input_ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            raw = out.logits[:, -1, :].float().cpu()  # [n, V]
            processed = process_logits(raw, sampling)
            probs = torch.softmax(processed, dim=-1)
            reported = torch.log_softmax(raw if self.logprobs_mode == "raw_logprobs" else processed, dim=-1)
            next_ids = []
            for row in range(n):
                token = int(torch.multinomial(probs[row], 1, generator=generators[row]))
                next_ids.append(token)
                if finish[row] is not None:
                    continue
                tokens[row].append(token)
                log_probs[row].append(float(reported[row, token]))
                if token in stop_ids:
                    finish[row] = "stop"
                elif sampling.stop:
                    text = self.tokenizer.decode(tokens[row], skip_special_tokens=True)
                    hits = [text.index(s) for s in sampling.stop if s in text]
                    if hits:
                        finish[row], texts[row] = "stop", text[: min(hits)]
                if finish[row] is None and len(tokens[row]) == sampling.max_tokens:
                    finish[row] = "length"
            if all(f is not None for f in finish):
                break
            input_ids = torch.tensor(next_ids, device=self.device)[:, None]
        for row in range(n):
            if texts[row] is None:
                texts[row] = self.tokenizer.decode(tokens[row], skip_special_tokens=True)
        return tokens, log_probs, finish, texts

    def generate(
        self, prompts: Sequence[Prompt], sampling: SamplingConfig, *, prompt_index_offset: int = 0
    ) -> list[Sample]:
        prompt_ids = generation_prompt_ids(self, prompts, sampling.max_tokens, prompt_index_offset)
        samples = []
        for index, ids in enumerate(prompt_ids):
            global_index = prompt_index_offset + index
            tokens, log_probs, finish, texts = self._generate_group(ids, sampling, global_index)
            for row in range(sampling.n):
                samples.append(
                    Sample(
                        prompt_index=global_index,
                        prompt_ids=tuple(ids),
                        response_ids=tuple(tokens[row]),
                        log_probs=torch.tensor(log_probs[row], dtype=torch.float32),
                        finish_reason=finish[row],
                        policy_version=self.policy_version,
                        text=texts[row],
                    )
                )
        return samples

    def begin_weight_update(self) -> None:
        if self._update_active:
            raise RuntimeError("begin_weight_update called twice without finish_weight_update")
        self._update_active = True

    @torch.no_grad()
    def load_weight_bucket(self, bucket: Sequence[tuple[str, torch.Tensor]]) -> int:
        if not self._update_active:
            raise RuntimeError("load_weight_bucket called outside begin_weight_update / finish_weight_update")
        for name, tensor in bucket:
            try:
                param = self.model.get_parameter(name)
            except AttributeError as error:
                raise KeyError(f"{self.model_path} has no parameter {name!r}") from error
            if param.shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != the model's {tuple(param.shape)}")
            param.copy_(tensor)
        return bucket_nbytes(bucket)

    def finish_weight_update(self, policy_version: int) -> None:
        if not self._update_active:
            raise RuntimeError("finish_weight_update called without begin_weight_update")
        self._update_active = False
        self.policy_version = int(policy_version)

    def weight_version(self) -> str:
        return str(self.policy_version)

    def abort_weight_update(self) -> None:
        self._update_active = False

    def update_weights(self, named_tensors: NamedTensors, policy_version: int) -> None:
        stream_weight_update(self, named_tensors, policy_version)

    def shutdown(self) -> None:
        self.model = None
