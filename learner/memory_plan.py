"""What one learner rank's memory peaks at, measured on fake tensors: no weights, no GPU, no real collectives.

`measure_update(config, world_size, batch)` runs the learner's own code — `LearnerWorker` (the model built from
its config.json on the meta device, FSDP2 over `world_size` ranks of a fake process group, the AdamW optimizer)
and one optimizer step of `update` (learner/update.py: every micro-batch's forward, loss and backward, gradient
clipping, the step) — under torch's `FakeTensorMode`, where every tensor has a shape, dtype and device but no
storage, and `FSDPMemTracker` (torch.distributed._tools) counts the bytes each would take, by category, at the
moment their sum peaks. So the plan cannot drift from the code: a new buffer in the forward shows up here.

What it measures is the rank's busiest moment in steady state: the optimizer state already exists (it is
created by one step on zero gradients first, untracked), then one step over the largest micro-batch of
`batch` is tracked, with the gradients of earlier micro-batches held when the rank has more than one.

How it differs from a GPU run, and what `orchestration/cluster/fit.py` adds for it:
* fake tensors run on the CPU code path: packed attention is one SDPA per sample (flash attention: output and
  log-sum-exp, no score matrix; the CUDA varlen kernel keeps the same), the optimizer is AdamW's per-parameter
  loop (temporaries of one parameter at a time: an upper bound of the fused CUDA kernel, which has none);
* FSDP2 on a GPU all-gathers the next layer while computing this one (one more layer's unsharded
  parameters), and PyTorch's caching allocator, the CUDA context, cuBLAS and NCCL need memory the tracker never
  sees: plan.py adds both, as named lines.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from advantage import RolloutBatch
from learner.batching import loss_mask
from learner.config import LearnerConfig
from learner.logprobs import head_log_probs
from learner.update import MiniBatchWork, backward_micro_batches, clip_gradients
from learner.worker import LearnerWorker

CATEGORIES = {
    "Sharded Param": "params",
    "Parameter": "params",
    "Gradient": "grads",
    "Optstate": "optimizer",
    "Sharded Grad": "grads",
    "OptState": "optimizer",
    "Unsharded Param": "gathered",
    "All Gather": "gathered",
    "Unsharded Grad": "gathered",
    "Reduce Scatter": "reduce_scatter",
    "Activation": "activations",
    "Temp": "temporaries",
    "Inputs": "inputs",
    "Buffer": "buffers",
    "Other": "temporaries",
}
"""FSDPMemTracker's (and MemTracker's, for the optimizer step) categories → ours (the plan's table)."""


@dataclass
class UpdateMemory:
    """One rank's measured peak in bytes, and where it went at that moment (`parts`: params, grads, optimizer,
    gathered (all-gathered layers in the compute dtype and their gradients), reduce_scatter, activations,
    temporaries, inputs, buffers). `head` is the LM head + log-softmax's own peak (part of activations when it
    is reached), `reference` the frozen reference model's shards (resident all along; not in `peak`),
    `micro_batch_positions` the positions of the measured micro-batch, `held_gradients` whether the gradients
    of an earlier micro-batch were held while it ran, `layer_bytes` one decoder layer's parameters in the
    compute dtype."""

    peak: int
    parts: dict[str, int] = field(default_factory=dict)
    head: int = 0
    reference: int = 0
    micro_batch_positions: int = 0
    held_gradients: bool = False
    layer_bytes: int = 0


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """A fake process group of `world_size` ranks (this process is rank 0): collectives return at once without
    moving data, so one process can run every rank's code path on fake tensors."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("measure_update needs a process without torch.distributed initialised")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _largest_micro_batch(work: MiniBatchWork) -> MiniBatchWork:
    sizes = [inputs.input_ids.numel() for inputs in work.inputs]
    i = max(range(len(sizes)), key=sizes.__getitem__)
    return MiniBatchWork([work.inputs[i]], [work.loss_inputs[i]], work.normalizer, work.num_loss_tokens, True)


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def measure_update(config: LearnerConfig, world_size: int, batch: RolloutBatch) -> UpdateMemory:
    """Rank 0's peak over one optimizer step of `config`'s learner on `batch`'s first mini-batch (only its
    largest micro-batch on rank 0 is run), at world size `world_size`, on fake tensors (module docstring).

    `batch`: host tensors (prompt/response ids and masks, advantages, old log-probs), the shapes to plan for;
    `config.model_dir` needs only a config.json. Takes seconds to a minute (32B: 64 layers on fake tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    zeros = torch.zeros_like(batch.response_mask, dtype=torch.float32)  # values play no part, shapes do
    if batch.old_log_probs is None:
        batch = batch.replace(old_log_probs=zeros)
    if config.uses_reference and batch.ref_log_probs is None:
        batch = batch.replace(ref_log_probs=zeros)
    with fake_process_group(world_size), FakeTensorMode(allow_non_fake_inputs=True):
        worker = LearnerWorker(config, load_weights=False)
        model, optimizer = worker.model, worker.optimizer
        with unset_fake_temporarily():  # the plan and the micro-batch inputs are host work on real tensors
            plan = worker._plan(batch)
            rank_work = worker.mini_batch_work(batch, loss_mask(batch), plan, 0)
            work = _largest_micro_batch(rank_work)
        for p in model.parameters():  # the optimizer state exists in steady state: one untracked step makes it
            p.grad = torch.zeros_like(p)
        optimizer.step()
        if len(rank_work.inputs) == 1:
            optimizer.zero_grad(set_to_none=True)
        # else: the gradients stay. With several micro-batches the largest need not come first, and while it
        # runs, the gradients accumulated by the earlier ones are held: the worst case is measured.

        tracker = FSDPMemTracker(model, optimizer)
        with tracker:
            # The model's forward is `response_log_probs`, an FSDP forward method, which calls the root's
            # pre/post-forward directly instead of through the module hooks the tracker wraps: wrap them too.
            tracker._mod_tracker._get_mod_name(model)
            state = model._get_fsdp_state()
            state._pre_forward = tracker._fsdp_state_pre_forward(model, state._pre_forward)
            state._post_forward = tracker._fsdp_state_post_forward(model, state._post_forward)
            backward_micro_batches(
                model,
                work,
                policy_loss=worker.policy_loss,
                loss_config=config.policy_loss_config,
                world_size=world_size,
                chunk_tokens=config.logprob_chunk_tokens,
            )
        # Clipping scales the gradients in place (measured on real FSDP2 gradients: 4 MiB for 832 MiB of
        # gradients), but the tracker counts a phantom whole-model copy for the DTensor ops: it runs untracked.
        clip_gradients(model, config.optimizer.grad_clip)
        with MemTracker() as step_tracker:  # the step touches parameters, gradients and moments: all counted
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        snapshots = [max(t.get_tracker_snapshot("peak").values(), key=lambda s: s["Total"])
                     for t in (tracker, step_tracker)]  # fmt: skip
        snapshot = max(snapshots, key=lambda s: s["Total"])
        parts: dict[str, int] = {}
        for key, value in snapshot.items():
            name = CATEGORIES.get(str(getattr(key, "value", key)))
            if name is not None and value:
                parts[name] = parts.get(name, 0) + value

        inputs = work.inputs[0]
        head = model.get_output_embeddings().weight
        with MemTracker() as head_tracker:  # the LM head + log-softmax alone, on the micro-batch's targets
            hidden_size = model.config.hidden_size
            dtype = torch.float32 if config.param_dtype == "float32" else torch.bfloat16
            hidden = torch.empty(len(inputs.target_ids), hidden_size, dtype=dtype, requires_grad=True)
            weight = torch.empty(head.shape, dtype=dtype, requires_grad=True)
            log_probs, _ = head_log_probs(
                hidden, weight, inputs.target_ids, chunk_tokens=config.logprob_chunk_tokens, with_entropy=True
            )
            log_probs.sum().backward()
        head_peak = max(s["Total"] for s in head_tracker.get_tracker_snapshot("peak").values())
        weight_bytes = weight.numel() * weight.element_size() * 2  # the head's weight and its gradient
        reference = 0 if worker.ref_model is None else _local_bytes(worker.ref_model.parameters())
        layer = next(iter(model.model.layers))
        layer_params = sum(p.numel() for p in layer.parameters())  # DTensors: numel() is the whole parameter's
        compute_bytes = 4 if config.param_dtype == "float32" else 2
    return UpdateMemory(
        peak=snapshot["Total"],
        parts=parts,
        head=max(head_peak - weight_bytes, 0),
        reference=reference,
        micro_batch_positions=inputs.input_ids.numel(),
        held_gradients=len(rank_work.inputs) > 1,
        layer_bytes=layer_params * compute_bytes,
    )
