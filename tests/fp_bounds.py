"""Float32 rounding-error bounds for the tests that compare float32 results with a float64 reference (or with
each other). A tolerance built here follows from the computation, so it holds on any CPU, SIMD width and
thread count; it is not what happened to pass on one machine.

The model (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., §2.2-§3.1):
* every float32 operation returns its exact result times (1 + θ) with |θ| ≤ U = 2^-24 (round to nearest; a
  fused multiply-add rounds once, which can only help);
* a value that went through at most n such roundings, each a relative perturbation, is within
  γ(n) = n·U / (1 − n·U) of its exact value, relatively;
* a sum of N terms in ANY order or grouping (sequential, pairwise, SIMD lanes, threads, a blocked GEMM) is
  within γ(N − 1)·Σ|terms| of the exact sum. This is why a bound is needed at all: which order the hardware
  picks depends on the machine and on the tensor's length (padding moves block and vector boundaries);
* torch's float32 `exp` on the CPU (SLEEF's 1-ulp routines in vectorised loops, libm in scalar tails) is
  within EXP_ULPS ulps; one ulp of x is at most 2·U·|x|.

Discrete decisions (a clip or dual-clip branch, the participation filter r ≤ c, the safety rule, dropping a
sequence) are taken on float32 values that agree with the exact ones to a few ulps; a token that sits within
a few ulps of a threshold, whose branch could flip, has probability ~1e-7 per token for the tests' random
inputs, and the bounds below assume the branches agree.

Everything here computes in float64 and returns float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import fipo_reference as ref
import torch

from advantage.future_sum import DEFAULT_BLOCK_SIZE

U = 2.0**-24
"""Unit roundoff of float32 (round to nearest)."""
EXP_ULPS = 2.0
"""Error of torch's float32 exp in ulps (SLEEF's expf is ≤ 1.0 ulp, glibc's < 1 ulp; 2 leaves room)."""
EXP_REL = 2.0 * EXP_ULPS * U
"""Relative error of one float32 exp."""


def gamma(n: int | float) -> float:
    """γ(n) = n·U / (1 − n·U): relative error after n roundings (n·U < 1)."""
    if not n * U < 1:
        raise ValueError(f"γ({n}) is undefined for float32 (n·U ≥ 1)")
    return n * U / (1 - n * U)


def rel_after_tensor(*relative_errors: torch.Tensor | float) -> torch.Tensor:
    """Relative error of a product of factors with these relative errors, Π(1 + ε_i) − 1, elementwise (float64
    tensors or floats)."""
    out = torch.ones((), dtype=torch.float64)
    for e in relative_errors:
        out = out * (1.0 + torch.as_tensor(e, dtype=torch.float64))
    return out - 1.0


