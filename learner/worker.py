"""One learner rank: a Hugging Face causal LM sharded with FSDP2 over the learner's process group.

`LearnerWorker` is a plain class (no Ray): it expects `torch.distributed` to be initialised (every rank of
the group constructs one at the same time; `learner/group.py` does that inside Ray actors, tests with world
size 1 do it in-process). All ranks must call the same methods in the same order with the same batch: each
method runs collectives.

What a step does here:
* `compute_log_probs(batch)`: no-grad forward of each sample's [prompt | response], float32 log-prob of each
  response token → [B, T] (0 on padding); π_old, or π_ref from a frozen reference copy.
* `update(batch)`: mini-batches in order (one optimizer step each, learner/update.py), each split over the
  ranks and into micro-batches by a token budget (learner/batching.py: the same plan and the same layout as
  compute_log_probs, so that on the first mini-batch log π_θ − log π_old is exactly 0 and FIPO equals DAPO
  bitwise).

The pieces: learner/model.py builds and loads the sharded model (meta device, rank 0 reads the checkpoint)
and its log-prob forward; learner/logprobs.py the chunked LM head; learner/attention.py the packed attention;
learner/batching.py the plan and the micro-batch tensors; learner/update.py one optimizer step.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import time
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from advantage import POLICY_LOSSES, RolloutBatch, loss_normalizer
from learner.batching import (
    StepPlan,
    loss_mask,
    micro_batch_inputs,
    micro_batch_loss_inputs,
    plan_step,
    prompt_keys_of,
    to_device,
)
from learner.config import LearnerConfig, OptimizerConfig
from learner.distributed import learner_device
from learner.model import build_fsdp_model, checkpoint_dtype, load_checkpoint
from learner.update import MiniBatchWork, train_mini_batch

WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
EXPORT_SHARD_BYTES = 4 << 30


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class LearnerWorker:
    """One rank of the learner (see the module docstring). Construct on every rank at the same time."""

    def __init__(self, config: LearnerConfig, *, load_weights: bool = True) -> None:
        """`load_weights=False` builds the sharded model without reading the checkpoint (its values are
        uninitialised): what the memory planner runs on fake tensors (orchestration/cluster/fit.py)."""
        if not dist.is_initialized():
            raise RuntimeError("LearnerWorker needs torch.distributed initialised (learner.distributed)")
        self.config = config
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = learner_device()
        torch.manual_seed(config.seed + self.rank)
        with unset_fake_temporarily():  # the mesh holds real rank ids, also under the planner's fake tensors
            self.mesh = init_device_mesh(self.device.type, (self.world_size,))

        def model_of(model_dir: str, **options) -> torch.nn.Module:
            model = build_fsdp_model(model_dir, self.mesh, self.device, param_dtype=config.param_dtype, **options)
            if load_weights:
                load_checkpoint(model, model_dir)
            return model

        self.model = model_of(
            config.model_dir, trainable=True, activation_checkpointing=config.activation_checkpointing
        )
        self.ref_model = None
        if config.uses_reference:
            self.ref_model = model_of(config.ref_model_dir or config.model_dir, trainable=False)
        self.optimizer = make_optimizer(self.model, config.optimizer, self.device.type)
        self.policy_loss = POLICY_LOSSES.get(config.policy_loss)
        self._source_dtype = checkpoint_dtype(config.model_dir)
        self.optimizer_steps = 0
        """Optimizer steps taken so far; the learning-rate schedule is a function of it."""
        self._warned_single_mini_batch = False
        self.weight_transfer = None
        """The trainer side of the last weight-transfer handshake (learner/transfer.py), or None."""

    # ------------------------------------------------------------------------------------------------------
    # forward

    def _plan(self, batch: RolloutBatch) -> StepPlan:
        share = self.config.share_prompts
        return plan_step(
            batch.prompt_mask,
            batch.response_mask,
            mini_batch_samples=self.config.mini_batch_samples,
            micro_batch_tokens=self.config.micro_batch_tokens,
            world_size=self.world_size,
            packing=self.config.packing,
            prompt_keys=prompt_keys_of(batch.prompt_ids, batch.prompt_mask) if share else None,
        )

    def _inputs(self, batch: RolloutBatch, micro_batches) -> list:
        """Host inputs of this rank's `micro_batches` (tuples of rows)."""
        layout = dict(packing=self.config.packing, share_prompts=self.config.share_prompts)
        return [micro_batch_inputs(batch, rows, **layout) for rows in micro_batches]

    def compute_log_probs(self, batch: RolloutBatch, *, reference: bool = False) -> torch.Tensor:
        """Per-token log-probs of the response tokens under the current (or reference) weights, no grad.

        Args:
            batch: the step's whole batch (identical on every rank); each rank computes its rows of the plan.
            reference: use the frozen reference model (only exists when the loss has a KL term).
        Returns: [B, T] float32 on the CPU, 0 where response_mask is False; identical on every rank.
        """
        model = self.model
        if reference:
            if self.ref_model is None:
                raise ValueError("compute_log_probs(reference=True): this loss has no KL term, no reference model")
            model = self.ref_model
        plan = self._plan(batch)
        num_rows, width = batch.response_ids.shape
        local = []
        with torch.no_grad():
            for micro_batches in plan.for_rank(self.rank):
                for inputs in to_device(self._inputs(batch, micro_batches), self.device):
                    log_probs, _ = model.response_log_probs(inputs, chunk_tokens=self.config.logprob_chunk_tokens)
                    local.append(torch.nn.functional.pad(log_probs, (0, width - inputs.response_len)))
        local = torch.cat(local)  # this rank's rows of every mini-batch, in plan order: [B / world_size, T]
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local)
        full = torch.empty(num_rows, width, dtype=torch.float32)
        for rank, values in enumerate(gathered):
            full[torch.as_tensor(plan.rank_rows(rank))] = values.cpu()
        return torch.where(batch.response_mask.bool(), full, 0.0)

    # ------------------------------------------------------------------------------------------------------
    # update

    def update(self, batch: RolloutBatch) -> list[dict[str, float]]:
        """One optimizer step per mini-batch of `batch` (in order, one pass); returns metrics per mini-batch.

        `batch` must carry old_log_probs and advantages (and ref_log_probs when the loss has a KL term).
        Metrics (identical on every rank): learner/loss, learner/grad_norm, learner/lr, learner/entropy,
        every metric the policy loss returns (clip fractions, FIPO's influence-weight statistics, ...) under
        learner/, learner/num_micro_batches (per rank), learner/response_tokens, perf/learner_tokens_per_s and
        perf/learner_padded_fraction (global: padding positions computed / all positions computed),
        perf/learner_shared_prompt_frac (global: the share of the samples' tokens not computed because a
        shared prompt was computed once for its samples; 0 without learner.share_prompts). A
        non-finite gradient norm, or a mini-batch without loss tokens, skips the optimizer step
        (learner/skipped_step = 1).
        """
        if batch.old_log_probs is None or batch.advantages is None:
            raise ValueError("update needs batch.old_log_probs (compute_log_probs) and batch.advantages")
        if self.config.uses_reference and batch.ref_log_probs is None:
            raise ValueError(f"policy loss {self.config.policy_loss!r} has a KL term: update needs ref_log_probs")
        plan = self._plan(batch)  # once per step, on the host
        if plan.num_mini_batches == 1 and self.config.policy_loss == "fipo" and not self._warned_single_mini_batch:
            warnings.warn(
                "FIPO with one mini-batch per step: θ = θ_old throughout, so FIPO reduces to DAPO "
                "(use mini_batch_samples < the step's batch size)",
                stacklevel=2,
            )
            self._warned_single_mini_batch = True
        mask = loss_mask(batch)
        return [self._update_mini_batch(batch, mask, plan, m) for m in range(plan.num_mini_batches)]

    def mini_batch_work(self, batch: RolloutBatch, mask: torch.Tensor, plan: StepPlan, m: int) -> MiniBatchWork:
        """This rank's micro-batches of mini-batch `m` of `plan`, on the device, with the global counts."""
        rows = plan.mini_batch_rows[m]
        # every rank holds the whole batch: the mini-batch's global loss denominator needs no communication
        normalizer = loss_normalizer(mask[rows.start : rows.stop], self.config.policy_loss_config.loss_agg_mode)
        inputs = self._inputs(batch, plan.micro_batches[m][self.rank])
        loss_inputs = [micro_batch_loss_inputs(batch, mask, x) for x in inputs]
        moved = to_device([*inputs, *loss_inputs, normalizer], self.device)  # one transfer per dtype
        return MiniBatchWork(
            inputs=moved[: len(inputs)],
            loss_inputs=moved[len(inputs) : -1],
            normalizer=moved[-1],
            num_loss_tokens=int(mask[rows.start : rows.stop].sum()),
            has_loss=float(normalizer) > 0,
        )

    def _update_mini_batch(self, batch: RolloutBatch, mask: torch.Tensor, plan: StepPlan, m: int) -> dict[str, float]:
        start = time.perf_counter()
        work = self.mini_batch_work(batch, mask, plan, m)
        lr = self.config.optimizer.lr * self.config.lr_schedule.lr_factor(self.optimizer_steps)
        metrics, stepped = train_mini_batch(
            self.model,
            self.optimizer,
            work,
            policy_loss=self.policy_loss,
            loss_config=self.config.policy_loss_config,
            world_size=self.world_size,
            grad_clip=self.config.optimizer.grad_clip,
            lr=lr,
            chunk_tokens=self.config.logprob_chunk_tokens,
        )
        self.optimizer_steps += int(stepped)
        real, computed = plan.tokens(m)  # global, from the plan (host ints)
        metrics.update({
            "learner/lr": lr,
            "learner/skipped_step": float(not stepped),
            "learner/num_micro_batches": float(len(work.inputs)),
            "learner/response_tokens": float(work.num_loss_tokens),
            "perf/learner_padded_fraction": 0.0 if plan.packing else 1.0 - real / max(computed, 1),
            "perf/learner_shared_prompt_frac": 1.0 - computed / max(real, 1) if plan.packing else 0.0,
            "perf/learner_tokens_per_s": real / (time.perf_counter() - start),
        })  # fmt: skip
        return metrics

    # ------------------------------------------------------------------------------------------------------
    # checkpoints

    def save_checkpoint(self, path: str | pathlib.Path) -> None:
        """Sharded training state for an exact resume: model and optimizer (torch.distributed.checkpoint),
        the optimizer step count (which fixes the lr schedule) and every rank's RNG state."""
        path = pathlib.Path(path)
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(path / "dcp"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, path / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            state = {"optimizer_steps": self.optimizer_steps, "world_size": self.world_size}
            (path / "learner_state.json").write_text(json.dumps(state, indent=1))
        dist.barrier()

    def load_checkpoint(self, path: str | pathlib.Path) -> None:
        """Restore what `save_checkpoint` wrote (same world size for the RNG states)."""
        path = pathlib.Path(path)
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        rng = torch.load(path / f"rng_rank{self.rank}.pt", weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"])
        self.optimizer_steps = json.loads((path / "learner_state.json").read_text())["optimizer_steps"]
        dist.barrier()

    def full_state_dict(self, *, optimizer: bool = False) -> dict:
        """Full (unsharded) CPU state on rank 0, {} on the others: {"model": HF-named tensors} and, when
        `optimizer`, {"optimizer": its state keyed by parameter name}. For tests and inspection."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        if optimizer:
            model_state, optim_state = get_state_dict(self.model, self.optimizer, options=options)
            return {"model": model_state, "optimizer": optim_state} if self.rank == 0 else {}
        model_state = get_model_state_dict(self.model, options=options)
        return {"model": model_state} if self.rank == 0 else {}

    def export_hf(self, path: str | pathlib.Path) -> None:
        """A Hugging Face model directory that transformers and vLLM load unchanged: safetensors weights in
        the source model's dtype (sharded with an index beyond 4 GiB), plus config, generation config and
        tokenizer files copied from `model_dir`. Rank 0 writes; all ranks must call."""
        from safetensors.torch import save_file

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        if self.rank == 0:
            path = pathlib.Path(path)
            path.mkdir(parents=True, exist_ok=True)
            if self.model.config.tie_word_embeddings:
                state.pop("lm_head.weight", None)
            dtype = self._export_dtype()
            state = {k: v.to(dtype).contiguous() for k, v in state.items()}
            shards = _shard_state(state, EXPORT_SHARD_BYTES)
            if len(shards) == 1:
                save_file(shards[0], path / "model.safetensors", metadata={"format": "pt"})
            else:
                weight_map = {}
                for i, shard in enumerate(shards):
                    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                    save_file(shard, path / name, metadata={"format": "pt"})
                    weight_map.update(dict.fromkeys(shard, name))
                total = sum(v.numel() * v.element_size() for v in state.values())
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
            for source in pathlib.Path(self.config.model_dir).iterdir():
                if source.is_file() and not source.name.endswith(WEIGHT_FILE_SUFFIXES):
                    shutil.copy2(source, path / source.name)
        dist.barrier()

    def _export_dtype(self) -> torch.dtype:
        """The dtype of the weights in `model_dir` (the model is trained in float32 master weights)."""
        return self._source_dtype

    # ------------------------------------------------------------------------------------------------------
    # weights for the rollout engines

    def weight_bucket_plan(self, bucket_bytes: int) -> list[tuple[list[str], int]]:
        """The HF names of the full weights, in state-dict order, cut into buckets of about `bucket_bytes`
        (in the export dtype; a bucket closes once it reaches the size): [(names, bytes)] per bucket. Tied
        weights appear once. The same on every rank (decided from global shapes)."""
        itemsize = self._export_dtype().itemsize
        tied = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        tied -= {n for n, _ in self.model.named_parameters()}  # second names of shared (tied) parameters
        plan: list[tuple[list[str], int]] = [([], 0)]
        for name, tensor in self.model.state_dict().items():
            if name in tied:
                continue
            if plan[-1][1] >= bucket_bytes:
                plan.append(([], 0))
            names, size = plan[-1]
            plan[-1] = (names + [name], size + tensor.numel() * itemsize)
        return plan

    def gather_weight_bucket(self, names: list[str]) -> list[tuple[str, torch.Tensor]]:
        """The full CPU tensors `names` (one bucket of `weight_bucket_plan`) on rank 0, [] on the others; a
        collective: every rank calls it with the same names."""
        state = self.model.state_dict()
        return self._gather_bucket([(name, state[name]) for name in names], self._export_dtype())

    def iter_weight_buckets(self, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Full HF-named CPU tensors (in the source model's dtype) bucket by bucket, `list[tuple[str,
        Tensor]]`, yielded on rank 0 only. EVERY rank must exhaust it (one collective per bucket). Only one
        bucket is alive at a time here (plus wherever the caller keeps it)."""
        for names, _ in self.weight_bucket_plan(bucket_bytes):
            bucket = self.gather_weight_bucket(names)
            if self.rank == 0:
                yield bucket

    def init_weight_transfer(
        self, backend: str, *, client, bucket_bytes: int, master_address: str, world_size: int, timeout_s: float
    ) -> str | None:
        """The handshake of a weight transport through vLLM's API (learner/transfer.py: "gloo" or "nccl"), on
        every rank at once; replaces the previous one. `client` drives the engines (rank 0 uses it);
        `world_size` = 1 + every engine worker. Returns why the engines' side failed (rank 0, gloo), else None."""
        from learner.transfer import EngineSideError, start_transfer  # heavy: vLLM, only in runs that push this way

        self.close_weight_transfer()
        try:
            self.weight_transfer = start_transfer(
                self,
                backend,
                client=client,
                bucket_bytes=bucket_bytes,
                master_address=master_address,
                world_size=world_size,
                timeout_s=timeout_s,
            )
        except EngineSideError as err:
            return str(err)
        return None

    def send_weights(self, policy_version: int) -> dict:
        """Push the current weights through the transport of the last handshake (every rank at once; rank 0
        sends, the engines' weight version becomes `policy_version`). Returns {"seconds", "bytes", "num_buckets",
        "error"}:
        `error` (rank 0) is why the engines did not take the weights (an engine lost, a timeout), None when
        they did; the learner's own ranks finish their gathers either way and stay usable."""
        from learner.transfer import EngineSideError  # heavy: vLLM

        if self.weight_transfer is None:
            raise RuntimeError("send_weights before init_weight_transfer")
        start, error = time.perf_counter(), None
        if self.weight_transfer.is_sender:
            self.weight_transfer.client.weight_version = str(int(policy_version))
        try:
            self.weight_transfer.send_weights()
        except EngineSideError as err:
            error = str(err)
        nbytes = sum(torch.Size(m.shape).numel() * m.dtype.itemsize for m in self.weight_transfer.source.metadata())
        num_buckets = len(self.weight_transfer.source.plan)
        return {"seconds": time.perf_counter() - start, "bytes": nbytes, "num_buckets": num_buckets, "error": error}

    def close_weight_transfer(self) -> None:
        """Close the transport of the last handshake (its process group), if any."""
        if self.weight_transfer is not None:
            transfer, self.weight_transfer = self.weight_transfer, None
            transfer.shutdown()

    def gather_packed_bucket(self, names: list[str]) -> tuple[list[tuple[str, torch.Tensor]], torch.Tensor | None]:
        """Like gather_weight_bucket, but rank 0's full tensors are views of one uint8 tensor, returned second
        (None on the other ranks), which a transport sends as it is: the tensors back to back in `names` order.
        On this rank's device."""
        state = self.model.state_dict()
        return self._gather_bucket([(name, state[name]) for name in names], self._export_dtype(), packed=True)

    def _gather_bucket(self, group: list[tuple[str, torch.Tensor]], dtype: torch.dtype, packed: bool = False):
        """Full CPU tensors of `group` on rank 0 ([] elsewhere). FSDP2 shards a parameter along dim 0 in
        torch.chunk layout (rank r holds rows [r·c, (r+1)·c), c = ceil(rows / world_size)), so rank 0 receives
        each rank's rows straight into the full tensor (one batch of point-to-point transfers per bucket, no
        intermediate buffers). Any other tensor (a buffer, another placement) goes through `full_tensor`.
        `packed`: see gather_packed_bucket (the full tensors are carved out of one buffer, left on the device)."""
        ws = self.world_size
        full: dict[int, torch.Tensor] = {}
        buffer = None
        if packed and self.rank == 0:
            sizes = [t.numel() * dtype.itemsize for _, t in group]
            buffer = torch.empty(sum(sizes), dtype=torch.uint8, device=self.device)
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            for i, (_, tensor) in enumerate(group):
                full[i] = buffer[starts[i] : starts[i] + sizes[i]].view(dtype).view(tensor.shape)
        sharded = []
        for i, (_, tensor) in enumerate(group):
            if isinstance(tensor, DTensor) and tensor.dim() > 0 and tuple(tensor.placements) == (Shard(0),):
                sharded.append(i)
            else:  # collectives first, so that they never interleave with the point-to-point batch
                gathered = _full(tensor)
                if self.rank == 0 and packed:
                    full[i].copy_(gathered.detach())
                elif self.rank == 0:
                    full[i] = gathered.detach().to("cpu", dtype)
        ops = []
        for i in sharded:
            tensor = group[i][1]
            local = tensor.to_local().detach().to(dtype).contiguous()
            rows = tensor.shape[0]
            chunk_rows = -(-rows // ws)
            if self.rank == 0:
                out = full[i] if packed else torch.empty(tensor.shape, dtype=dtype, device=local.device)
                out[: local.shape[0]].copy_(local)
                for src in range(1, ws):
                    start, stop = src * chunk_rows, min(rows, (src + 1) * chunk_rows)
                    if stop > start:
                        ops.append(dist.P2POp(dist.irecv, out[start:stop], src))
                full[i] = out
            elif local.shape[0] > 0:
                ops.append(dist.P2POp(dist.isend, local, 0))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        if packed:
            return [(name, full[i]) for i, (name, _) in enumerate(group)] if self.rank == 0 else [], buffer
        if self.rank != 0:
            return []
        return [(name, full[i].cpu()) for i, (name, _) in enumerate(group)]


def make_optimizer(model: torch.nn.Module, opt: OptimizerConfig, device_type: str) -> torch.optim.AdamW:
    """The learner's AdamW over `model`'s (sharded) parameters. CUDA: the fused kernel, which needs no
    parameter-sized temporaries (foreach's would hold another float32 copy of this rank's parameters during the
    step); the CPU keeps the default."""
    return torch.optim.AdamW(
        model.parameters(),
        lr=opt.lr,
        betas=opt.betas,
        eps=opt.eps,
        weight_decay=opt.weight_decay,
        fused=True if device_type == "cuda" else None,
    )


def _shard_state(state: dict[str, torch.Tensor], shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    return shards
