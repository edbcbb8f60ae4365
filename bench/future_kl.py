"""Benchmark FIPO's discounted future sum on the official recipe's shape ([256, 20480] float32, τ = 32).

Compares, in one run on the same tensor:
* `advantage.discounted_future_sum` (hierarchical blocked scan, exact, O(B·T));
* `torch.cumsum` along the same axis (a single scan pass: the speed floor to aim at);
* the official chunked dense formulation (FIPO_SPEC §8.2: for every 128-wide chunk of future positions, a
  T × 128 decay matrix and a matmul; O(B·T²)), reimplemented here from the spec;
and reports the relative error of ours (and of the official form) against a float64 recurrence.

On a CUDA device (the default when one is visible; `--device cpu` forces the CPU benchmark above) it times, on
device tensors with CUDA events, rotating over enough input/output buffers that they do not fit in L2:
* the Triton kernel (advantage/future_sum_triton.py), unmasked and masked, over a small sweep of its tuning
  knobs (sub-block K, sub-blocks per tile S, warps), reporting each config and the best;
* a device copy of the same tensor (`torch.empty_like(x).copy_(x)`) and a large 1 GiB copy: the device's own
  bandwidth ceiling, measured in the same run. Achieved GB/s = (bytes read + bytes written) / time; the
  kernel's ratio to the copy's GB/s is the goal metric (goal ≥ 0.5);
* torch.cumsum, the torch (matmul) path of `discounted_future_sum` on the GPU, and the official chunked form;
and the relative errors against the float64 recurrence.

    python -m bench.future_kl [--batch 256] [--length 20480] [--repeats 20] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from advantage import discounted_future_sum, gamma_from_decay_rate
from bench.common import device_info, git_commit, print_result, time_fn


def official_chunked(values: torch.Tensor, gamma: float, chunk: int = 128) -> torch.Tensor:
    """The official code's formulation: F += D[:, chunk] @ W_chunkᵀ with W[t, k] = γ^(k−t)·[k ≥ t]."""
    _, length = values.shape
    out = torch.zeros_like(values)
    positions = torch.arange(length, dtype=values.dtype, device=values.device)
    for start in range(0, length, chunk):
        future = positions[start : start + chunk]
        dist = future[None, :] - positions[:, None]  # [T, K]: k − t
        weights = torch.where(dist >= 0, gamma ** dist.clamp(min=0), torch.zeros((), dtype=values.dtype))
        out += values[:, start : start + chunk] @ weights.T
    return out


def float64_recurrence(values: torch.Tensor, gamma: float) -> torch.Tensor:
    """F_t = x_t + γ·F_{t+1}, right to left, in float64 (the reference)."""
    x = values.double().cpu()
    out = torch.empty_like(x)
    acc = torch.zeros(x.shape[0], dtype=torch.float64)
    for t in range(x.shape[1] - 1, -1, -1):
        acc = x[:, t] + gamma * acc
        out[:, t] = acc
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double().cpu() - want).norm() / want.norm()).item()


# ------------------------------------------------------------------------------------------------------------
# GPU


def device_time(fns: list[Callable[[], object]], repeats: int, device: torch.device) -> dict:
    """Per-call seconds of `fns` (one call each per round, rotating buffers): median and min over `repeats`
    rounds, timed with CUDA events (perf_counter on CPU, for the smoke run), after a warm-up round."""
    for fn in fns:  # warm-up: compilation, autotuning caches, allocator
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for fn in fns:
                fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3 / len(fns))
        else:
            begin = time.perf_counter()
            for fn in fns:
                fn()
            times.append((time.perf_counter() - begin) / len(fns))
    return {"median_s": statistics.median(times), "min_s": min(times)}


