"""Checks against an independent float64 computation, with float32 rounding bounds (tests/fp_bounds.py): an
engine's per-token log-probs (`check_sample_log_probs`), and that learner layouts (world sizes, packing,
micro-batch splits, chunked heads, ...) compute the same update (`check_first_step`, `check_second_step`).

A run is `Run(old_log_probs, metrics, after_first, final)`: π_old of the whole batch, the metrics of each
mini-batch, the full state (`full_state_dict(optimizer=True)`) after the first mini-batch's optimizer step and
at the end. `start` is the model's state before any step.

First mini-batch (π_θ = π_old: r ≡ 1 and FIPO's weights ≡ 1; `check_first_step`):
* π_old: every log-prob within the decoder's rounding bound of the float64 forward (`fp.log_prob_bound`);
* the loss −Σ Â / N (N: the mini-batch's response tokens), within the rounding bound of that sum;
* the summed gradient, read from AdamW's first moment (m = (1 − β1)·g after one step): ‖ĝ − g‖ ≤ b =
  γ̃(n)·‖Σ_samples |g_sample|‖ over all parameters, n = two passes' roundings plus the sum over the mini-batch's
  tokens. A lost token, or rank gradients averaged instead of summed, is 1e-2 to 0.5 of ‖g‖, far above it. The
  reported gradient norm is then within b of ‖g‖;
* the weights after that step. AdamW's first step is θ(1 − lr·λ) − lr·g / (|g| + ε) per element, so where |g| is
  within rounding of ε = 1e-8 the gradient's last digits move a weight by up to ~lr (issue 25 saw 2.2e-5
  relative per tensor after a training step, world size 1 vs 2). Each run's weights equal that step computed in
  float64 from its own moments, to rounding (`fp.adamw_first_step`), and two runs differ by at most twice the
  step's spread over the gradient's bound (`fp.adamw_first_step_spread`) plus that rounding: every weight
  difference is gradient rounding amplified by 1 / (|g| + ε), not a different update.

Second mini-batch (FIPO live: log π_θ ≠ log π_old; `check_second_step`): two runs' gradients (from the moments:
g = (m₂ − β1·m₁) / (1 − β1)) within 2·b₂ of each other, b₂ the same bound scaled by the second mini-batch's
per-sample gradients at the initial weights, ×1.3 for FIPO's weights ≤ 1.2 and ratios ≈ 1 after one step of
lr ≤ 1e-3; hence gradient norms within 2·b₂; mean entropies within twice the entropy bound plus their sum's.
The weights after the second step are not compared elementwise: they are AdamW of inputs checked here, and a
second-step gradient element within rounding of 0 would legitimately move a weight by up to 2·lr.
"""

from __future__ import annotations

import copy
import itertools
from typing import NamedTuple

import fp_bounds as fp
import torch
from transformers import AutoModelForCausalLM

from learner.config import LearnerConfig

BETA1 = 0.9


class Run(NamedTuple):
    old_log_probs: torch.Tensor
    metrics: list[dict[str, float]]
    after_first: dict
    final: dict


