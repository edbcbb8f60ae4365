"""Process-group setup for the learner ranks: gloo with CPU tensors, NCCL with GPUs, same code.

Every rank calls `init_distributed` at the same time (a rank that calls alone waits for the others until the
timeout); the timeout also bounds every later collective, so a rank that dies makes the others raise within
`timeout_s` instead of hanging for the default 30 minutes.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def learner_device() -> torch.device:
    """The device this rank computes on: its (single visible) GPU when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int, timeout_s: float) -> None:
    """Join the learner's default process group (NCCL on CUDA, gloo otherwise) as `rank` of `world_size`."""
    os.environ["MASTER_ADDR"] = master_addr
    os.environ["MASTER_PORT"] = str(master_port)
    os.environ["RANK"] = str(rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(learner_device())
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))


def free_port() -> int:
    """A TCP port that is free on this host right now (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]