def scan_roundings(length: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Roundings any one term of `discounted_future_sum` (advantage/future_sum.py) goes through, at most, on
    its way into F[t], for a time axis of `length`.

    block_size 1 is a float64 recurrence rounded once to float32 (2 covers the float64 error for any length
    below 2^28). Otherwise, while the axis is longer than K it is cut into blocks of K and the blocks' heads
    form the next, K times shorter level; the last level is one block of t ≤ K. Per level a term meets its
    decay factor rounded to float32 (1), the within-block dot product of at most min(K, t) terms (1 product
    + at most min(K, t) − 1 additions), and the carry into the block before it: the carry's decay factor
    rounded (1), the product (1) and the addition (1). So at most Σ_levels (min(K, t_level) + 4).
    """
    if block_size == 1:
        return 2
    roundings, t = 0, length
    while t > block_size:
        roundings += block_size + 4
        t = -(-t // block_size)
    return roundings + t + 4


def abs_future_sum(values: torch.Tensor, gamma_: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """S[b, t] = Σ_{k≥t} γ^(k−t)·mask·|values|, exactly (float64 recurrence of fipo_reference): [B, T]."""
    rows = values.double().abs().tolist()
    masks = [None] * len(rows) if mask is None else mask.bool().tolist()
    return torch.tensor([ref.future_sum(r, gamma_, m) for r, m in zip(rows, masks)], dtype=torch.float64)


def future_sum_bound(
    values: torch.Tensor,
    gamma_: float,
    mask: torch.Tensor | None = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    input_rel_error: float = 0.0,
) -> torch.Tensor:
    """Elementwise bound [B, T] on |discounted_future_sum(values, γ, mask) − F| for float32 `values` [B, T],
    F the exact discounted sum of the same values: γ(roundings)·S, S the discounted sum of |values|.

    `input_rel_error`: the values themselves carry this relative error (e.g. U for a rounded difference);
    it adds input_rel_error·S.
    """
    n = scan_roundings(values.shape[-1], block_size)
    return (gamma(n) + input_rel_error * (1 + gamma(n))) * abs_future_sum(values, gamma_, mask)


def k3_error(log_ratio: float) -> float:
    """Bound on the float32 error of Schulman's k3 = e^x − x − 1 at x = log_ratio (advantage/losses.py
    `kl_penalty`, the mismatch metric): exp's error (EXP_REL·e^x), two roundings of sums of magnitude ≤ e^x + |x| + 1,
    and x's own rounding (U·|x|) times the slope |e^x − 1|. The cancellation is what makes this matter: near
    x = 0 the value is ~x²/2, far smaller than the terms."""
    e = math.exp(log_ratio)
    return EXP_REL * e + gamma(2) * (e + abs(log_ratio) + 1) + U * abs(log_ratio) * abs(e - 1)


def max_min_error(eps: torch.Tensor | float) -> torch.Tensor:
    """Relative error of max(a', b') (or min) against max(a, b) when a', b' carry relative errors ≤ ε.

    If the same branch wins, the error is that branch's: ≤ ε·|result|. If the winner changes, the two exact
    values lie within their errors of each other, and the error is ≤ ε·|other| ≤ ε·|result|·(1 + ε)/(1 − ε).
    """
    eps = torch.as_tensor(eps, dtype=torch.float64)
    return eps * (1 + eps) / (1 - eps)


def sum_error(err: torch.Tensor, mag: torch.Tensor, num_terms: int) -> torch.Tensor:
    """Bound on |fl(Σ x̂_i) − Σ x_i| for `num_terms` terms (the zeros of masked positions included), given
    |x̂_i − x_i| ≤ err_i and |x_i| ≤ mag_i: Σ err + γ(N − 1)·Σ (mag + err), in any summation order."""
    return err.sum() + gamma(max(num_terms - 1, 0)) * (mag + err).sum()


def aggregate_bound(
    err: torch.Tensor, mag: torch.Tensor, mask: torch.Tensor, mode: str, normalizer: float | None = None
) -> float:
    """Bound on |aggregate_loss(ℓ̂, mask, mode) − aggregate of the exact ℓ| (advantage/losses.py) for
    per-token losses [B, T] with |ℓ̂_t − ℓ_t| ≤ err_t and |ℓ_t| ≤ mag_t; masked positions count as terms of
    the sums (they are multiplied by 0, exactly). `normalizer`: the denominator the loss was given (None =
    the local count). Divisions round once (U relative)."""
    mask = mask.bool()
    err = torch.where(mask, err.double(), 0.0)
    mag = torch.where(mask, mag.double(), 0.0)
    batch, length = mask.shape
    if mode == "seq-mean-token-mean":
        counts = mask.sum(-1).clamp(min=1).double()
        row_err = torch.stack([sum_error(e, m, length) for e, m in zip(err, mag)]) / counts
        row_mag = mag.sum(-1) / counts
        row_err = row_err + U * (row_mag + row_err)  # the division by the row's count
        total_err = sum_error(row_err, row_mag, batch)
        total_mag = row_mag.sum()
        denom = normalizer if normalizer is not None else float(mask.any(-1).sum())
    else:
        total_err = sum_error(err, mag, batch * length)
        total_mag = mag.sum()
        if normalizer is not None:
            denom = normalizer
        elif mode == "token-mean":
            denom = float(mask.sum())
        else:
            denom = float(mask.any(-1).sum())
        if mode == "seq-mean-token-sum-norm":
            denom *= length
    denom = max(denom, 1.0)
    return float((total_err + U * (total_mag + total_err)) / denom)


def fipo_error_terms(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, response_mask: torch.Tensor, gamma_: float, clip_c: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(future-KL error bound, influence-weight relative error bound), both [B, T] float64, for FIPO's
    float32 computation (advantage/losses.py `fipo_policy_loss`) against the exact one on the same inputs.

    F sums the participating Δ's, each rounded once: `future_sum_bound` with input error U. The weight
    f = clip(exp(clip(F))) has relative error ≤ e^(|ΔF| + U)·(1 + EXP_REL) − 1 (clipping is 1-Lipschitz
    in log space; its float32 bounds are rounded: U); the safety rule's clamp to [0.8, 1] adds nothing.
    """
    delta = (log_probs.double() - old_log_probs.double()).clamp(-20.0, 20.0)
    participates = response_mask.bool() & (delta <= math.log(clip_c))
    f_err = future_sum_bound(torch.where(participates, delta, 0.0), gamma_, participates, input_rel_error=U)
    return f_err, torch.exp(f_err + U) * (1 + EXP_REL) - 1


