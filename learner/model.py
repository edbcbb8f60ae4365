"""Building the learner's model: a Hugging Face causal LM sharded with FSDP2, loaded without a full copy on
every rank, with optional activation checkpointing and a forward that returns response-token log-probs.

Loading (`build_fsdp_model`, then `load_checkpoint`), so that host memory per rank is O(model / world size +
one tensor), except on rank 0:
1. every rank builds the model from its config on the meta device (no memory), applies activation
   checkpointing and FSDP2 (one group per decoder layer plus the root, which keeps the embeddings and the head
   together as tied embeddings need), then allocates only its own shards (`to_empty`);
2. rank 0 alone reads the checkpoint (transformers' `from_pretrained`, in the checkpoint's dtype, on the CPU);
3. `set_model_state_dict(..., full_state_dict=True, broadcast_from_rank0=True)` sends the weights one tensor at
   a time (in the checkpoint's dtype; the copy into the float32 shard casts, exactly as loading in float32
   would); each rank keeps its shard. Buffers that are not in the checkpoint (the rotary inverse frequencies)
   are broadcast from rank 0's loaded model.

The forward (`response_log_probs`) runs the decoder on a micro-batch (packed or padded, learner/batching.py),
takes the final hidden states only at the positions that predict response tokens, and computes their
log-probs with the chunked head of learner/logprobs.py. It is registered as an FSDP forward method, so the
root group's parameters (embeddings, final norm, head) are gathered for it like for `forward`.
"""

from __future__ import annotations

import functools
import json
import pathlib
import types

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.utils.checkpoint import checkpoint

from actors.console import without_progress_bars
from learner.attention import PACKED_ATTENTION, PackedSequences, register_packed_attention
from learner.batching import MicroBatchInputs
from learner.logprobs import head_log_probs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks (the classes HF lists in `_no_split_modules`, e.g. Qwen2DecoderLayer)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers found (looked for classes {sorted(names)})")
    return layers


def checkpoint_dtype(model_dir: str) -> torch.dtype:
    """The floating dtype `model_dir`'s config.json declares (float32 when it declares none)."""
    config = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, dtype) if isinstance(getattr(torch, dtype, None), torch.dtype) else torch.float32


def checkpoint_activations(layer: torch.nn.Module) -> None:
    """Recompute `layer`'s forward in backward instead of keeping its activations (torch.utils.checkpoint,
    non-reentrant). Only the layer's input stays alive between forward and backward. The FSDP2 hooks stay
    outside the checkpointed function (they belong to the module call, not to `forward`), so the recompute
    uses the parameters FSDP gathered for backward. Without autograd (log-prob recomputation) it is the plain
    forward: the same computation, so the values are the same bits either way."""
    forward = layer.forward

    @functools.wraps(forward)
    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    layer.forward = checkpointed


def _non_persistent_buffers(model: torch.nn.Module) -> list[str]:
    return sorted(
        f"{prefix}.{name}" if prefix else name
        for prefix, module in model.named_modules()
        for name in module._non_persistent_buffers_set
    )


def build_fsdp_model(
    model_dir: str,
    mesh,
    device: torch.device,
    *,
    param_dtype: str,
    trainable: bool,
    activation_checkpointing: bool = False,
) -> torch.nn.Module:
    """Step 1 of loading (module docstring): the model of `model_dir`'s config.json, float32 master weights
    sharded with FSDP2 over `mesh` and allocated on `device`, values NOT loaded (uninitialised). Dropout is off
    (eval mode): the ratio π_θ / π_old must compare deterministic forward passes. The model gains a method
    `response_log_probs` (see `response_log_probs` below). Alone (no `load_checkpoint`), what the memory
    planner (orchestration/cluster/fit.py) runs on fake tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    register_packed_attention()
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=PACKED_ATTENTION)
    model.config.use_cache = False
    model.eval()
    model.requires_grad_(trainable)
    if param_dtype == "float32":
        mp_policy = MixedPrecisionPolicy()
    else:
        mp_policy = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        if activation_checkpointing and trainable:
            checkpoint_activations(layer)
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    model.to_empty(device=device)
    model.response_log_probs = types.MethodType(response_log_probs, model)
    register_fsdp_forward_method(model, "response_log_probs")
    return model


def load_checkpoint(model: torch.nn.Module, model_dir: str) -> None:
    """The checkpoint's weights and buffers of `model_dir`, loaded into `model` as `build_fsdp_model` made it
    (steps 2-3 of the module docstring). Every rank must call it at the same time (collectives)."""
    from transformers import AutoModelForCausalLM

    source = None
    if dist.get_rank() == 0:  # in the checkpoint's dtype: each tensor becomes float32 as it is copied into a shard
        with without_progress_bars():
            source = AutoModelForCausalLM.from_pretrained(model_dir, dtype=checkpoint_dtype(model_dir))
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, source.state_dict() if source is not None else {}, options=options)
    with torch.no_grad():
        for name in _non_persistent_buffers(model):
            buffer = model.get_buffer(name)
            if source is not None:
                buffer.copy_(source.get_buffer(name))
            dist.broadcast(buffer, src=0)
    del source


def response_log_probs(
    model: torch.nn.Module, inputs: MicroBatchInputs, *, chunk_tokens: int, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and optionally entropies) of a micro-batch's response tokens, bound to the model as
    `model.response_log_probs(inputs, chunk_tokens=..., with_entropy=...)`.

    Args:
        inputs: the micro-batch's model inputs on the model's device (packed or padded).
        chunk_tokens: positions per chunk of the LM head (learner/logprobs.py; 0 = all at once).
        with_entropy: also return each position's entropy (detached).
    Returns: (log_probs [b, t] float32 with grad, entropy [b, t] float32 or None), in the micro-batch's response
        layout (t = inputs.response_len); 0 past each sample's response.
    """
    if inputs.packed:  # a ready "mask" (None) per layer type: transformers builds none; the attention knows the samples
        attention = {
            "attention_mask": dict.fromkeys(set(getattr(model.config, "layer_types", None) or ["full_attention"])),
            "packed_sequences": PackedSequences(
                inputs.seq_lens, inputs.cu_seq_lens, max(inputs.seq_lens), rows=inputs.attention_rows
            ),
        }
    else:
        attention = {"attention_mask": inputs.attention_mask}
    hidden = model.model(
        input_ids=inputs.input_ids, position_ids=inputs.position_ids, use_cache=False, **attention
    ).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, inputs.target_index)  # [M, H]
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("response_log_probs: an LM head with a bias")
    log_probs, entropy = head_log_probs(
        hidden, head.weight, inputs.target_ids, chunk_tokens=chunk_tokens, with_entropy=with_entropy
    )
    b, t = len(inputs.rows), inputs.response_len
    where = (inputs.response_index // t, inputs.response_index % t)

    def to_layout(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(b, t).index_put(where, values)  # a new tensor, not a view (FSDP hooks it)

    return to_layout(log_probs), None if entropy is None else to_layout(entropy)
