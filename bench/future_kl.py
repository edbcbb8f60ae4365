"""Benchmark FIPO's discounted future sum on the official recipe's shape ([256, 20480] float32, τ = 32).

Compares, in one run on the same tensor:
* `advantage.discounted_future_sum` (hierarchical blocked scan, exact, O(B·T));
* `torch.cumsum` along the same axis (a single scan pass: the speed floor to aim at);
* the official chunked dense formulation (FIPO_SPEC §8.2: for every 128-wide chunk of future positions, a
  T × 128 decay matrix and a matmul; O(B·T²)), reimplemented here from the spec;
and reports the relative error of ours (and of the official form) against a float64 recurrence.

    python -m bench.future_kl [--batch 256] [--length 20480] [--repeats 20]
"""

from __future__ import annotations

import argparse

import torch

from advantage import discounted_future_sum, gamma_from_decay_rate
from bench.common import device_info, git_commit, print_result, time_fn


def official_chunked(values: torch.Tensor, gamma: float, chunk: int = 128) -> torch.Tensor:
    """The official code's formulation: F += D[:, chunk] @ W_chunkᵀ with W[t, k] = γ^(k−t)·[k ≥ t]."""
    _, length = values.shape
    out = torch.zeros_like(values)
    positions = torch.arange(length, dtype=values.dtype)
    for start in range(0, length, chunk):
        future = positions[start : start + chunk]
        dist = future[None, :] - positions[:, None]  # [T, K]: k − t
        weights = torch.where(dist >= 0, gamma ** dist.clamp(min=0), torch.zeros((), dtype=values.dtype))
        out += values[:, start : start + chunk] @ weights.T
    return out


def float64_recurrence(values: torch.Tensor, gamma: float) -> torch.Tensor:
    """F_t = x_t + γ·F_{t+1}, right to left, in float64 (the reference)."""
    x = values.double()
    out = torch.empty_like(x)
    acc = torch.zeros(x.shape[0], dtype=torch.float64)
    for t in range(x.shape[1] - 1, -1, -1):
        acc = x[:, t] + gamma * acc
        out[:, t] = acc
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=20480)
    parser.add_argument("--decay-rate", type=float, default=32.0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-official", action="store_true", help="skip the slow O(T²) official form")
    args = parser.parse_args()

    gamma = gamma_from_decay_rate(args.decay_rate)
    torch.manual_seed(0)
    # A realistic log-ratio: small drifts, masked by right padding (random lengths).
    values = torch.randn(args.batch, args.length) * 1e-2
    lengths = torch.randint(args.length // 4, args.length + 1, (args.batch,))
    values *= torch.arange(args.length)[None, :] < lengths[:, None]

    ours = time_fn(lambda: discounted_future_sum(values, gamma), args.repeats)
    cumsum = time_fn(lambda: torch.cumsum(values, dim=-1), args.repeats)
    print(f"discounted_future_sum: median {ours['median_s'] * 1e3:.2f} ms  (min {ours['min_s'] * 1e3:.2f})")
    print(f"torch.cumsum:          median {cumsum['median_s'] * 1e3:.2f} ms  (min {cumsum['min_s'] * 1e3:.2f})")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ours_1t = time_fn(lambda: discounted_future_sum(values, gamma), args.repeats)
    cumsum_1t = time_fn(lambda: torch.cumsum(values, dim=-1), args.repeats)
    torch.set_num_threads(threads)
    print(f"single thread: ours {ours_1t['median_s'] * 1e3:.2f} ms, cumsum {cumsum_1t['median_s'] * 1e3:.2f} ms")

    print("float64 reference recurrence ...", flush=True)
    reference = float64_recurrence(values, gamma)
    error = rel_err(discounted_future_sum(values, gamma), reference)
    print(f"relative error vs float64: {error:.3e}")

    result = {
        "bench": "future_kl",
        "shape": [args.batch, args.length],
        "decay_rate": args.decay_rate,
        "future_sum_s": round(ours["median_s"], 6),
        "cumsum_s": round(cumsum["median_s"], 6),
        "ratio_vs_cumsum": round(ours["median_s"] / cumsum["median_s"], 3),
        "ratio_vs_cumsum_1thread": round(ours_1t["median_s"] / cumsum_1t["median_s"], 3),
        "rel_err_vs_float64": error,
    }
    if not args.skip_official:
        print("official chunked form (O(T²), slow) ...", flush=True)
        official = time_fn(lambda: official_chunked(values, gamma), repeats=1, warmup=0)
        result["official_chunked_s"] = round(official["median_s"], 4)
        result["speedup_vs_official"] = round(official["median_s"] / ours["median_s"], 1)
        result["official_rel_err_vs_float64"] = rel_err(official_chunked(values[:8], gamma), reference[:8])
        print(f"official chunked: {official['median_s']:.2f} s")
    result.update(device_info(), commit=git_commit(), goal="rel_err <= 1e-6 and ratio_vs_cumsum <= 3")
    print_result(result)


if __name__ == "__main__":
    main()
