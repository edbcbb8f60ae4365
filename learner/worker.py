"""One learner rank: a Hugging Face causal LM sharded with FSDP2 over the learner's process group.

`LearnerWorker` is a plain class (no Ray): it expects `torch.distributed` to be initialised (every rank of
the group constructs one at the same time; `learner/group.py` does that inside Ray actors, tests with world
size 1 do it in-process). All ranks must call the same methods in the same order with the same batch: each
method runs collectives.

What a step does here:
* `compute_log_probs(batch)`: no-grad forward of [prompt | response], float32 log-softmax of the logits,
  log-prob of each response token → [B, T] (0 on padding); π_old, or π_ref from a frozen reference copy.
* `update(batch)`: mini-batches in order (one optimizer step each), each split over the ranks and into
  micro-batches by a token budget (`learner/batching.py`, the same plan as compute_log_probs, so that on the
  first mini-batch log π_θ − log π_old is exactly 0 and FIPO equals DAPO bitwise).

Loss normalisation and gradient reduction. The policy loss of a micro-batch is Σ(per-token loss) / N where N
is the GLOBAL count of the mini-batch (`advantage.loss_normalizer` summed over all micro-batches of all ranks
with one all_reduce), so the mini-batch gradient is the SUM of the micro-batch gradients over micro-batches
and ranks. Micro-batch gradients accumulate by summation in `.grad`; FSDP2 reduce-scatters the rank
gradients with an AVERAGE (divides by world_size), so each backward is taken of `loss · world_size`. The
result is independent of the micro-batch split and of the world size (tested).
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import time
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from advantage import POLICY_LOSSES, RolloutBatch, loss_normalizer
from learner.batching import loss_mask, micro_batch_inputs, plan_micro_batches
from learner.config import LearnerConfig
from learner.distributed import learner_device

# Metrics the policy losses return that are partial sums under a global normaliser (summed over
# micro-batches and ranks); "*_min" / "*_max" reduce with min / max; all others are token-weighted means.
SUM_METRICS = ("loss", "pg_loss", "kl_loss", "dropped_seqs")
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
EXPORT_SHARD_BYTES = 4 << 30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def token_log_probs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] in float32.

    Args:
        logits: [b, t, V] any float dtype, the model's prediction for each of the t tokens.
        token_ids: [b, t] int64, the tokens whose log-probs are wanted.
    Returns: [b, t] float32.
    """
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position, float32, no grad. logits: [b, t, V] → [b, t]."""
    with torch.no_grad():
        logits = logits.detach().float()
        probs = torch.softmax(logits, dim=-1)
        return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks (the classes HF lists in `_no_split_modules`, e.g. Qwen2DecoderLayer)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers found (looked for classes {sorted(names)})")
    return layers


def load_fsdp_model(model_dir: str, mesh, param_dtype: str, *, trainable: bool) -> torch.nn.Module:
    """AutoModelForCausalLM from `model_dir` in float32, sharded with FSDP2: one group per decoder layer plus
    the root (which keeps the embeddings and the head together, as tied embeddings need). Dropout is off
    (eval mode): the ratio π_θ / π_old must compare deterministic forward passes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model.eval()
    model.requires_grad_(trainable)
    if param_dtype == "float32":
        mp_policy = MixedPrecisionPolicy()
    else:
        mp_policy = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=torch.float32)
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    return model