@dataclass(frozen=True)
class TokenBounds:
    """Exact per-token values of a policy loss and the bounds on a float32 computation's errors, [B, T] float64.

    token_losses: the exact per-token loss ℓ.  token_err: bound on |ℓ̂ − ℓ|.
    keep: [B, T] bool, tokens in the loss (the mask, minus sequences the dual-clip rule drops).
    weights / weight_err: FIPO's exact influence weights and the bound on |f̂ − f| (1 / 0 for PPO).
    advantage_err: relative error bound of the advantage each token's loss uses (Â, or FIPO's Ã = Â·f).
    ratio_err: relative error bound of r = exp(Δ).
    """

    token_losses: torch.Tensor
    token_err: torch.Tensor
    keep: torch.Tensor
    weights: torch.Tensor
    weight_err: torch.Tensor
    advantage_err: torch.Tensor
    ratio_err: torch.Tensor

    def loss_bound(self, mode: str = "token-mean", normalizer: float | None = None) -> float:
        """Bound on |loss_fn(...) − exact loss| for aggregation `mode` (see `aggregate_bound`)."""
        return aggregate_bound(self.token_err, self.token_losses.abs(), self.keep, mode, normalizer)

    def grad_rel_error(self) -> torch.Tensor:
        """Relative error bound [B, T] of d loss / d log π per token: the active branch's −Ã·r/N (Ã, r as
        above; the product by −Ã, autograd's exp backward and the divisions by N and, in the seq-mean modes,
        by the sequence's count or horizon round once each); clipped tokens have gradient 0 exactly."""
        return rel_after_tensor(self.advantage_err, self.ratio_err, U, U, U, U)


def ratio_rel_error(log_probs: torch.Tensor, old_log_probs: torch.Tensor) -> torch.Tensor:
    """Relative error bound [B, T] of float32 r = exp(clamp(log π − log π_old)): the difference rounds once
    (|ΔΔ| ≤ U·|Δ|), exp adds EXP_REL."""
    delta = (log_probs.double() - old_log_probs.double()).clamp(-20.0, 20.0)
    return torch.exp(U * delta.abs()) * (1 + EXP_REL) - 1


