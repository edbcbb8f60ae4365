"""Shared helpers for benchmarks: timing, environment description, the final JSON line."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch


def git_commit() -> str:
    """Short commit of the working tree, with '+dirty' when it has changes; 'unknown' outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_info() -> dict:
    """What ran the benchmark: CPU model and threads, or the GPU name; torch version."""
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    else:
        cpu = "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        info["device"] = cpu
    return info


def time_fn(fn: Callable[[], object], repeats: int, warmup: int = 2) -> dict:
    """Run `fn` warmup + repeats times; return min and median seconds (synchronising CUDA if used)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return {"min_s": min(times), "median_s": statistics.median(times)}


def print_result(result: dict) -> None:
    """The benchmark's last line: one compact JSON object."""
    print(json.dumps(result, separators=(",", ":"), default=str), flush=True)