def _checkpoint_dtype(model_dir: str) -> torch.dtype:
    """The floating dtype `model_dir`'s config.json declares (float32 when it declares none)."""
    config = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, dtype) if isinstance(getattr(torch, dtype, None), torch.dtype) else torch.float32


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class LearnerWorker:
    """One rank of the learner (see the module docstring). Construct on every rank at the same time."""

    def __init__(self, config: LearnerConfig) -> None:
        if not dist.is_initialized():
            raise RuntimeError("LearnerWorker needs torch.distributed initialised (learner.distributed)")
        self.config = config
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = learner_device()
        torch.manual_seed(config.seed + self.rank)
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        self.model = load_fsdp_model(config.model_dir, self.mesh, config.param_dtype, trainable=True)
        self.ref_model = None
        if config.uses_reference:
            ref_dir = config.ref_model_dir or config.model_dir
            self.ref_model = load_fsdp_model(ref_dir, self.mesh, config.param_dtype, trainable=False)
        opt = config.optimizer
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay
        )
        self.policy_loss = POLICY_LOSSES.get(config.policy_loss)
        self._source_dtype = _checkpoint_dtype(config.model_dir)
        self.optimizer_steps = 0
        """Optimizer steps taken so far; the learning-rate schedule is a function of it."""
        self._warned_single_mini_batch = False

    # ------------------------------------------------------------------------------------------------------
    # forward

    def _plan(self, batch: RolloutBatch) -> list[list[range]]:
        return plan_micro_batches(
            batch.prompt_mask,
            batch.response_mask,
            mini_batch_samples=self.config.mini_batch_samples,
            micro_batch_tokens=self.config.micro_batch_tokens,
            world_size=self.world_size,
            rank=self.rank,
        )

    def _response_logits(self, model: torch.nn.Module, inputs) -> torch.Tensor:
        """[b, t, V] logits predicting each response token (the last t + 1 positions, minus the last)."""
        out = model(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            use_cache=False,
            logits_to_keep=inputs.response_len + 1,
        )
        return out.logits[:, :-1]

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
            for micro_batches in plan:
                for rows in micro_batches:
                    inputs = micro_batch_inputs(batch, rows, self.device)
                    log_probs = token_log_probs(self._response_logits(model, inputs), inputs.response_ids)
                    padded = torch.zeros(len(rows), width, dtype=torch.float32, device=self.device)
                    padded[:, : inputs.response_len] = log_probs
                    local.append(padded)
        local = torch.cat(local)  # this rank's share of every mini-batch, in order: [B / world_size, T]
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local)
        num_mini = len(plan)
        share = num_rows // num_mini // self.world_size
        full = torch.stack(gathered).view(self.world_size, num_mini, share, width).transpose(0, 1)
        full = full.reshape(num_rows, width).cpu()
        return torch.where(batch.response_mask.bool(), full, 0.0)

    # ------------------------------------------------------------------------------------------------------
    # update

    def update(self, batch: RolloutBatch) -> list[dict[str, float]]:
        """One optimizer step per mini-batch of `batch` (in order, one pass); returns metrics per mini-batch.

        `batch` must carry old_log_probs and advantages (and ref_log_probs when the loss has a KL term).
        Metrics (identical on every rank): learner/loss, learner/grad_norm, learner/lr, learner/entropy,
        every metric the policy loss returns (clip fractions, FIPO's influence-weight statistics, ...) under
        learner/, learner/num_micro_batches (per rank), learner/response_tokens and
        perf/learner_tokens_per_s (global). A non-finite gradient norm, or a mini-batch without loss tokens,
        skips the optimizer step (learner/skipped_step = 1).
        """
        if batch.old_log_probs is None or batch.advantages is None:
            raise ValueError("update needs batch.old_log_probs (compute_log_probs) and batch.advantages")
        if self.config.uses_reference and batch.ref_log_probs is None:
            raise ValueError(f"policy loss {self.config.policy_loss!r} has a KL term: update needs ref_log_probs")
        plan = self._plan(batch)
        if len(plan) == 1 and self.config.policy_loss == "fipo" and not self._warned_single_mini_batch:
            warnings.warn(
                "FIPO with one mini-batch per step: θ = θ_old throughout, so FIPO reduces to DAPO "
                "(use mini_batch_samples < the step's batch size)",
                stacklevel=2,
            )
            self._warned_single_mini_batch = True
        mask = loss_mask(batch)
        return [self._update_mini_batch(batch, mask, micro_batches) for micro_batches in plan]

    def _update_mini_batch(
        self, batch: RolloutBatch, mask: torch.Tensor, micro_batches: list[range]
    ) -> dict[str, float]:
        start = time.perf_counter()
        cfg = self.config.policy_loss_config
        normalizer = sum(loss_normalizer(mask[rows.start : rows.stop], cfg.loss_agg_mode) for rows in micro_batches).to(
            self.device
        )
        dist.all_reduce(normalizer)  # the mini-batch's global token (or sequence) count
        self.optimizer.zero_grad(set_to_none=True)

        sums: dict[str, torch.Tensor] = {}
        mins: dict[str, torch.Tensor] = {}
        maxs: dict[str, torch.Tensor] = {}
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        loss_tokens, attended_tokens, entropy_sum = zero.clone(), zero.clone(), zero.clone()
        for rows in micro_batches:
            inputs = micro_batch_inputs(batch, rows, self.device)
            t = inputs.response_len
            sl = slice(rows.start, rows.stop)
            mb_mask = mask[sl, :t].to(self.device)
            logits = self._response_logits(self.model, inputs)
            log_probs = token_log_probs(logits, inputs.response_ids)
            ref = None if batch.ref_log_probs is None else batch.ref_log_probs[sl, :t].to(self.device)
            loss, loss_metrics = self.policy_loss.fn(
                log_probs,
                batch.old_log_probs[sl, :t].to(self.device),
                batch.advantages[sl, :t].to(self.device),
                mb_mask,
                cfg,
                ref_log_probs=ref,
                normalizer=normalizer,
            )
            # FSDP2 averages gradients over ranks; the loss is already globally normalised, so ×world_size
            # turns that average into the sum (see the module docstring).
            (loss * self.world_size).backward()

            n_tokens = mb_mask.sum().float()
            entropy_sum += (entropy_from_logits(logits) * mb_mask).sum()
            loss_tokens += n_tokens
            attended_tokens += inputs.attention_mask.sum().float()
            for key, value in loss_metrics.items():
                value = value.to(self.device, torch.float32)
                if key in SUM_METRICS:
                    sums[key] = sums.get(key, zero) + value
                elif key.endswith("_min"):
                    mins[key] = torch.minimum(
                        mins.get(key, zero + math.inf), torch.where(n_tokens > 0, value, math.inf)
                    )
                elif key.endswith("_max"):
                    maxs[key] = torch.maximum(
                        maxs.get(key, zero - math.inf), torch.where(n_tokens > 0, value, -math.inf)
                    )
                else:  # a mean over the micro-batch's tokens: weight it by them
                    sums[key] = sums.get(key, zero) + value * n_tokens
            del logits, log_probs, loss

        grad_clip = self.config.optimizer.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), max_norm=math.inf if grad_clip is None else grad_clip
        )
        grad_norm = _full(grad_norm).float()
        lr = self.config.optimizer.lr * self.config.lr_schedule.lr_factor(self.optimizer_steps)
        # the one host sync of the step besides the metrics; a mini-batch without loss tokens takes no step
        finite = bool(torch.isfinite(grad_norm)) and float(normalizer) > 0
        if finite:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.optimizer_steps += 1
        self.optimizer.zero_grad(set_to_none=True)

        return self._reduce_metrics(
            sums, mins, maxs, loss_tokens, attended_tokens, entropy_sum,
            extra={
                "learner/grad_norm": grad_norm,
                "learner/lr": lr,
                "learner/skipped_step": float(not finite),
                "learner/num_micro_batches": float(len(micro_batches)),
            },
            start=start,
        )  # fmt: skip

    def _reduce_metrics(
        self,
        sums: dict[str, torch.Tensor],
        mins: dict[str, torch.Tensor],
        maxs: dict[str, torch.Tensor],
        loss_tokens: torch.Tensor,
        attended_tokens: torch.Tensor,
        entropy_sum: torch.Tensor,
        *,
        extra: dict,
        start: float,
    ) -> dict[str, float]:
        """One all_reduce per reduction kind over the mini-batch's accumulated metric tensors, one host copy."""
        sum_keys, min_keys, max_keys = sorted(sums), sorted(mins), sorted(maxs)
        summed = torch.stack([sums[k] for k in sum_keys] + [loss_tokens, attended_tokens, entropy_sum])
        dist.all_reduce(summed)
        lows = torch.stack([mins[k] for k in min_keys]) if min_keys else None
        highs = torch.stack([maxs[k] for k in max_keys]) if max_keys else None
        if lows is not None:
            dist.all_reduce(lows, op=dist.ReduceOp.MIN)
        if highs is not None:
            dist.all_reduce(highs, op=dist.ReduceOp.MAX)
        summed = summed.tolist()
        tokens, attended, entropy = summed[-3:]
        metrics: dict[str, float] = {}
        for key, value in zip(sum_keys, summed):
            metrics[f"learner/{key}"] = value if key in SUM_METRICS else value / max(tokens, 1.0)
        for keys, values in ((min_keys, lows), (max_keys, highs)):
            for key, value in zip(keys, [] if values is None else values.tolist()):
                metrics[f"learner/{key}"] = value if math.isfinite(value) else 0.0
        metrics["learner/entropy"] = entropy / max(tokens, 1.0)
        metrics["learner/response_tokens"] = tokens
        for key, value in extra.items():
            metrics[key] = float(value)
        metrics["perf/learner_tokens_per_s"] = attended / (time.perf_counter() - start)
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

    def _gather_bucket(
        self, group: list[tuple[str, torch.Tensor]], dtype: torch.dtype
    ) -> list[tuple[str, torch.Tensor]]:
        """Full CPU tensors of `group` on rank 0 ([] elsewhere). FSDP2 shards a parameter along dim 0 in
        torch.chunk layout (rank r holds rows [r·c, (r+1)·c), c = ceil(rows / world_size)), so rank 0 receives
        each rank's rows straight into the full tensor (one batch of point-to-point transfers per bucket, no
        intermediate buffers). Any other tensor (a buffer, another placement) goes through `full_tensor`."""
        ws = self.world_size
        full: dict[int, torch.Tensor] = {}
        sharded = []
        for i, (_, tensor) in enumerate(group):
            if isinstance(tensor, DTensor) and tensor.dim() > 0 and tuple(tensor.placements) == (Shard(0),):
                sharded.append(i)
            else:  # collectives first, so that they never interleave with the point-to-point batch
                gathered = _full(tensor)
                if self.rank == 0:
                    full[i] = gathered.detach().to("cpu", dtype)
        ops = []
        for i in sharded:
            tensor = group[i][1]
            local = tensor.to_local().detach().to(dtype).contiguous()
            rows = tensor.shape[0]
            chunk_rows = -(-rows // ws)
            if self.rank == 0:
                out = torch.empty(tensor.shape, dtype=dtype, device=local.device)
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
        if self.rank != 0:
            return []
        return [(name, full[i].cpu()) for i, (name, _) in enumerate(group)]


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
