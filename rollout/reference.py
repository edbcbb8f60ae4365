"""Independent reference computations for tests and benchmarks: a plain transformers forward pass.

Deliberately shares no code with the engines: the log-prob of each response token is read off one full
forward pass of `AutoModelForCausalLM` over prompt + response, as the learner computes it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch


def load_reference_model(model_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None):
    """The model as transformers loads it (float32, eval mode), optionally with other weights loaded."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


@torch.no_grad()
def forward_log_probs(
    model, prompt_ids: Sequence[int], response_ids: Sequence[int], temperature: float = 1.0
) -> torch.Tensor:
    """[T] float32: log_softmax(logits / temperature) of each response token given everything before it."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    logits = model(ids).logits[0].float() / temperature
    log_probs = torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1 : -1]
    return log_probs.gather(-1, torch.tensor(list(response_ids))[:, None])[:, 0]


def max_abs_log_prob_error(model, samples) -> float:
    """The largest |sample.log_probs - forward pass| over all tokens of all samples."""
    return max(
        (s.log_probs - forward_log_probs(model, s.prompt_ids, s.response_ids)).abs().max().item() for s in samples
    )


def perturbed_state_dict(model_dir: str | os.PathLike, seed: int = 1, scale: float = 0.05) -> dict:
    """The model's weights plus seeded Gaussian noise: Hugging Face names, full float32 tensors."""
    state = load_reference_model(model_dir).state_dict()
    generator = torch.Generator().manual_seed(seed)
    return {name: t + scale * torch.randn(t.shape, generator=generator) for name, t in state.items()}
