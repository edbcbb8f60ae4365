"""Peak memory of a region of code, for the learner's benchmark and tests.

`PeakMemory(device)` is a context manager: on a GPU the peak of `torch.cuda.max_memory_allocated` over the
region minus the allocated bytes at its start (PyTorch's tensors only); on the CPU the growth of the
process's peak resident set (Linux: VmHWM, reset at the start by writing 5 to /proc/self/clear_refs) over its
resident set at the start, which counts everything the process touches (tensors, allocator caches, libraries).

`AllocatedPeak()` is the CPU's counterpart of `torch.cuda.max_memory_allocated`: the peak, over the region, of
the bytes PyTorch's CPU allocator holds for tensors allocated in it, from the allocation and free events
`torch.profiler` records with `profile_memory=True`. It leaves out what RSS adds (glibc's arenas
and fragmentation, pages touched by libraries), so it is what a prediction of tensor memory is checked against.
"""

from __future__ import annotations

import re

import torch


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1)) * 1024


def host_rss_bytes() -> int:
    """Resident set size of this process now (Linux)."""
    return _proc_status_bytes("VmRSS")


class PeakMemory:
    """Peak memory over a `with` block (see the module docstring). After the block: `.bytes`, the growth over
    the start; `.peak_bytes`, the peak itself (CUDA: allocated bytes; CPU: resident set)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.bytes = 0
        self._start = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self._start = host_rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self.bytes = _proc_status_bytes("VmHWM") - self._start

    @property
    def peak_bytes(self) -> int:
        return self._start + self.bytes

    @property
    def gib(self) -> float:
        return self.bytes / 2**30


class AllocatedPeak:
    """Peak growth of tensor bytes held by PyTorch's CPU allocator over a `with` block (module docstring).
    After the block: `.bytes`. The profiler cannot see the size of a tensor allocated before the block, so
    freeing one inside it does not lower the count (it warns once): `.bytes` is the peak of the bytes of
    tensors allocated inside the block and still alive, which is what a learner update adds to its resident
    parameters and optimizer state when the previous update's gradients are freed at its start."""

    def __init__(self) -> None:
        self.bytes = 0
        self._profile = None

    def __enter__(self) -> AllocatedPeak:
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profile.__exit__(*exc)
        events = self._profile.profiler.kineto_results.events()
        cpu = torch.autograd.DeviceType.CPU
        deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() == cpu)
        live = peak = 0
        for _, delta in deltas:
            live += delta
            peak = max(peak, live)
        self.bytes = peak
        self._profile = None