def float64_reference(model_dir, batch) -> dict:
    """An independent float64 computation of a mini-batch at the weights in `model_dir`: transformers in float64,
    one unpadded sample at a time. With π_θ = π_old, r ≡ 1 and FIPO's weights are 1, so the loss is −Σ Â / N and
    its gradient −Σ_t Â_t ∇log π(y_t) / N. Returns log_probs, log_prob_bound, entropy_bound ([B, T] float64; the
    bounds from tests/fp_bounds.py), grad (by HF name), abs_grad (Σ over samples of |each sample's gradient|) and
    roundings (of the longest path through one forward pass)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    params = dict(model.named_parameters())
    per_token = ("log_probs", "log_prob_bound", "entropy_bound")
    out = {k: torch.zeros(batch.response_ids.shape, dtype=torch.float64) for k in per_token}
    out["grad"] = {k: torch.zeros_like(v) for k, v in params.items()}
    out["abs_grad"] = {k: torch.zeros_like(v) for k, v in params.items()}
    seq_len = int(batch.prompt_mask.sum(-1).max() + batch.response_mask.sum(-1).max())
    out["roundings"] = fp.decoder_roundings(model.config, seq_len)
    num_tokens = int(batch.response_mask.sum())
    for i in range(batch.num_samples):
        prompt = batch.prompt_ids[i][batch.prompt_mask[i]]
        n = int(batch.response_mask[i].sum())
        response = batch.response_ids[i, :n]
        logits = model(input_ids=torch.cat([prompt, response])[None]).logits[0, len(prompt) - 1 : -1]
        log_probs = torch.log_softmax(logits, -1).gather(-1, response[:, None])[:, 0]
        out["log_probs"][i, :n] = log_probs.detach()
        out["log_prob_bound"][i, :n] = fp.log_prob_bound(logits.detach(), out["roundings"])
        out["entropy_bound"][i, :n] = fp.entropy_bound(logits.detach(), out["roundings"])
        loss = -(batch.advantages[i, :n].double() * log_probs).sum() / num_tokens
        for name, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            out["grad"][name] += g
            out["abs_grad"][name] += g.abs()
    return out


def check_sample_log_probs(model, samples, temperature: float = 1.0, at_least: bool = False) -> None:
    """Each sample's per-token log-probs (an engine's: vLLM's or HFEngine's `Sample.log_probs`, of logits / T)
    within the decoder's float32 bound of a float64 forward of `model` (a transformers model; a float64 copy of it
    is used, the model itself is left as it is). `at_least`: only no smaller than it, beyond that bound (top-k
    or top-p renormalisation can only raise a log-prob)."""
    model64 = copy.deepcopy(model).double().eval()
    for s in samples:
        ids = torch.tensor([list(s.prompt_ids) + list(s.response_ids)])
        with torch.no_grad():
            logits = model64(ids).logits[0, len(s.prompt_ids) - 1 : -1] / temperature
        want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.response_ids)[:, None])[:, 0]
        bound = fp.log_prob_bound(logits, fp.decoder_roundings(model.config, ids.shape[1]) + 1)  # + the 1 / T
        err = (want - s.log_probs.double()) if at_least else (s.log_probs.double() - want).abs()
        assert (err <= bound).all(), (
            f"log-prob error {float(err.max()):.2e} > bound ({float((err / bound).max()):.2f}x)"
        )


def check_log_probs(log_probs: torch.Tensor, ref: dict, what: str = "") -> None:
    """Every log-prob [B, T] (0 on padding) within its bound of the float64 reference's."""
    err = (log_probs.double() - ref["log_probs"]).abs()
    assert (err <= ref["log_prob_bound"]).all(), (what, float((err / ref["log_prob_bound"].clamp(min=1e-30)).max()))


def _norm(tensors) -> float:
    return sum(float(t.double().square().sum()) for t in tensors) ** 0.5


def _gradient_bound(ref: dict, batch) -> float:
    """γ̃(n)·‖Σ_samples |g_sample|‖, n = forward + backward + the sum over the mini-batch's tokens."""
    n = 2 * ref["roundings"] + int(batch.response_mask.sum())
    return fp.probabilistic_gamma(n) * _norm(ref["abs_grad"].values())


