"""Our weight transport, registered with vLLM's RL weight-transfer API (vllm/distributed/weight_transfer).

vLLM 0.32 drives a weight update through one lifecycle whatever the transport: `LLM.init_weight_transfer_engine`
(the handshake), `start_weight_update`, one `update_weights` per chunk, `finish_weight_update(weight_version)`;
the engine-side transport (a `WeightTransferEngine` built by each worker in `load_model`, from the engine
argument `weight_transfer_config={"backend": NAME}`) receives the chunks. vLLM's own transports (nccl, ipc,
sparse_nccl, sharded_rdt, nccl_m2n) all need CUDA. `BucketTransferEngine` is ours and takes a chunk two ways
(rollout.weight_transfer):

* object_store: the chunk is a bucket of (Hugging Face name, tensor) pairs that the rollout worker fetched from
  Ray's object store. With the engine core in the actor's process (VLLM_ENABLE_V1_MULTIPROCESSING=0, the CPU
  cluster's setting) it is passed by reference; with vLLM's worker processes vLLM serialises it (tensors are
  supported).
* gloo: the handshake joins a gloo group with learner rank 0 (vLLM's stateless groups: no default group is
  touched); the chunk is the layout of the buckets about to be broadcast, each received as one uint8 tensor
  and split into views (learner/transfer.py is the sending side).

Either way a bucket is loaded with the model's own `load_weights` between vLLM's layer-wise reload steps, so a
layer's new values take effect once all of its tensors are in. The learner's bucket bound
(`learner.weight_bucket_mb`) is ours.

What vLLM's API does not do, and stays ours (rollout/engine.py): resetting the prefix cache after an update
(cached prefixes hold KV of the old weights), and aborting an update that failed part way (vLLM's worker drops
its "update active" flag without finishing the reload: `WorkerExtension.fipo_abort_weight_update` finishes it).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from vllm.config import set_current_vllm_config
from vllm.distributed.utils import (
    stateless_destroy_torch_distributed_process_group,
    stateless_init_torch_distributed_process_group,
)
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
from vllm.distributed.weight_transfer.packed_tensor import unpack_tensor
from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

from actors.console import add_filter_once

BACKEND = "fipo_buckets"
"""The name our transport is registered under (`weight_transfer_config={"backend": BACKEND}`)."""
WORKER_EXTENSION = f"{__name__}.WorkerExtension"
"""vLLM's `worker_extension_cls` for our engines (WorkerExtension)."""


RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
FAILED_TO_LOAD = "%s: Failed to load weights"


def derived_buffer_layers(model: torch.nn.Module) -> frozenset[str]:
    """Class names of the modules that hold no weights, only non-persistent buffers computed from the config
    (e.g. RotaryEmbedding's cos_sin_cache); a class that has weights or persistent buffers anywhere is left out."""
    derived, weighted = set(), set()
    for module in model.modules():
        params = [p for p in module._parameters.values() if p is not None]
        buffers = {name for name, b in module._buffers.items() if b is not None}
        if params or buffers - module._non_persistent_buffers_set:
            weighted.add(type(module).__name__)
        elif buffers:
            derived.add(type(module).__name__)
    return frozenset(derived - weighted)


def tied_layers(model: torch.nn.Module) -> frozenset[str]:
    """Class names of the modules whose parameters all belong to an earlier module too (tied weights, e.g. the
    LM head of a model with tie_word_embeddings: an update carries the tensor once, under the embedding's name);
    a class that also appears with weights of its own is left out."""
    seen: set[int] = set()
    tied, own = set(), set()
    for module in model.modules():
        params = [p for p in module._parameters.values() if p is not None]
        if params and all(id(p) in seen for p in params):
            tied.add(type(module).__name__)
        elif params:
            own.add(type(module).__name__)
        seen.update(id(p) for p in params)
    return frozenset(tied - own)


class DerivedBufferReloadFilter(logging.Filter):
    """Drops vLLM's "<Layer>: Failed to load weights" warning for layers in `layer_names` only.

    Why it is harmless for a tied layer (tied_layers): its parameter is the earlier module's, which the update
    fills; finalize puts the tied layer's own tensor back, which is that same parameter (measured:
    tests/test_rollout_vllm.py, the update of a model with tied embeddings). And for a derived-buffer layer:
    vLLM's layer-wise reload counts a layer's non-persistent buffers as loadable tensors. A
    rotary embedding's only tensor is its cos/sin cache, computed from the config and never part of a
    checkpoint, so no update can carry it: vLLM warns, then puts the layer's existing cache back (finalize's
    fallback), which is exactly right. Measured: after every push the engine's log-probs equal a transformers
    forward with the new weights (tests/test_rollout_vllm.py). Any other layer that misses its weights still
    warns."""

    def __init__(self, layer_names: frozenset[str]) -> None:
        super().__init__()
        self.layer_names = layer_names

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == FAILED_TO_LOAD and bool(record.args) and record.args[0] in self.layer_names)


def install_reload_filter(model: torch.nn.Module) -> None:
    """Add DerivedBufferReloadFilter for `model` to vLLM's reload logger (once per process)."""
    add_filter_once(
        RELOAD_LOGGER,
        DerivedBufferReloadFilter,
        lambda: DerivedBufferReloadFilter(derived_buffer_layers(model) | tied_layers(model)),
    )


