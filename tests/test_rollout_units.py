"""Small pure pieces of the rollout package: padding into a RolloutBatch, weight buckets, prompt sharding."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rollout.engine import HeapTrimmer, iter_buckets, malloc_trim
from rollout.group import shard_prompts
from rollout.types import Sample, SamplingConfig, samples_to_batch

ROOT = Path(__file__).resolve().parents[1]


def test_iter_buckets_respects_the_byte_budget():
    tensors = [(f"t{i}", torch.zeros(10)) for i in range(5)]  # 40 bytes each
    assert [[n for n, _ in b] for b in iter_buckets(tensors, bucket_bytes=100)] == [
        ["t0", "t1"],
        ["t2", "t3"],
        ["t4"],
    ]
    assert len(list(iter_buckets([("big", torch.zeros(100))], bucket_bytes=8))) == 1


def test_samples_to_batch_pads_by_hand():
    lp = torch.tensor
    samples = [
        Sample(0, (5, 6, 7), (1,), lp([-0.5]), "stop", 2),
        Sample(0, (5, 6, 7), (1, 2, 3), lp([-0.1, -0.2, -0.3]), "length", 2),
        Sample(1, (8,), (4, 5), lp([-1.0, -2.0]), "stop", 2),
    ]
    batch = samples_to_batch(samples, pad_token_id=0)
    assert batch.prompt_ids.tolist() == [[5, 6, 7], [5, 6, 7], [0, 0, 8]]
    assert batch.prompt_mask.tolist() == [[True] * 3, [True] * 3, [False, False, True]]
    assert batch.response_ids.tolist() == [[1, 0, 0], [1, 2, 3], [4, 5, 0]]
    assert batch.response_mask.sum(-1).tolist() == [1, 3, 2]
    assert batch.rollout_log_probs.tolist()[2] == [-1.0, -2.0, 0.0]
    assert batch.group_index.tolist() == [0, 0, 1] and batch.policy_version == 2
    with pytest.raises(ValueError, match="several policy versions"):
        samples_to_batch([samples[0], Sample(0, (5,), (1,), lp([-0.5]), "stop", 3)], pad_token_id=0)
    with pytest.raises(ValueError, match="no samples"):
        samples_to_batch([], pad_token_id=0)


def test_shard_prompts_keeps_whole_prompts_in_order():
    assert shard_prompts(5, 2) == [(0, 3), (3, 5)]
    assert shard_prompts(2, 4) == [(0, 1), (1, 2)]  # fewer prompts than workers: idle workers get nothing
    assert shard_prompts(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_sampling_config_seeds_and_validation():
    sampling = SamplingConfig(n=4, seed=10, stop=["x"])
    assert sampling.stop == ("x",)
    assert [sampling.sample_seed(p, i) for p in range(2) for i in range(4)] == list(range(10, 18))
    assert SamplingConfig().sample_seed(3, 1) is None
    for bad in ({"top_p": 0.0}, {"top_k": -1}, {"max_tokens": 0}, {"n": 0}):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def test_drop_stderr_lines_filters_the_file_descriptor_and_keeps_the_rest_in_order():
    """What C++ code writes straight to fd 2 (as vLLM's CPU extension does its NUMA notice) is filtered by
    marker; every other line, Python's included, passes in order, and fd 2 is the original stream afterwards."""
    script = textwrap.dedent(
        """
        import os, sys
        from rollout.engine import NUMA_MEMBIND_NOTICE, drop_stderr_lines
        with drop_stderr_lines([NUMA_MEMBIND_NOTICE]):
            os.write(2, b"first\\n")
            os.write(2, b"[W utils.cpp:68] Warning: " + NUMA_MEMBIND_NOTICE + b" for memory allocation (0).\\n")
            print("second", file=sys.stderr, flush=True)
            os.write(2, b"unterminated")
        os.write(2, b"\\nafter\\n")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.decode() == "first\nsecond\nunterminated\nafter\n"


MALLOC_TRIM_CHILD = """
import ctypes, os, pathlib
from rollout.engine import malloc_trim

def rss():
    return int(pathlib.Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(4096) for _ in range(65536)]
for block in blocks:  # touch every page: resident
    ctypes.memset(block, 1, 4096)
for block in blocks[:-1]:
    libc.free(block)
before = rss()
malloc_trim()()
print(before - rss())
"""


@pytest.mark.skipif(malloc_trim() is None, reason="the C library is not glibc")
def test_malloc_trim_returns_the_freed_heap_to_the_system():
    """What the CPU engine calls once it has grown: blocks freed in the middle of glibc's heap stay resident until
    trimmed. 256 MiB of 4 KiB blocks (below the mmap threshold: heap, not mmap), all freed but the last, which pins
    the heap's top so that free() cannot shrink it; the trim must return most of the 256 MiB. In a child process:
    the freed 256 MiB would stay in this process's heap and serve later tests' large allocations."""
    child = subprocess.run([sys.executable, "-c", MALLOC_TRIM_CHILD], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    released = int(child.stdout.split()[-1])
    assert released > 192 * 2**20, f"malloc_trim released {released / 2**20:.0f} MiB of 256"


def test_heap_trimmer_trims_first_then_only_past_its_slack():
    """The engine's trimmer: a trim on the first call, none while the process stays within the slack of its size
    after that trim, one once it has grown past it (64 MiB touched against a 32 MiB slack)."""
    calls = []
    trimmer = HeapTrimmer(lambda: calls.append(1) or 1, slack_bytes=32 * 2**20)
    trimmer()
    trimmer()
    assert len(calls) == 1
    grown = bytes(64 * 2**20) + b"x"  # a new 64 MiB object, every page written
    trimmer()
    assert len(calls) == 2 and trimmer.trims == 2
    del grown


@pytest.mark.vllm
def test_the_reload_warning_is_dropped_only_for_tied_and_derived_buffer_layers():
    """An LM head tied to the embedding gets no tensor of its own in an update (the embedding's carries it), and
    a rotary embedding holds only a cache computed from the config: vLLM's "Failed to load weights" for them is
    dropped; an untied head of the same class elsewhere, or any other layer, still warns."""
    import logging

    from rollout.weight_transfer import FAILED_TO_LOAD, DerivedBufferReloadFilter, derived_buffer_layers, tied_layers

    class Embedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4, 2))

    class Head(torch.nn.Module):
        def __init__(self, weight=None):
            super().__init__()
            self.weight = weight if weight is not None else torch.nn.Parameter(torch.zeros(4, 2))

    class Rotary(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cos_sin_cache", torch.zeros(3), persistent=False)

    class Model(torch.nn.Module):
        def __init__(self, tied: bool):
            super().__init__()
            self.embed = Embedding()
            self.rotary = Rotary()
            self.mlp = torch.nn.Linear(2, 2)
            self.head = Head(self.embed.weight if tied else None)

    assert tied_layers(Model(tied=True)) == {"Head"} and tied_layers(Model(tied=False)) == set()
    assert derived_buffer_layers(Model(tied=True)) == {"Rotary"}
    quiet = DerivedBufferReloadFilter(derived_buffer_layers(Model(True)) | tied_layers(Model(True)))

    def warning(layer: str) -> logging.LogRecord:
        return logging.LogRecord("vllm", logging.WARNING, __file__, 1, FAILED_TO_LOAD, (layer,), None)

    assert not quiet.filter(warning("Head")) and not quiet.filter(warning("Rotary"))
    assert quiet.filter(warning("Linear")) and quiet.filter(warning("Embedding"))