def check_first_step(model_dir, first, config: LearnerConfig, start: dict, runs: dict[str, Run]) -> dict:
    """The first mini-batch `first` of every run against `float64_reference` (module docstring). `config`: the
    learner config the runs share (optimizer, schedule, clipping). Returns the reference."""
    ref = float64_reference(model_dir, first)
    clip = 1.0
    if config.optimizer.grad_clip is not None:  # the learner clips the global norm (a no-op below the limit)
        clip = min(1.0, config.optimizer.grad_clip / (_norm(ref["grad"].values()) + 1e-6))
    grad_bound = clip * _gradient_bound(ref, first)
    advantages = first.advantages.double()[first.response_mask]
    loss = float(-advantages.sum() / len(advantages))
    loss_bound = float(fp.sum_error(torch.zeros_like(advantages), advantages.abs(), first.response_mask.numel()))
    loss_bound /= len(advantages)
    opt = config.optimizer
    lr = opt.lr * config.lr_schedule.lr_factor(0)
    rounding = {}
    for name, run in runs.items():
        check_log_probs(run.old_log_probs[: first.num_samples], ref, name)
        assert abs(run.metrics[0]["learner/loss"] - loss) <= loss_bound, name
        moments = run.after_first["optimizer"]["state"]
        error = _norm(moments[k]["exp_avg"].double() / (1 - BETA1) - clip * g for k, g in ref["grad"].items())
        assert error <= grad_bound, (name, error, grad_bound)
        # the reported norm is the one before clipping: |‖ĝ‖ − ‖g‖| ≤ ‖ĝ − g‖ ≤ b / clip
        assert abs(run.metrics[0]["learner/grad_norm"] - _norm(ref["grad"].values())) <= grad_bound / clip, name
        for key, theta in start.items():
            want, bound = fp.adamw_first_step(
                theta, moments[key]["exp_avg"], moments[key]["exp_avg_sq"], lr=lr, weight_decay=opt.weight_decay,
                eps=opt.eps, betas=opt.betas,
            )  # fmt: skip
            assert ((run.after_first["model"][key].double() - want).abs() <= bound).all(), (name, key)
            rounding[name, key] = bound
    for (a, run_a), (b, run_b) in itertools.combinations(runs.items(), 2):
        for key, g in ref["grad"].items():
            spread = fp.adamw_first_step_spread(clip * g, grad_bound, lr=lr, eps=opt.eps)
            diff = (run_a.after_first["model"][key].double() - run_b.after_first["model"][key].double()).abs()
            assert (diff <= 2 * spread + rounding[a, key] + rounding[b, key]).all(), (a, b, key)
        _check_pair_metrics(run_a.metrics[0], run_b.metrics[0], ref, first)
    return ref


def _check_pair_metrics(a: dict, b: dict, ref: dict, batch) -> None:
    """Token counts equal, learning rates equal, mean entropies within twice the entropy bound plus their sum's
    rounding (over every position of the mini-batch)."""
    assert a["learner/response_tokens"] == b["learner/response_tokens"]
    assert a["learner/lr"] == b["learner/lr"]
    mean_bound = float(ref["entropy_bound"].max()) + fp.gamma(batch.response_mask.numel()) * abs(a["learner/entropy"])
    assert abs(a["learner/entropy"] - b["learner/entropy"]) <= 2 * mean_bound


def check_second_step(model_dir, rest, runs: dict[str, Run]) -> None:
    """The second mini-batch `rest` (FIPO live) of every pair of runs (module docstring)."""
    ref = float64_reference(model_dir, rest)
    bound = 1.3 * _gradient_bound(ref, rest)
    grads = {}
    for name, run in runs.items():
        m1, m2 = run.after_first["optimizer"]["state"], run.final["optimizer"]["state"]
        grads[name] = {k: (m2[k]["exp_avg"].double() - BETA1 * m1[k]["exp_avg"].double()) / (1 - BETA1) for k in m1}
    for (a, run_a), (b, run_b) in itertools.combinations(runs.items(), 2):
        assert _norm(grads[a][k] - grads[b][k] for k in grads[a]) <= 2 * bound, (a, b)
        assert abs(run_a.metrics[1]["learner/grad_norm"] - run_b.metrics[1]["learner/grad_norm"]) <= 2 * bound
        _check_pair_metrics(run_a.metrics[1], run_b.metrics[1], ref, rest)
