"""Test-wide environment: offline hub, offline wandb, in-process vLLM engine, Ray without token auth
(orchestration/cluster/env.py), and the hypothesis profile."""

import os
import sys

import pytest
from hypothesis import settings

from orchestration.cluster.env import use_local_defaults

use_local_defaults()

# Property tests explore new random cases locally; under CI they replay a fixed set, so a green CI run is
# reproducible (set HYPOTHESIS_PROFILE=dev to explore under CI too).
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


# The suite runs vLLM's engine, Ray's driver and gloo process groups inside the pytest process, and their native
# threads can outlive the objects they call into: once (CI, 2026-11-30) the process died of SIGSEGV during the
# interpreter's teardown, in a non-main thread (dmesg: an instruction pointer in the heap), after pytest had
# reported "408 passed", and `make test` failed. So once pytest has finished and reported, the process leaves
# with pytest's exit status and without that teardown. TESTS_FULL_TEARDOWN=1 keeps the normal exit (to debug it).
_exit_status: int | None = None


def pytest_sessionfinish(session, exitstatus) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    if _exit_status is None or os.environ.get("TESTS_FULL_TEARDOWN"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)


@pytest.fixture(scope="module")
def local_ray():
    """A local one-node Ray of 4 logical CPUs for the tests of one module (`address="local"`: never a cluster
    that happens to run on the machine)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
