"""What a run prints: the libraries' notices that tell the user nothing to act on stay out of the console, each
dropped by its message (never a whole logger, never every warning), and the progress bars of one-off loads are
off. Each noise is first produced by the library's own code path, then shown to be gone, next to a control of
the same logger or warning category that still prints.

The whole console of a run (a multi-node `ray job submit`) is checked in tests/test_multinode.py."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
QUIET = "--- quiet_vllm_notices ---"
CONSOLE_NOISE = (
    "is not found in LD_PRELOAD",  # vLLM's CPU worker, libtcmalloc and libiomp
    "Triton not available",  # torch, as vLLM loads its kernels
    "`torch.distributed.reduce_op` is deprecated",  # torch, as vLLM's dispatcher scans every module
    "Loading safetensors checkpoint shards",  # vLLM's load bar
    "Loading weights:",  # transformers' bar in the learner (vLLM's "Loading weights took ..." line is another)
    "Writing model shards",  # transformers' bar as the driver builds the tiny model
)
"""What no run's console holds (tests/test_multinode.py checks a whole job's output for it)."""
RAY_PREFIX_ONLY = re.compile(r"^(?:\x1b\[\d+m)?\([^()\n]*\bpid=\d+[^()\n]*\)(?:\x1b\[0m)?[ \t\r]*$", re.MULTILINE)
"""A line of a Ray worker's output with nothing after the prefix (what a progress bar leaves there)."""

# What a vLLM engine's start runs, as vLLM and torch run it: torch's search for the kernels of a Triton op (vLLM
# declares one while it loads its kernels), vLLM's kernel dispatcher's scan of every module's attributes, and the
# CPU worker's device set-up up to its LD_PRELOAD checks (then stopped, before any process group).
ENGINE_START = textwrap.dedent(
    """
    import logging, os, sys, types, warnings

    os.environ.pop("LD_PRELOAD", None)
    warnings.simplefilter("always", FutureWarning)  # every occurrence shows, not only a location's first
    import torch.distributed
    from torch._library.triton import get_inner_triton_kernels
    from vllm.triton_utils.dispatcher import _rebind_kernels
    from vllm.v1.worker import cpu_worker

    from rollout.engine import quiet_vllm_notices

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    cpu_worker.init_worker_distributed_environment = stop

    def kernel():
        pass

    def engine_start():
        get_inner_triton_kernels(kernel)
        _rebind_kernels([])
        worker = object.__new__(cpu_worker.CPUWorker)
        worker.vllm_config = types.SimpleNamespace(speculative_config=object())  # its libiomp notice: a control
        worker.distributed_init_method, worker.rank, worker.local_rank = "tcp://127.0.0.1:1", 0, 0
        try:
            worker.init_device()
        except Stop:
            pass
        return worker

    def flush():
        sys.stdout.flush()
        sys.stderr.flush()

    engine_start()
    flush()
    print("QUIET", file=sys.stderr, flush=True)
    quiet_vllm_notices()
    quiet_vllm_notices()  # idempotent
    worker = engine_start()
    # controls: the same loggers and warning category, other messages or another reader
    worker.sleep()
    logging.getLogger("torch._library.triton").warning("control: another torch Triton notice")
    torch.distributed.reduce_op.SUM
    warnings.warn("control: another FutureWarning", FutureWarning)
    flush()
    """
).replace("QUIET", QUIET)

NOISE = {
    "vLLM's libtcmalloc notice": "libtcmalloc is not found in LD_PRELOAD",
    "vLLM's libiomp notice": "libiomp is not found in LD_PRELOAD",
    "torch's Triton notice": "Triton not available, find_triton_kernels = []",
    "the reduce_op warning raised by vLLM's dispatcher": "vllm/triton_utils/dispatcher.py",
}


@pytest.mark.vllm
def test_the_vllm_start_notices_are_dropped_by_message_and_the_rest_prints():
    proc = subprocess.run(
        [sys.executable, "-c", ENGINE_START], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, timeout=120
    )
    out = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, out[-5000:]
    loud, quiet = out.split(QUIET)
    for name, marker in NOISE.items():
        assert marker in loud, f"{name}: the library no longer prints it this way; is its filter still needed?"
        assert marker not in quiet, f"{name} still prints:\n{quiet}"
    assert "Speculative decoding on CPU without Intel OpenMP" in quiet  # same logger, same check, other message
    assert "sleep mode is not supported on CPU" in quiet
    assert "control: another torch Triton notice" in quiet
    assert "`torch.distributed.reduce_op` is deprecated" in quiet  # read by this script, not by vLLM: it shows
    assert "control: another FutureWarning" in quiet


@pytest.fixture
def process_group():
    from learner.distributed import free_port, init_distributed

    created = not dist.is_initialized()
    if created:
        init_distributed(0, 1, "127.0.0.1", free_port(), timeout_s=60)
    yield
    if created:
        dist.destroy_process_group()


def test_the_tiny_build_and_the_learners_checkpoint_read_show_no_progress_bar(tmp_path, capfd, process_group):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from learner.config import LearnerConfig
    from learner.worker import LearnerWorker
    from rollout.tiny import build_tiny_model

    enabled = hf_logging.is_progress_bar_enabled()
    model_dir = str(build_tiny_model(tmp_path / "tiny"))
    LearnerWorker(LearnerConfig(model_dir=model_dir, mini_batch_samples=8, micro_batch_tokens=4096))
    err = capfd.readouterr().err
    assert "Writing model shards" not in err and "Loading weights" not in err, err
    assert hf_logging.is_progress_bar_enabled() == enabled  # put back as it was
    if enabled:  # the control: the same read outside the learner shows transformers' bar
        AutoModelForCausalLM.from_pretrained(model_dir)
        assert "Loading weights" in capfd.readouterr().err