def copy_time(numel: int, repeats: int, device: torch.device) -> dict:
    """`device_time` of one device-to-device copy of `numel` float32 values (freed afterwards)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return device_time([lambda: dst.copy_(src)], repeats, device)


KERNEL_CONFIGS = [  # (sub_block K, sub_blocks S, num_warps)
    (16, 64, 4),
    (16, 64, 8),
    (16, 32, 4),
    (16, 128, 8),
    (32, 32, 4),
    (32, 32, 8),
    (16, 16, 2),
]


def gpu_main(args, gamma: float, device: torch.device) -> None:
    """The CUDA benchmark (see the module docstring); also runs on CPU tensors under TRITON_INTERPRET=1 as a
    smoke test of this code (`--device cpu --smoke`), whose timings mean nothing."""
    from advantage.future_sum_triton import future_sum_triton

    torch.manual_seed(0)
    batch, length = args.batch, args.length
    numel = batch * length
    l2_bytes = 64 << 20  # ≥ the L2 of an H100 (50 MB) / H200 (60 MB)
    copies = 1 if args.smoke else max(2, -(-4 * l2_bytes // (8 * numel)))  # inputs+outputs ≥ 4× L2
    xs, masks, outs = [], [], []
    for _ in range(copies):
        x = torch.randn(batch, length, device=device) * 1e-2
        lengths = torch.randint(length // 4, length + 1, (batch,), device=device)
        xs.append(x)
        masks.append(torch.arange(length, device=device)[None, :] < lengths[:, None])
        outs.append(torch.empty_like(x))
    bytes_plain = 8 * numel  # float32 read + float32 write
    bytes_masked = 9 * numel  # + a 1-byte mask read
    result: dict = {"bench": "future_kl_gpu", "shape": [batch, length], "decay_rate": args.decay_rate}

    def gbps(nbytes: int, seconds: float) -> float:
        return round(nbytes / seconds / 1e9, 1)

    copy = device_time([lambda i=i: outs[i].copy_(xs[i]) for i in range(copies)], args.repeats, device)
    big_numel = (1 << 16) if args.smoke else (1 << 28)  # 1 GiB of float32 (2 GiB moved per copy)
    big_copy = copy_time(big_numel, args.repeats, device)
    result["copy_same_shape_gbps"] = gbps(bytes_plain, copy["median_s"])
    result["copy_1gib_gbps"] = gbps(8 * big_numel, big_copy["median_s"])
    copy_gbps = max(result["copy_same_shape_gbps"], result["copy_1gib_gbps"])
    print(f"device copy: same shape {result['copy_same_shape_gbps']} GB/s, 1 GiB {result['copy_1gib_gbps']} GB/s")

    configs = KERNEL_CONFIGS[:2] if args.smoke else KERNEL_CONFIGS
    sweep = []
    for k, s, warps in configs:
        kw = {"sub_block": k, "sub_blocks": s, "num_warps": warps}
        plain = device_time(
            [lambda i=i, kw=kw: future_sum_triton(xs[i], gamma, out=outs[i], **kw) for i in range(copies)],
            args.repeats,
            device,
        )
        masked = device_time(
            [lambda i=i, kw=kw: future_sum_triton(xs[i], gamma, masks[i], out=outs[i], **kw) for i in range(copies)],
            args.repeats,
            device,
        )
        row = {
            "K": k, "S": s, "num_warps": warps,
            "plain_us": round(plain["median_s"] * 1e6, 1), "plain_gbps": gbps(bytes_plain, plain["median_s"]),
            "masked_us": round(masked["median_s"] * 1e6, 1), "masked_gbps": gbps(bytes_masked, masked["median_s"]),
        }  # fmt: skip
        sweep.append(row)
        print(f"triton K={k:3d} S={s:3d} warps={warps}: {row['plain_us']:8.1f} us {row['plain_gbps']:7.1f} GB/s"
              f" | masked {row['masked_us']:8.1f} us {row['masked_gbps']:7.1f} GB/s")  # fmt: skip
    best = max(sweep, key=lambda r: r["masked_gbps"])
    result["triton_sweep"] = sweep
    result["triton_best"] = best
    result["triton_masked_s"] = best["masked_us"] / 1e6
    result["triton_gbps_vs_copy"] = round(best["plain_gbps"] / copy_gbps, 3)
    result["triton_masked_gbps_vs_copy"] = round(best["masked_gbps"] / copy_gbps, 3)

    kw = {"sub_block": best["K"], "sub_blocks": best["S"], "num_warps": best["num_warps"]}
    cumsum = device_time(
        [lambda i=i: torch.cumsum(xs[i], dim=-1, out=outs[i]) for i in range(copies)], args.repeats, device
    )
    torch_path = device_time(
        [lambda i=i: discounted_future_sum(xs[i], gamma, masks[i], backend="torch") for i in range(copies)],
        max(3, args.repeats // 4),
        device,
    )
    result["cumsum_s"] = cumsum["median_s"]
    result["cumsum_gbps"] = gbps(bytes_plain, cumsum["median_s"])
    result["torch_path_masked_s"] = torch_path["median_s"]
    result["triton_speedup_vs_torch_path"] = round(torch_path["median_s"] / result["triton_masked_s"], 2)
    result["triton_ratio_vs_cumsum"] = round(best["plain_us"] / 1e6 / cumsum["median_s"], 3)
    print(f"torch.cumsum {cumsum['median_s'] * 1e6:.1f} us ({result['cumsum_gbps']} GB/s); torch path (matmul scan) "
          f"masked {torch_path['median_s'] * 1e6:.1f} us")  # fmt: skip

    x0, m0 = xs[0], masks[0]
    reference = float64_recurrence(torch.where(m0, x0, 0.0), gamma)
    result["triton_rel_err_vs_float64"] = rel_err(future_sum_triton(x0, gamma, m0, **kw), reference)
    result["torch_path_rel_err_vs_float64"] = rel_err(discounted_future_sum(x0, gamma, m0, backend="torch"), reference)
    result["triton_rel_diff_vs_torch_path"] = (
        future_sum_triton(x0, gamma, m0, **kw).double() - discounted_future_sum(x0, gamma, m0, backend="torch").double()
    ).norm().item() / reference.norm().item()
    if not args.skip_official:
        official = device_time([lambda: official_chunked(torch.where(m0, x0, 0.0), gamma)], 3, device)
        result["official_chunked_s"] = official["median_s"]
        result["triton_speedup_vs_official"] = round(official["median_s"] / result["triton_masked_s"], 1)
        result["official_rel_err_vs_float64"] = rel_err(official_chunked(torch.where(m0, x0, 0.0), gamma), reference)
        print(f"official chunked (O(T²)): {official['median_s'] * 1e3:.2f} ms")
    print(f"best triton config {kw}: {best['masked_us']} us masked = {result['triton_masked_gbps_vs_copy']} of copy;"
          f" rel err vs float64 {result['triton_rel_err_vs_float64']:.2e}")  # fmt: skip
    result.update(device_info(), commit=git_commit(), buffers=copies, smoke=args.smoke)
    if device.type == "cuda":
        import triton

        props = torch.cuda.get_device_properties(device)
        result.update(triton=triton.__version__, cuda=torch.version.cuda, sms=props.multi_processor_count)
    result["goal"] = "triton_gbps_vs_copy >= 0.5 and triton_rel_err_vs_float64 <= 1e-6"
    print_result(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=20480)
    parser.add_argument("--decay-rate", type=float, default=32.0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-official", action="store_true", help="skip the slow O(T²) official form")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if visible")
    parser.add_argument("--smoke", action="store_true", help="with --device cpu: run the GPU code path on CPU "
                        "tensors under TRITON_INTERPRET=1 (a code check; timings mean nothing)")  # fmt: skip
    args = parser.parse_args()

    gamma = gamma_from_decay_rate(args.decay_rate)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" or args.smoke:
        gpu_main(args, gamma, torch.device(device))
        return
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
