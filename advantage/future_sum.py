"""FIPO's discounted future sum ("Future-KL"), exact and O(B·T), without dense T×T or T×128 decay matrices.

    F[b, t] = Σ_{k ≥ t} γ^(k−t) · mask[b, k] · values[b, k]        (inclusive of t; FIPO_SPEC §3.3)

How (FIPO_SPEC §8.2, "blocked scan", made hierarchical so it has no Python loop over blocks):

1. Cut the time axis into blocks of K. One batched matmul with the K×K upper-triangular decay matrix gives
   every position's discounted sum *within its own block*.
2. The sum of each block discounted to its first position (column 0 of step 1) is a sequence of length T/K
   whose own discounted future sum, with decay γ^K, is the value carried into each block from the blocks to
   its right. That is the same problem, T/K times smaller: solve it recursively.
3. Add the carry from the next block, decayed by γ^(K−j) to local position j.

Every step is a sum of non-negative powers of γ times the inputs, so it is exact for any γ in [0, 1] (powers
that underflow to 0 contribute nothing, as they should). The rescaled-cumsum trick γ^(−t)·cumsum(γ^k·x) is
deliberately not used: γ^(−t) overflows float32 at T = 20480 (FIPO_SPEC §8.2).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

# Block width of the scan. 32 keeps the per-element matmul work small (2·K flops per element) while making
# the recursion two levels deep for T = 20480; any value gives the same result (the tests check 1, 3, ...).
DEFAULT_BLOCK_SIZE = 32


def gamma_from_decay_rate(decay_rate: float) -> float:
    """FIPO's decay γ = 2^(−1/τ) for a half-life of τ = decay_rate tokens (γ^τ = 1/2). τ must be > 0."""
    if not decay_rate > 0:
        raise ValueError(f"decay_rate (half-life in tokens) must be > 0, got {decay_rate}")
    return 2.0 ** (-1.0 / decay_rate)


