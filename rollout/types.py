"""The rollout package's data types: sampling settings in, samples out, and the padded batch they become.

A prompt is either chat messages (`[{"role": "user", "content": "..."}]`, rendered with the model's chat
template and `add_generation_prompt=True`) or a list of token ids used as is. An engine returns, for a batch
of prompts and `n` samples per prompt, a flat list of `Sample`s in prompt order (prompt 0's n samples first).
`samples_to_batch` turns that list into the project's `RolloutBatch` (prompts left-padded, responses
right-padded, float32 log-probs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from advantage.batch import RolloutBatch

ChatMessage = dict[str, str]
Prompt = Sequence[ChatMessage] | Sequence[int]
FinishReason = Literal["stop", "length"]
LogprobsMode = Literal["raw_logprobs", "processed_logprobs"]


def chat_prompt_ids(tokenizer, messages: Sequence[ChatMessage]) -> list[int]:
    """The token ids a chat prompt is generated from: the model's chat template with the generation prompt,
    rendered to text, then encoded without special tokens (the template writes its own). The one way the project
    renders and counts a prompt: the engines, the data loader's `data.max_prompt_tokens` filter, the evaluation
    CLI, `credit` and the warm-start all call it. (`apply_chat_template(..., tokenize=True)` returns a
    `BatchEncoding` in transformers 5, whose `len()` is its number of keys, not of tokens.)"""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample. Field names follow vLLM's `SamplingParams`.

    temperature:    softmax temperature (> 0; greedy decoding is not supported for RL rollouts).
    top_p:          nucleus sampling mass in (0, 1]; 1 disables it.
    top_k:          keep the k most likely tokens; 0 disables it.
    max_tokens:     most response tokens per sample (EOS included); reaching it gives finish reason "length".
    stop:           strings that end a sample (finish reason "stop"); the tokens up to and including the one
                    that completes the string are kept in `response_ids`.
    stop_token_ids: token ids that end a sample besides the model's EOS (kept in `response_ids`).
    ignore_eos:     keep sampling past EOS (benchmarks: fixed-length responses).
    seed:           None for fresh randomness; otherwise sample i of global prompt p uses seed + p * n + i,
                    so results do not depend on how prompts are sharded over workers.
    n:              samples per prompt (the group size).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"SamplingConfig.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be 0 (off) or positive, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingConfig.max_tokens must be >= 1, got {self.max_tokens}")
        if self.n < 1:
            raise ValueError(f"SamplingConfig.n must be >= 1, got {self.n}")
        if isinstance(self.stop, str) or isinstance(self.stop_token_ids, int):
            raise TypeError("SamplingConfig.stop / stop_token_ids must be tuples, not a single value")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def sample_seed(self, prompt_index: int, sample_index: int) -> int | None:
        """The seed of sample `sample_index` of global prompt `prompt_index` (None when unseeded)."""
        return None if self.seed is None else self.seed + prompt_index * self.n + sample_index


@dataclass(frozen=True)
class Sample:
    """One sampled response.

    prompt_index:   which prompt of the batch given to `generate` it answers (global, in [0, num_prompts)).
    prompt_ids:     the prompt's token ids (chat template applied), length P_i.
    response_ids:   the sampled token ids, length T_i >= 1 (EOS / stop token included when it stopped on one).
    log_probs:      [T_i] float32, log-prob of each sampled token under the engine's weights (see the
                    engine's `logprobs_mode`).
    finish_reason:  "stop" (EOS, a stop token or a stop string) or "length" (max_tokens reached).
    policy_version: the version of the weights that generated it.
    text:           the decoded response (special tokens skipped), for reward functions.
    """

    prompt_index: int
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    log_probs: torch.Tensor
    finish_reason: FinishReason
    policy_version: int
    text: str = ""

    def __post_init__(self) -> None:
        if tuple(self.log_probs.shape) != (len(self.response_ids),) or self.log_probs.dtype != torch.float32:
            raise ValueError(
                f"Sample.log_probs must be float32 of shape ({len(self.response_ids)},), "
                f"got {self.log_probs.dtype} {tuple(self.log_probs.shape)}"
            )


def samples_to_batch(samples: Sequence[Sample], pad_token_id: int) -> RolloutBatch:
    """Pad a list of samples into a `RolloutBatch` (B = len(samples), rows in the given order).

    prompt_ids [B, P] int64 left-padded with `pad_token_id`, prompt_mask [B, P] bool; response_ids [B, T] int64
    right-padded (T >= 1: one column of padding when every response is empty), response_mask [B, T] bool (True
    on every sampled token, EOS included); rollout_log_probs [B, T] float32 (0 on padding); group_index [B] int64
    = prompt_index; policy_version = the samples' version (they must agree: a batch comes from one set of
    weights).
    """
    if not samples:
        raise ValueError("samples_to_batch: no samples")
    versions = sorted({s.policy_version for s in samples})
    if len(versions) != 1:
        raise ValueError(f"samples_to_batch: samples come from several policy versions {versions}")
    b = len(samples)
    p = max(len(s.prompt_ids) for s in samples)
    t = max(1, *(len(s.response_ids) for s in samples))  # >= 1 column: a batch of empty responses keeps [B, 1]
    prompt_ids = torch.full((b, p), pad_token_id, dtype=torch.int64)
    prompt_mask = torch.zeros((b, p), dtype=torch.bool)
    response_ids = torch.full((b, t), pad_token_id, dtype=torch.int64)
    response_mask = torch.zeros((b, t), dtype=torch.bool)
    rollout_log_probs = torch.zeros((b, t), dtype=torch.float32)
    for row, s in enumerate(samples):
        n_prompt, n_response = len(s.prompt_ids), len(s.response_ids)
        prompt_ids[row, p - n_prompt :] = torch.tensor(s.prompt_ids, dtype=torch.int64)
        prompt_mask[row, p - n_prompt :] = True
        response_ids[row, :n_response] = torch.tensor(s.response_ids, dtype=torch.int64)
        response_mask[row, :n_response] = True
        rollout_log_probs[row, :n_response] = s.log_probs
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        rollout_log_probs=rollout_log_probs,
        group_index=torch.tensor([s.prompt_index for s in samples], dtype=torch.int64),
        policy_version=versions[0],
    )