def ppo_bounds(log_probs, old_log_probs, advantages, response_mask, *, clip_low=0.2, clip_high=0.28, clip_c=10.0):
    """TokenBounds of `ppo_policy_loss` (no KL term) on float32 tensors [B, T] against fipo_reference.

    Each branch (−Â·r, −Â·clip(r), −Â·c) is one product (U) of factors carrying the advantage's and the
    ratio's errors, with clip bounds rounded once (U); max, then min, add `max_min_error` twice."""
    rows = [x.double().tolist() for x in (log_probs, old_log_probs, advantages)]
    losses = torch.tensor(
        [ref.ppo_token_losses(a, b, c, clip_low=clip_low, clip_high=clip_high, c=clip_c) for a, b, c in zip(*rows)],
        dtype=torch.float64,
    )
    ratio_err = ratio_rel_error(log_probs, old_log_probs)
    token_err = max_min_error(max_min_error(rel_after_tensor(ratio_err, U, U))) * losses.abs()
    zero = torch.zeros_like(losses)
    return TokenBounds(losses, token_err, response_mask.bool(), zero + 1, zero, zero, ratio_err)


def fipo_bounds(log_probs, old_log_probs, advantages, response_mask, config) -> TokenBounds:
    """TokenBounds of `fipo_policy_loss(..., config)` (a FIPOLossConfig) on float32 tensors [B, T], from the
    float64 reference (tests/fipo_reference.py) and `fipo_error_terms`: Ã = Â·f rounds once more (U)."""
    kw = dict(
        clip_low=config.clip_low,
        clip_high=config.clip_high,
        c=config.clip_c,
        tau=config.decay_rate,
        eps_f=config.weight_clip,
        high_only=config.weight_clip_high_only,
        safety=config.safety_threshold,
    )
    rows = [x.double().tolist() for x in (log_probs, old_log_probs, advantages)] + [response_mask.bool().tolist()]
    out = [ref.fipo_token_losses(lp, lo, a, m, **kw) for lp, lo, a, m in zip(*rows)]
    losses = torch.tensor([o[0] for o in out], dtype=torch.float64)
    weights = torch.tensor([o[1] for o in out], dtype=torch.float64)
    keep = response_mask.bool()
    if config.drop_seq_on_dual_clip:
        keep = keep & torch.tensor([o[3] <= 1 for o in out])[:, None]
    _, weight_rel = fipo_error_terms(log_probs, old_log_probs, response_mask, config.gamma, config.clip_c)
    advantage_err = rel_after_tensor(weight_rel, U)
    ratio_err = ratio_rel_error(log_probs, old_log_probs)
    token_err = max_min_error(max_min_error(rel_after_tensor(advantage_err, ratio_err, U, U))) * losses.abs()
    return TokenBounds(losses, token_err, keep, weights, weight_rel * weights, advantage_err, ratio_err)


# ----------------------------------------------------------------------------------------------------------
# A transformer's forward and backward. A worst-case bound through a nonlinear network is not practical (its
# Jacobians can amplify an error), so these use probabilistic rounding-error analysis (Higham & Mary, "A New
# Approach to Probabilistic Rounding Error Analysis", SIAM J. Sci. Comput. 41(5), 2019): with independent
# rounding errors, a value computed through n roundings has relative error ≤ γ̃(n, λ) = exp(λ·√n·U + n·U²/(1 − U)) − 1
# with probability ≥ 1 − 2n·exp(−λ²(1 − U)²/2). λ = 10 makes that failure probability < 1e-17 per value.
# The n below is the LONGEST chain of roundings any value passes through (every dot product at its full
# length), not a typical one.

LAMBDA = 10.0


def probabilistic_gamma(n: int, lam: float = LAMBDA) -> float:
    """γ̃(n, λ): the probabilistic counterpart of γ(n) (see above)."""
    return math.expm1(lam * math.sqrt(n) * U + n * U * U / (1 - U))


