"""Per-token log-probs (and entropy) from the LM head without a [tokens × vocab] float32 tensor.

`head_log_probs(hidden, weight, token_ids, chunk_tokens=c)` returns log softmax(hidden · weightᵀ)[token] for
each of M positions. With c > 0 it never holds more than about c × V logits at once (V = vocab size):

* forward, in chunks of c positions: logits = hidden_chunk · weightᵀ (the parameters' dtype), cast to float32,
  log-prob = logit[token] − logsumexp(logits), entropy (optional, no grad) = logsumexp − Σ softmax · logits;
  saved for backward: hidden [M, H], the token ids and the logsumexp [M] (nothing of size V).
* backward, in slices of the vocabulary (about c · V / M columns, so the same c × V budget): the slice's logits
  are recomputed, g · (onehot − softmax) formed in float32, then weight_grad[slice] = gᵀ · hidden (one GEMM
  over all M positions, rounded once, as the unchunked backward does) and hidden_grad += g · weight[slice]
  (accumulated in float32). Exact gradients; the head GEMM runs twice in backward instead of once.

c = 0 is the reference: the [M, V] logits at once (`token_log_probs` / `entropy_from_logits`), what the learner
did before; tests check the chunked path against it and against a float64 autograd computation.
"""

from __future__ import annotations

import torch


def token_log_probs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] in float32.

    Args:
        logits: [..., V] any float dtype, the model's prediction for each position.
        token_ids: [...] int64, the tokens whose log-probs are wanted.
    Returns: [...] float32.
    """
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, float32, no grad. logits: [..., V] → [...]."""
    with torch.no_grad():
        logits = logits.detach().float()
        probs = torch.softmax(logits, dim=-1)
        return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


class _ChunkedHeadLogProbs(torch.autograd.Function):
    """(hidden [M, H], weight [V, H], token_ids [M], chunk_tokens, with_entropy) → (log_probs [M] float32,
    entropy [M] float32 or [0]); see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, token_ids, chunk_tokens, with_entropy):
        num = hidden.shape[0]
        log_probs = torch.empty(num, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(log_probs)
        entropy = torch.empty(num if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        for start in range(0, num, chunk_tokens):
            sl = slice(start, start + chunk_tokens)
            logits = torch.nn.functional.linear(hidden[sl], weight).float()  # [c, V]
            lse[sl] = torch.logsumexp(logits, dim=-1)
            log_probs[sl] = logits.gather(-1, token_ids[sl].unsqueeze(-1)).squeeze(-1) - lse[sl]
            if with_entropy:
                probs = torch.softmax(logits, dim=-1)
                entropy[sl] = lse[sl] - probs.mul_(logits).sum(-1)
            del logits
        ctx.save_for_backward(hidden, weight, token_ids, lse)
        ctx.chunk_tokens = chunk_tokens
        ctx.mark_non_differentiable(entropy)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, _grad_entropy):
        hidden, weight, token_ids, lse = ctx.saved_tensors
        num, vocab = hidden.shape[0], weight.shape[0]
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad = grad_log_probs.float()
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want_hidden else None
        grad_weight = torch.empty_like(weight) if want_weight else None
        width = max(1, ctx.chunk_tokens * vocab // max(num, 1))  # vocab columns per slice: the same c × V budget
        for start in range(0, vocab, width):
            stop = min(vocab, start + width)
            w = weight[start:stop]
            logits = torch.nn.functional.linear(hidden, w).float()  # [M, slice]
            grad_logits = torch.exp(logits.sub_(lse.unsqueeze(-1))).mul_(-grad.unsqueeze(-1))  # −g · softmax
            in_slice = (token_ids >= start) & (token_ids < stop)  # + g at the token's own column
            column = (token_ids - start).clamp(0, stop - start - 1).unsqueeze(-1)
            grad_logits.scatter_add_(-1, column, torch.where(in_slice, grad, 0.0).unsqueeze(-1))
            grad_logits = grad_logits.to(hidden.dtype)
            del logits
            if want_weight:
                torch.mm(grad_logits.t(), hidden, out=grad_weight[start:stop])
            if want_hidden:
                grad_hidden += torch.mm(grad_logits, w).float()
        if want_hidden:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None


def head_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    chunk_tokens: int,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of `token_ids` under softmax(hidden · weightᵀ), and optionally the entropy (no grad).

    Args:
        hidden: [M, H] final hidden states (after the last norm) at the M positions that predict a token; any
            float dtype (the parameters' compute dtype).
        weight: [V, H] the LM head (no bias), same dtype as `hidden`.
        token_ids: [M] int64, the predicted tokens.
        chunk_tokens: positions per chunk (peak extra memory ≈ a few × chunk_tokens × V float32 values);
            0 = all M positions at once (the reference path).
        with_entropy: also return the entropy of each position's distribution (detached).
    Returns: (log_probs [M] float32 with grad to hidden and weight, entropy [M] float32 or None).
    """
    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be >= 0, got {chunk_tokens}")
    if chunk_tokens == 0:
        logits = torch.nn.functional.linear(hidden, weight)
        entropy = entropy_from_logits(logits) if with_entropy else None
        return token_log_probs(logits, token_ids), entropy
    log_probs, entropy = _ChunkedHeadLogProbs.apply(hidden, weight, token_ids, chunk_tokens, with_entropy)
    return log_probs, entropy if with_entropy else None
