"""Triton kernel for FIPO's discounted inclusive future sum on CUDA tensors (the CPU/torch path stays the reference).

    F[n, t] = Σ_{k ≥ t} γ^(k−t) · mask[n, k] · values[n, k]        (FIPO_SPEC §3.3; same as `discounted_future_sum`)

Shapes and dtypes: `values` [..., T] float32 (float16 / bfloat16 are read as float32, computed in float32 and
cast back, as the torch path does; float64 is not handled here: `discounted_future_sum` keeps it on the torch
path); `mask` None or the same shape, bool or 0/1 of any dtype, folded into the kernel's loads. Returns the
input's shape and dtype. No autograd (FIPO calls it under no-grad on the detached log-ratio).

Design (one pass over memory: `values` and `mask` read once, F written once). One program per row walks the
row right to left in tiles of TILE = S·K positions, each tile viewed as S sub-blocks of K:

1. `local = X[S, K] @ M[K, K]` with M[k, j] = γ^(k−j)·[k ≥ j]: every position's discounted sum within its own
   sub-block (a float32 `tl.dot` with input_precision="ieee": plain FMAs, no tf32 rounding).
2. `h[s] = local[s, 0]`: each sub-block's sum discounted to its first position. What this tile carries into
   sub-block s from its right, G[s] = Σ_{s' > s} γ^(K(s'−s−1))·h[s'] (F at the first position of sub-block
   s+1, counting this tile only), is one [S]×[S, S] product; base[s, j] = local[s, j] + γ^(K−j)·G[s].
3. F[p] = base[p] + γ^(TILE−p)·carry, where `carry` is F at the first position of the tile to the right
   (0 for the last tile), and the next carry is Σ_p γ^p·x[p] + γ^TILE·carry. Everything but this one scalar
   FMA is independent of the carry, so tiles are chained by one multiply-add, not by a block-wide reduction.

Every decay factor is a float32 rounding of a power of γ computed in float64 on the host (tables cached per
γ, K, S and device), never a product of rounded γ's: a chained product γ_f32^k drifts by k·|γ_f32 − γ|/γ
(~6e-5 relative at k = 1024 for γ near 1), which would break the 1e-6 agreement with the float64 recurrence.
Powers that underflow are 0 and contribute nothing (γ = 0 and γ^TILE = 0 are handled with no special case);
γ = 1 is the plain suffix sum. The only loop-carried value is the scalar carry, so the next tile's loads are
issued before the current tile is computed (a register double buffer).

Memory-bound budget at [256, 20480] float32: 42 MB moved (read + write), ~14 µs at 3 TB/s. Arithmetic:
~2K + 2S/K + 6 flops per element (46 at K = 16, S = 64), ~0.25 GFLOP, small beside the bytes only if the
FMA-path dot runs well; bench/future_kl.py sweeps (K, S, num_warps) on the GPU. Parallelism is one program
per row (256 at the benchmark's shape, ~2 per SM): enough bytes in flight for bandwidth only if each tile's
latency stays near its share of the bandwidth (~1.4 µs per 1024-tile at half of 3 TB/s). With a few rows
(the learner's micro-batches) the call is latency-bound, tens of µs, negligible beside the model. If the
GPU measurement falls short, the next step is a grid over (row, segment) chained by a decoupled look-back.
Not yet compiled or timed on a GPU (checked in the interpreter only).

Dispatch (advantage/future_sum.py): `discounted_future_sum` uses this kernel automatically when `values` is a
CUDA tensor of float32 / float16 / bfloat16, autograd is not recording through it, and triton imports;
otherwise the torch path. Importing this module imports triton (keep the import lazy). Under
TRITON_INTERPRET=1 (set before this module is imported) the kernel also runs on CPU tensors, which is how the
tests check it on a machine without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DEFAULT_SUB_BLOCK = 16  # K: positions per sub-block (the dot's inner size; tl.dot needs >= 16)
DEFAULT_SUB_BLOCKS = 64  # S: sub-blocks per tile; TILE = S·K = 1024 positions per loop iteration
DEFAULT_NUM_WARPS = 4

_TABLE_CACHE: dict[tuple, torch.Tensor] = {}
_TABLE_CACHE_MAX = 64


def decay_tables(gamma: float, sub_block: int, sub_blocks: int, device: torch.device) -> torch.Tensor:
    """The kernel's decay factors, float64 powers of γ rounded once to float32, concatenated in one tensor
    (TILE = S·K, p = s·K + j the position within a tile):
    M [K, K] (M[k, j] = γ^(k−j) for k ≥ j, else 0), W1 [K] (γ^(K−j)), W2 [S, S] (γ^(K(s'−s−1)) for s' > s,
    else 0), HEAD [TILE] (γ^p: a tile discounted to its first position), TAIL [TILE] (γ^(TILE−p): the carry
    from the next tile's start), and γ^TILE. Cached per (γ, K, S, device)."""
    key = (float(gamma), sub_block, sub_blocks, str(device))
    table = _TABLE_CACHE.get(key)
    if table is None:
        k, s = sub_block, sub_blocks
        g = torch.tensor(float(gamma), dtype=torch.float64)
        jk = torch.arange(k, dtype=torch.float64)
        dist = jk[:, None] - jk[None, :]  # k − j
        m = torch.where(dist >= 0, torch.pow(g, dist.clamp(min=0)), 0.0)
        w1 = torch.pow(g, k - jk)
        js = torch.arange(s, dtype=torch.float64)
        sdist = js[:, None] - js[None, :] - 1  # s' − s − 1
        w2 = torch.where(sdist >= 0, torch.pow(g, k * sdist.clamp(min=0)), 0.0)
        p = torch.arange(s * k, dtype=torch.float64)
        head, tail = torch.pow(g, p), torch.pow(g, s * k - p)
        g_tile = torch.pow(g, float(s * k)).reshape(1)
        table = torch.cat([m.flatten(), w1, w2.flatten(), head, tail, g_tile]).to(torch.float32).to(device)
        if len(_TABLE_CACHE) >= _TABLE_CACHE_MAX:
            _TABLE_CACHE.clear()
        _TABLE_CACHE[key] = table
    return table


@triton.jit
def _future_sum_kernel(
    x_ptr,
    mask_ptr,
    out_ptr,
    table_ptr,
    length,
    HAS_MASK: tl.constexpr,
    K: tl.constexpr,
    S: tl.constexpr,
):
    """One row of F: tiles of S×K positions, right to left (see the module docstring)."""
    TILE: tl.constexpr = S * K
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * length
    m_row = mask_ptr + row * length
    o_row = out_ptr + row * length

    sub = tl.arange(0, S)
    lane = tl.arange(0, K)
    offs = sub[:, None] * K + lane[None, :]  # [S, K] position within a tile
    # decay tables (float32 roundings of float64 powers), loaded once per program
    dec = tl.load(table_ptr + lane[:, None] * K + lane[None, :])  # [K, K]
    w1 = tl.load(table_ptr + K * K + lane)  # [K]
    w2 = tl.load(table_ptr + K * K + K + sub[:, None] * S + sub[None, :])  # [S, S]
    head = tl.load(table_ptr + K * K + K + S * S + offs)  # [S, K] γ^p
    tail = tl.load(table_ptr + K * K + K + S * S + TILE + offs)  # [S, K] γ^(TILE − p)
    g_tile = tl.load(table_ptr + K * K + K + S * S + 2 * TILE)  # γ^TILE
    first_col = lane[None, :] == 0

    num_tiles = tl.cdiv(length, TILE)
    pos = (num_tiles - 1) * TILE + offs
    valid = pos < length
    x = tl.load(x_row + pos, mask=valid, other=0.0).to(tl.float32)
    if HAS_MASK:
        keep = tl.load(m_row + pos, mask=valid, other=0)
        x = tl.where(keep != 0, x, 0.0)
    carry = tl.zeros((), dtype=tl.float32)  # F at the first position of the tile to the right
    for _ in range(num_tiles):
        # prefetch the tile to the left (none after the first tile): its loads do not wait on the carry
        next_pos = pos - TILE
        next_valid = (next_pos >= 0) & (next_pos < length)
        x_next = tl.load(x_row + next_pos, mask=next_valid, other=0.0).to(tl.float32)
        if HAS_MASK:
            keep_next = tl.load(m_row + next_pos, mask=next_valid, other=0)
            x_next = tl.where(keep_next != 0, x_next, 0.0)

        # everything up to `base` and `tile_head` is independent of the carry: only one scalar FMA chains tiles
        local = tl.dot(x, dec, input_precision="ieee")  # [S, K] sums within each sub-block
        heads = tl.sum(tl.where(first_col, local, 0.0), axis=1)  # [S] sub-block sums at their first position
        into = tl.sum(heads[:, None] * w2, axis=0)  # [S] F at the start of sub-block s + 1, from this tile only
        base = local + into[:, None] * w1[None, :]  # F of this tile with no carry from the right
        tile_head = tl.sum(x * head)  # the tile's sum discounted to its first position (= base[0, 0])
        tl.store(o_row + pos, base + tail * carry, mask=valid)
        carry = tile_head + g_tile * carry

        pos = next_pos
        valid = next_valid
        x = x_next


def future_sum_triton(
    values: torch.Tensor,
    gamma: float,
    mask: torch.Tensor | None = None,
    *,
    sub_block: int = DEFAULT_SUB_BLOCK,
    sub_blocks: int = DEFAULT_SUB_BLOCKS,
    num_warps: int = DEFAULT_NUM_WARPS,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """F[..., t] = Σ_{k≥t} γ^(k−t)·mask[..., k]·values[..., k] with the Triton kernel.

    Args:
        values: [..., T] float32 / float16 / bfloat16, CUDA (or CPU under TRITON_INTERPRET=1).
        gamma: decay in [0, 1].
        mask: None or [..., T] (bool or 0/1), True where a position contributes.
        sub_block, sub_blocks: K (a power of two >= 16) and S (a power of two >= 16); tuning knobs only.
        num_warps: warps per program (tuning).
        out: optional contiguous float32 tensor of `values`' shape and device to write F into (float32
            inputs only); it is returned.
    Returns: [..., T] tensor of the input's dtype.
    """
    if values.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"future_sum_triton handles float32/float16/bfloat16, got {values.dtype}")
    if not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    for name, n in (("sub_block", sub_block), ("sub_blocks", sub_blocks)):
        if n < 16 or n & (n - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {n}")
    shape = values.shape
    length = shape[-1] if values.dim() else 0
    if values.numel() == 0:
        return torch.zeros(shape, dtype=values.dtype, device=values.device)
    x = values.reshape(-1, length).contiguous()
    if mask is not None:
        if mask.shape != shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != values shape {tuple(shape)}")
        m = mask.reshape(-1, length)
        m = (m if m.dtype == torch.bool else m != 0).contiguous().view(torch.uint8)
    else:
        m = x  # never read (HAS_MASK=False)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=x.device)
    elif out.shape != shape or out.dtype != torch.float32 or not out.is_contiguous() or values.dtype != out.dtype:
        raise ValueError("out must be a contiguous float32 tensor of values' shape (with float32 values)")
    table = decay_tables(gamma, sub_block, sub_blocks, x.device)
    _future_sum_kernel[(x.shape[0],)](
        x, m, out, table, length, HAS_MASK=mask is not None, K=sub_block, S=sub_blocks, num_warps=num_warps
    )
    return out.to(values.dtype)