def decoder_roundings(config, seq_len: int) -> int:
    """Roundings along the longest path of one forward pass of a Qwen2/Llama-style decoder with `config` (a
    transformers config) over `seq_len` positions, up to the log-softmax of the LM head.

    Per layer: RMSNorm (a sum of H squares, mean, rsqrt, two products: H + 4), a q/k/v projection (H + 1 with
    bias), rotary (3), q·k (head_dim) and its scale (1), softmax over seq_len keys (max, exp, sum, divide:
    seq_len + 3), attention × V (seq_len), the output projection (H), the residual add (1), RMSNorm (H + 4),
    gate/up projections (H), SiLU and the product (4), the down projection (I), the residual add (1). Then the
    final RMSNorm (H + 4), the LM head (H) and log-softmax over the vocabulary (V + 3)."""
    h, i = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    per_layer = (h + 4) + (h + 1) + 3 + head_dim + 1 + (seq_len + 3) + seq_len + h + 1 + (h + 4) + h + 4 + i + 1
    return config.num_hidden_layers * per_layer + (h + 4) + h + config.vocab_size + 3


def log_prob_bound(logits: torch.Tensor, n: int) -> torch.Tensor:
    """Bound [M] on |log p̂ − log p| of float32 log-probs whose logits [M, V] (float64, exact) were computed
    through n roundings: a relative error ε of every logit moves z_target by ≤ ε·|z| and logsumexp(z) by
    ≤ ε·max|z| (its gradient is the softmax, which sums to 1), so ≤ 2·γ̃(n)·max_v |z_v|, plus one rounding of the
    result (U·|log p| ≤ U·(2·max|z| + log V))."""
    zmax = logits.abs().amax(-1)
    return 2 * probabilistic_gamma(n) * zmax + U * (2 * zmax + math.log(logits.shape[-1]))


def entropy_bound(logits: torch.Tensor, n: int) -> torch.Tensor:
    """Bound [M] on the error of float32 entropies H = logsumexp(z) − Σ_v p_v·z_v whose logits [M, V] (float64,
    exact) were computed through n roundings: a relative error ε of every logit moves logsumexp by ≤ ε·max|z|,
    Σ p·z by ≤ ε·max|z| through z and by ≤ 2ε·max|z|² through p (∂p_v/∂z = p_v·(e_v − p)); so
    γ̃(n)·(2·max|z| + 2·max|z|²), plus the rounding of H's own sum over V terms (γ(V + 3)·(max|z| + log V))."""
    zmax = logits.abs().amax(-1)
    vocab = logits.shape[-1]
    return probabilistic_gamma(n) * (2 * zmax + 2 * zmax**2) + gamma(vocab + 3) * (zmax + math.log(vocab))


def adamw_first_step(theta, exp_avg, exp_avg_sq, *, lr, weight_decay, eps, betas=(0.9, 0.999)):
    """AdamW's first step (torch.optim.AdamW, step 1) in float64 from the parameters before it and the moments
    after it: θ·(1 − lr·λ) − lr/(1 − β1) · m / (√(v / (1 − β2)) + ε), and a bound on its float32 rounding: the
    decay product and the final add round |θ| (2U), the division, square roots, ε add and step size round the
    update (8U). Returns (θ', bound), float64."""
    theta, m, v = (x.double() for x in (theta, exp_avg, exp_avg_sq))
    update = lr / (1 - betas[0]) * m / ((v / (1 - betas[1])).sqrt() + eps)
    new = theta * (1 - lr * weight_decay) - update
    return new, 2 * U * (theta.abs() + new.abs()) + 8 * U * update.abs()


def adamw_first_step_spread(grad, grad_bound, *, lr, eps):
    """How far AdamW's first step can move a weight when its gradient g is only known to ± `grad_bound`:
    lr · max |φ(g') − φ(g)| over |g' − g| ≤ b, with φ(g) = g / (|g| + ε) the first step's direction (m̂ = g,
    √v̂ = |g|). φ is increasing, so the extremes are at g ± b. Where |g| ≫ b this is ≈ lr·ε·b / g²; where the
    interval holds 0 (the sign can flip) it reaches up to 2·lr."""
    grad = grad.double()

    def phi(g):
        return g / (g.abs() + eps)

    return lr * torch.maximum(phi(grad + grad_bound) - phi(grad), phi(grad) - phi(grad - grad_bound))
