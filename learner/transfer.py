"""The trainer side of a weight push through vLLM's RL weight-transfer API (vllm/distributed/weight_transfer).

vLLM's trainer-side engines all take the same two calls on every learner rank: `trainer_init(init_info,
client=..., source=...)` once (rank 0, the sender, runs the handshake with the engines through the client while
it opens its end of the transport) and `send_weights()` per push (every rank iterates the source, which gathers
the FSDP2 shards; rank 0 drives the engines through the client and sends). Two transports go through this file:

* `gloo` (`GlooTrainerEngine`, ours, registered here as "fipo_gloo"): a gloo process group between learner rank
  0 and every engine worker (vLLM's stateless groups: neither side's own default group is touched). The ranks
  gather each bucket straight into one uint8 tensor on rank 0, which broadcasts it; the engines split it into
  views and load them with vLLM's layer-wise reload (rollout/weight_transfer.py). What runs on this CPU.
* `nccl` (vLLM's own `NCCLTrainerWeightTransferEngine`): the same source and client, NCCL between GPUs; not
  run here (no CUDA build of vLLM on any machine this project has: docs/weight_sync.md).

`BucketSource` is the one piece both share: the learner's weights as vLLM's `WeightSource`, gathered bucket by
bucket to rank 0 (`LearnerWorker.gather_weight_bucket` / `gather_packed_bucket`: every rank sends its shards,
in the export dtype), so no process ever holds more than its shard plus a bucket or two. vLLM is imported by this
module only: the learner's other modules run without it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from vllm.distributed.utils import (
    stateless_destroy_torch_distributed_process_group,
    stateless_init_torch_distributed_process_group,
)
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
)
from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

GLOO_BACKEND = "fipo_gloo"
"""The trainer-side name of our gloo transport (and the value of `rollout.weight_transfer` that selects it)."""


class BucketSource(WeightSource):
    """The learner's weights (Hugging Face names, export dtype, full shapes) as vLLM's WeightSource.

    `worker` is this rank's LearnerWorker; `plan` its `weight_bucket_plan(bucket_bytes)` (the same on every
    rank). Iterating gathers one bucket at a time (a collective: every rank iterates); rank 0 yields the full
    tensors (on the learner's device with `on_device`: its GPU, which an NCCL transport sends from), the other ranks
    (name, None)."""

    def __init__(self, worker: Any, plan: list[tuple[list[str], int]], on_device: bool = False) -> None:
        self.worker = worker
        self.plan = plan
        self.on_device = on_device
        dtype = worker._export_dtype()
        shapes = {name: tuple(t.shape) for name, t in worker.model.state_dict().items()}
        self._meta = [ParamMeta(name, dtype, shapes[name]) for names, _ in plan for name in names]

    def metadata(self) -> list[ParamMeta]:
        return list(self._meta)

    def layout(self) -> list[list[list[Any]]]:
        """Per bucket, [[name, dtype name, shape]]: what the engines need to receive and split each bucket."""
        meta = iter(self._meta)
        return [
            [[m.name, str(m.dtype).removeprefix("torch."), list(m.shape)] for m in (next(meta) for _ in names)]
            for names, _ in self.plan
        ]

    def iter_packed(self) -> Iterator[torch.Tensor | None]:
        """One gathered bucket at a time as one uint8 tensor (its tensors back to back, on the CPU) on rank 0,
        None elsewhere: gathered straight into it, so sending it needs no copy."""
        for names, _ in self.plan:
            _, packed = self.worker.gather_packed_bucket(names)
            yield None if packed is None else packed.cpu()

    def iter_buckets(self) -> Iterator[list[tuple[str, torch.Tensor | None]]]:
        """One gathered bucket at a time: full tensors on rank 0 (on the CPU, or with `on_device` views of the
        bucket's one tensor on this rank's device: no round trip through host memory), (name, None)
        pairs elsewhere."""
        for names, _ in self.plan:
            if not self.on_device:
                bucket = self.worker.gather_weight_bucket(names)
            else:
                bucket, _ = self.worker.gather_packed_bucket(names)
            yield bucket if self.worker.rank == 0 else [(name, None) for name in names]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor | None]]:
        for bucket in self.iter_buckets():
            yield from bucket


@dataclass(kw_only=True)
class GlooTrainerInitInfo(TrainerInitInfo):
    """Rank 0 listens on `master_address` (a free port it picks itself); `world_size` = 1 + every engine
    worker; a broadcast that waits longer than `timeout_s` fails (a lost peer fails it at once)."""

    backend: ClassVar[str] = GLOO_BACKEND
    master_address: str
    world_size: int
    timeout_s: float = 600.0


class GlooTrainerEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Our gloo transport's trainer side (module docstring). `send_weights` never leaves the learner's ranks
    half way through a gather: when the engines fail (one was lost, a broadcast timed out) rank 0 stops
    sending but keeps gathering with the other ranks until the end, then raises `EngineSideError`, so that the
    learner group stays usable and only the engines need attention."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client: Any, source: WeightSource | None = None, is_sender: bool = True) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.group: dist.ProcessGroup | None = None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client: Any, source: WeightSource | None = None):
        engine = cls(client=client, source=source, is_sender=init_info.is_sender)
        if not engine.is_sender:
            return engine
        listen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listen.bind((init_info.master_address, 0))
        listen.listen()
        port = listen.getsockname()[1]
        worker_init = {
            "master_address": init_info.master_address,
            "master_port": port,
            "rank_offset": 1,
            "world_size": init_info.world_size,
            "timeout_s": init_info.timeout_s,
        }
        # Both sides block in the rendezvous until everyone joined: the engines' handshake and rank 0's end run on
        # two threads. When the engines fail (one was lost), rank 0 reports it at once; its own thread then waits
        # in the rendezvous until the group's timeout and ends there (the next handshake uses a new port).
        pool = ThreadPoolExecutor(max_workers=2)
        engines_ready = pool.submit(client.init_weight_transfer_engine, worker_init)
        opened = pool.submit(
            stateless_init_torch_distributed_process_group,
            init_info.master_address,
            port,
            0,
            init_info.world_size,
            "gloo",
            listen_socket=listen,
            timeout=timedelta(seconds=init_info.timeout_s),
        )
        try:
            wait([engines_ready, opened], return_when=FIRST_EXCEPTION)
            if engines_ready.done() and engines_ready.exception() is not None:
                raise EngineSideError(f"the engines' handshake failed: {engines_ready.exception()}")
            engine.group = opened.result()
            engines_ready.result()
        finally:
            pool.shutdown(wait=False)
        return engine

    def send_weights(self) -> None:
        assert isinstance(self.source, BucketSource)
        if not self.is_sender:
            for _ in self.source.iter_packed():  # the gather only
                pass
            return
        options = dist.BroadcastOptions()
        options.rootRank = 0
        failure: BaseException | None = None
        layout = self.source.layout()
        try:
            self.client.start_weight_update()
        except Exception as err:
            failure = err
        pool = ThreadPoolExecutor(max_workers=1)
        received = None if failure else pool.submit(self.client.update_weights, {"layout": layout})
        in_flight = None  # (work, its tensor): sent by gloo's threads while the next bucket is gathered
        for packed in self.source.iter_packed():
            if failure is not None:
                continue  # keep gathering with the other ranks
            try:
                if received.done():  # the engines failed before this bucket: do not wait for them in gloo
                    received.result()
                sending = (self.group.broadcast([packed], options), packed)
                if in_flight is not None:
                    in_flight[0].wait()
                in_flight = sending
            except Exception as err:
                failure = err
                self.shutdown()  # the engines still waiting in a broadcast fail at once instead of at the timeout
        if in_flight is not None and failure is None:
            try:
                in_flight[0].wait()
            except Exception as err:
                failure = err
                self.shutdown()
        pool.shutdown(wait=failure is None)
        if failure is None:
            try:
                received.result()
                self.client.finish_weight_update()
            except Exception as err:
                failure = err
        if failure is not None:
            self.shutdown()
            raise EngineSideError(f"the engines did not take the weights: {failure}") from failure

    def shutdown(self) -> None:
        if self.group is not None:
            group, self.group = self.group, None
            stateless_destroy_torch_distributed_process_group(group)


class EngineSideError(RuntimeError):
    """A push failed on the engines' side (the learner's gather completed on every rank)."""


def register() -> None:
    """Register GlooTrainerEngine with vLLM's trainer factory in this process (idempotent)."""
    if GLOO_BACKEND not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine(GLOO_BACKEND, GlooTrainerEngine)