def register() -> None:
    """Register BucketTransferEngine with vLLM's factory in this process (idempotent). vLLM's registry is per
    process: importing this module registers it, and vLLM imports it in every worker process through
    `WorkerExtension` (the engine argument `worker_extension_cls`), before the workers build their transport."""
    if BACKEND not in WeightTransferEngineFactory._registry:  # register_engine refuses a name twice
        WeightTransferEngineFactory.register_engine(BACKEND, BucketTransferEngine)


@dataclass
class BucketInitInfo(WeightTransferInitInfo):
    """The handshake. Without `master_address` the engine takes in-process buckets only (the object store);
    with it, it also joins a gloo group of `world_size` ranks at `master_address:master_port` (rank 0 the
    learner's rank 0; this engine's workers from `rank_offset`), replacing any group it was in before."""

    policy_version: int = 0
    master_address: str | None = None
    master_port: int = 0
    rank_offset: int = 1
    world_size: int = 0
    timeout_s: float = 600.0


@dataclass
class BucketUpdateInfo(WeightTransferUpdateInfo):
    """One chunk, either `bucket`: (Hugging Face name, tensor) pairs in this process, any dtype (the loaders
    convert while copying); or `layout`: the buckets about to be broadcast on the gloo group, in order, each
    a list of [name, dtype name, shape] (the bytes of a bucket arrive as one packed uint8 tensor)."""

    bucket: list[Any] = field(default_factory=list)
    layout: list[list[list[Any]]] = field(default_factory=list)


def layout_sizes(bucket_layout: list[list[Any]]) -> tuple[list[str], list[list[int]], list[torch.dtype], list[int]]:
    """(names, shapes, dtypes, byte sizes) of one bucket's layout entries [name, dtype name, shape]."""
    names = [name for name, _, _ in bucket_layout]
    shapes = [list(shape) for _, _, shape in bucket_layout]
    dtypes = [getattr(torch, dtype_name) for _, dtype_name, _ in bucket_layout]
    sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in zip(shapes, dtypes)]
    return names, shapes, dtypes, sizes


class BucketTransferEngine(WeightTransferEngine[BucketInitInfo, BucketUpdateInfo]):
    """The engine side of our transport (module docstring); built by each vLLM worker in `load_model`."""

    init_info_cls = BucketInitInfo
    update_info_cls = BucketUpdateInfo
    supports_draft_weight_update = False
    group = None

    def init_transfer_engine(self, init_info: BucketInitInfo) -> None:
        self.handshake_version = init_info.policy_version
        self.shutdown()
        if init_info.master_address is not None:
            pc = self.parallel_config  # this worker's rank in the group, as vLLM's nccl transport counts it
            rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
            self.group = stateless_init_torch_distributed_process_group(
                init_info.master_address,
                init_info.master_port,
                rank,
                init_info.world_size,
                "gloo",
                timeout=timedelta(seconds=init_info.timeout_s),
            )

    def start_weight_update(self) -> None:
        install_reload_filter(self.model)
        initialize_layerwise_reload(self.model)

    def receive_weights(self, update_info: BucketUpdateInfo) -> None:
        if update_info.bucket:
            self.model.load_weights([(name, tensor) for name, tensor in update_info.bucket])
        if update_info.layout and self.group is None:
            raise RuntimeError("a broadcast update arrived before a handshake with a master_address")
        options = dist.BroadcastOptions()
        options.rootRank = 0
        loaded = None  # the previous bucket: loaded while the next one arrives (gloo works in its own threads)
        for bucket_layout in update_info.layout:
            names, shapes, dtypes, sizes = layout_sizes(bucket_layout)
            packed = torch.empty(sum(sizes), dtype=torch.uint8)  # fresh: the reload keeps views until a layer is in
            arriving = self.group.broadcast([packed], options)
            if loaded is not None:
                self.model.load_weights(loaded)
            arriving.wait()
            loaded = unpack_tensor(packed, names, shapes, dtypes, sizes)
        if loaded is not None:
            self.model.load_weights(loaded)

    def update_weights(self, update_info: dict) -> None:
        # the base class ends with torch.accelerator.synchronize(), which raises on a CPU build of torch where
        # vLLM's CPU worker has not replaced it; a bucket loaded on the CPU needs no synchronisation
        if torch.cuda.is_available():
            super().update_weights(update_info)
        else:
            self.receive_weights(self.parse_update_info(update_info))

    def finish_weight_update(self) -> None:
        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        if self.group is not None:
            group, self.group = self.group, None
            stateless_destroy_torch_distributed_process_group(group)


class WorkerExtension:
    """vLLM's `worker_extension_cls` for our engines: vLLM imports this module in every worker process (which
    registers the transport there) and adds this class to the worker's bases (its methods become collective_rpc
    calls)."""

    def fipo_abort_weight_update(self) -> None:
        """Finish the layer-wise reload of an update that failed part way, so that the next update starts from a
        consistent model (layers already complete keep their new values, the others their old ones), and end the
        worker's update. vLLM 0.32 has no abort: its worker only drops its "update active" flag when a chunk
        fails (`Worker.update_weights`), which leaves the reload begun."""
        if self.weight_transfer_engine is None:
            return
        with set_current_vllm_config(self.vllm_config):
            self.weight_transfer_engine.finish_weight_update()
        self._weight_update_active = False
        self.model_runner.reset_lora_state()


register()