def _decay_matrix(block_size: int, gamma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[K, K] matrix M with M[k, t] = γ^(k−t) for k ≥ t else 0, so that (x @ M)[t] = Σ_{k≥t} γ^(k−t) x[k]."""
    idx = torch.arange(block_size, dtype=torch.float64)
    dist = idx[:, None] - idx[None, :]  # k - t
    mat = torch.where(dist >= 0, torch.pow(torch.tensor(gamma, dtype=torch.float64), dist.clamp(min=0)), 0.0)
    return mat.to(dtype=dtype, device=device)


def _future_sum_2d(x: torch.Tensor, gamma: float, block_size: int) -> torch.Tensor:
    """Discounted inclusive future sum along the last axis of a 2-D tensor [N, T]."""
    n, t = x.shape
    k = block_size
    if k == 1:  # chunks of one: the plain right-to-left recurrence F_t = x_t + γ·F_{t+1} (slow; a reference)
        out = torch.empty_like(x)
        acc = torch.zeros(n, dtype=torch.float64, device=x.device)  # float64 carry: no drift over long T
        for i in range(t - 1, -1, -1):
            acc = x[:, i].double() + gamma * acc
            out[:, i] = acc.to(x.dtype)
        return out
    if t <= k:  # a single block: one small matmul
        return x @ _decay_matrix(t, gamma, x.dtype, x.device)
    num_blocks = -(-t // k)
    if num_blocks * k != t:  # right-pad with zeros: they add nothing to any sum
        x = torch.nn.functional.pad(x, (0, num_blocks * k - t))
    blocks = x.view(n, num_blocks, k)
    local = blocks @ _decay_matrix(k, gamma, x.dtype, x.device)  # [N, nb, K] sums within each block
    gamma_k = gamma**k
    heads = local[:, :, 0]  # each block's sum discounted to its first position
    if gamma_k == 0.0:
        # γ^K underflows: a block's start only reaches the tail of the block before it, never further back.
        starts = heads
    else:
        # starts[:, b] = F at the first position of block b (the whole future, recursively).
        starts = _future_sum_2d(heads.contiguous(), gamma_k, block_size)
    # F at the start of the next block (0 after the last one).
    carry = torch.nn.functional.pad(starts[:, 1:], (0, 1))
    exponents = torch.arange(k, 0, -1, dtype=torch.float64, device=x.device)  # K − j for local position j
    decay_to_next = torch.pow(torch.tensor(gamma, dtype=torch.float64), exponents).to(x.dtype)
    local.addcmul_(carry.unsqueeze(-1), decay_to_next)
    return local.view(n, num_blocks * k)[:, :t]


BACKENDS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def triton_available() -> bool:
    """True when the Triton kernel module imports (triton installed; checked once per process)."""
    try:
        import advantage.future_sum_triton  # noqa: F401
    except ImportError:
        return False
    return True


_triton_failure: list[str] = []  # set once the kernel failed to compile or launch under backend="auto"


def _use_triton(values: torch.Tensor, backend: str) -> bool:
    """The dispatch rule of `discounted_future_sum` (see its `backend` argument)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        needs_grad = values.requires_grad and torch.is_grad_enabled()
        if _triton_failure or not (values.is_cuda and values.dtype in _TRITON_DTYPES and not needs_grad):
            return False
        return triton_available()
    return backend == "triton"


def discounted_future_sum(
    values: torch.Tensor,
    gamma: float,
    mask: torch.Tensor | None = None,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    backend: str = "auto",
) -> torch.Tensor:
    """F[..., t] = Σ_{k≥t} γ^(k−t) · mask[..., k] · values[..., k], inclusive of t.

    Args:
        values: [B, T] (any leading dims) float tensor; float32 or float64 (computed in that dtype; lower
            precisions are computed in float32 and cast back).
        gamma: the per-token decay, 0 ≤ γ ≤ 1 (FIPO: γ = 2^(−1/decay_rate); see `gamma_from_decay_rate`).
        mask: optional [B, T] tensor (bool or 0/1), True/1 where a position contributes. Masked positions
            contribute nothing; with right padding F is then 0 on padding.
        block_size: width K of the blocked scan (a tuning knob only: every K gives the same result). The
            Triton kernel ignores it.
        backend: "auto" (default): the Triton kernel (advantage/future_sum_triton.py) when `values` is a CUDA
            tensor of float32/float16/bfloat16, autograd is not recording through `values`, and triton
            imports; the torch path below otherwise (always on CPU; it is the reference). If the kernel
            raises under "auto" (say it fails to compile), a RuntimeWarning says so once and the process
            uses the torch path from then on. "torch" forces the
            torch path; "triton" forces the kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1).

    Returns:
        [B, T] tensor of the input's dtype. Differentiable (plain matmuls and adds), though FIPO calls it
        under no-grad on the detached log-ratio. Memory O(B·T) beyond the K×K decay matrix.
    """
    if not (isinstance(gamma, (int, float)) and 0.0 <= gamma <= 1.0 and math.isfinite(gamma)):
        raise ValueError(f"gamma must be a float in [0, 1], got {gamma!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if values.dim() == 0:
        raise ValueError("values must have a time axis (shape [..., T])")
    if mask is not None and mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != values shape {tuple(values.shape)}")
    if _use_triton(values, backend):
        from advantage.future_sum_triton import future_sum_triton  # optional: Triton, on a GPU only

        try:
            return future_sum_triton(values, float(gamma), mask)
        except Exception as error:  # a kernel that fails to compile or launch must not stop training
            if backend == "triton":
                raise
            _triton_failure.append(f"{type(error).__name__}: {error}")
            warnings.warn(
                f"discounted_future_sum: the Triton kernel failed ({_triton_failure[0]}); using the torch path "
                "from now on in this process",
                RuntimeWarning,
                stacklevel=2,
            )
    x = values
    if mask is not None:
        x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    out_dtype = x.dtype
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    shape = x.shape
    if shape[-1] == 0 or x.numel() == 0:
        return torch.zeros(shape, dtype=out_dtype, device=x.device)
    out = _future_sum_2d(x.reshape(-1, shape[-1]), float(gamma), block_size)
    return out.reshape(shape).to(out_dtype)