register()


def start_transfer(
    worker: Any,
    backend: str,
    *,
    client: Any,
    bucket_bytes: int,
    master_address: str,
    world_size: int,
    timeout_s: float,
) -> TrainerWeightTransferEngine:
    """The handshake on one learner rank (every rank calls it at once): `backend` "gloo" (ours) or "nccl"
    (vLLM's); `client` drives the engines (rank 0 only uses it); `world_size` = 1 + every engine worker."""
    plan = worker.weight_bucket_plan(bucket_bytes)
    if backend == "gloo":
        info = GlooTrainerInitInfo(
            rank=worker.rank, master_address=master_address, world_size=world_size, timeout_s=timeout_s
        )
        return WeightTransferTrainerFactory.trainer_init(info, client=client, source=BucketSource(worker, plan))
    if backend == "nccl":  # vLLM's own NCCL transport, from the GPU that holds this rank's shard
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        with socket.socket() as probe:  # vLLM's NCCL rendezvous binds the port itself
            probe.bind((master_address, 0))
            port = probe.getsockname()[1]
        info = NCCLTrainerInitInfo(
            rank=worker.rank, master_address=master_address, master_port=port, world_size=world_size
        )
        source = BucketSource(worker, plan, on_device=True)
        return WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)
    raise ValueError(f"unknown weight transport {backend!r}: gloo or nccl")
