"""Attention for packed micro-batches: the samples of a micro-batch concatenated into one row, each sample
attending causally to itself only (a block-diagonal causal mask), so no padding is computed and no token sees
another sample.

transformers (5.x) calls, in every decoder layer, the attention function that `config._attn_implementation`
names in its `AttentionInterface`, and passes it the keyword arguments given to the model's forward. The
learner's models are built with `PACKED_ATTENTION`, registered here:

* called with `packed_sequences=PackedSequences(...)` (the packed layout; `learner/model.py` passes it), it runs
  block-diagonal causal attention:
  - CUDA, bf16/fp16, `torch.nn.attention.varlen.varlen_attn` present: that FlashAttention varlen kernel, one
    call over all samples (its signature is feature-detected: torch 2.11 and 2.13 spell "causal" and "grouped
    query attention" differently; without a GQA flag the key/value heads are repeated);
  - otherwise (the CPU, float32, an older torch): one `scaled_dot_product_attention(is_causal=True)` per sample
    over its own slice, from the sample lengths the host already knows (no device sync);
  - with shared prompts (segments [prompt | response 1 | response 2 | ...], `PackedSequences.rows`), on any
    device: one SDPA call over "attention rows" gathered from the packed row — a prompt's queries over its own
    keys (causal), a response's queries over [its prompt's keys | its own keys] (all of the prompt, its own
    causally) — padded to the longest row and masked (`shared_prompt_rows`), the outputs gathered back;
* called without it (the right-padded layout), it is transformers' own SDPA attention, unchanged.

Verified: both CPU paths (per sample, and shared-prompt rows) against the padded SDPA path and float64
references, log-probs, gradients and parameters after an update (tests/test_learner_packing.py).
The CUDA varlen path is written for torch 2.11 and tested only where a GPU runs that test file (the GPU suite,
bench/gpu_suite.py); it is not exercised on the development machine.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "learner_packed_sdpa"


@dataclass(frozen=True)
class PackedSequences:
    """Where each sample lies in a packed row of N tokens (n samples).

    seq_lens:    n host ints, tokens per segment (Σ = N), in row order: a segment is one sample, or one
                 prompt and the responses after it (shared prompts).
    cu_seq_lens: [n + 1] int32 on the compute device: 0, then the running sum of seq_lens.
    max_len:     max(seq_lens), a host int.
    rows:        shared prompts only: who attends to whom (`shared_prompt_rows`); None: every segment is one
                 causal sample.
    """

    seq_lens: tuple[int, ...]
    cu_seq_lens: torch.Tensor
    max_len: int
    rows: AttentionRows | None = None


@dataclass(frozen=True)
class AttentionRows:
    """A packed row of N positions as R attention rows (a prompt, or a response with its prompt before it).

    query_index:  [R, Tq] int64, the packed positions of each row's queries (N past its end: padding).
    key_index:    [R, Tk] int64, the packed positions of each row's keys (N past its end: padding).
    visible:      [R, 1, Tq, Tk] bool, which key each query sees (a padded query sees key 0 only, so that no
                  softmax is empty; its output is never read).
    output_index: [N] int64, for each packed position, r · Tq + t of the row r and slot t holding its query.
    """

    query_index: torch.Tensor
    key_index: torch.Tensor
    visible: torch.Tensor
    output_index: torch.Tensor


def shared_prompt_rows(shared: Sequence[tuple[int, Sequence[int]]]) -> AttentionRows:
    """The attention rows (host tensors) of a packed row of segments [prompt | response 1 | response 2 | ...]
    described by `shared`: per segment (prompt tokens P, tokens of each response). A prompt row: its P queries
    over its P keys, causal. A response row of n tokens: its n queries over [the P prompt keys | its n keys],
    query t seeing every prompt key and its own keys 0..t. Empty responses make no row."""
    rows = []  # (query positions, key positions, visible [q, k])
    start = 0
    for p, response_lens in shared:
        prompt = torch.arange(start, start + p)
        rows.append((prompt, prompt, torch.ones(p, p, dtype=torch.bool).tril()))
        start += p
        for n in response_lens:
            own = torch.arange(start, start + n)
            if n:
                rows.append((own, torch.cat([prompt, own]), torch.ones(n, p + n, dtype=torch.bool).tril(p)))
            start += n
    tq, tk = max(len(q) for q, _, _ in rows), max(len(k) for _, k, _ in rows)
    query_index = torch.full((len(rows), tq), start, dtype=torch.int64)
    key_index = torch.full((len(rows), tk), start, dtype=torch.int64)
    visible = torch.zeros(len(rows), 1, tq, tk, dtype=torch.bool)
    visible[:, 0, :, 0] = True  # padded queries see one key; real ones are overwritten below
    output_index = torch.empty(start, dtype=torch.int64)
    for r, (q, k, seen) in enumerate(rows):
        query_index[r, : len(q)], key_index[r, : len(k)] = q, k
        visible[r, 0, : len(q), : len(k)] = seen
        output_index[q] = r * tq + torch.arange(len(q))
    return AttentionRows(query_index, key_index, visible, output_index)


def _detect_varlen() -> tuple[Callable, dict, set[str]] | None:
    """(varlen_attn, its causal keyword arguments, the names of its parameters), or None when this torch has no
    usable varlen_attn (added in torch 2.9; "causal" is `is_causal=True` in some versions, `window_size=(-1, 0)`
    in others; `enable_gqa` and `scale` are not in every version)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "is_causal" in params:
        causal = {"is_causal": True}
    elif "window_size" in params:
        causal = {"window_size": (-1, 0)}
    else:
        return None
    return varlen_attn, causal, set(params)


_VARLEN = _detect_varlen()


def packed_kernel(device_type: str, dtype: torch.dtype) -> str:
    """The kernel the packed path uses for inputs of this device type and dtype: "varlen_attn" or
    "sdpa_per_sample" (reported by the benchmark)."""
    if device_type == "cuda" and dtype in (torch.bfloat16, torch.float16) and _VARLEN is not None:
        return "varlen_attn"
    return "sdpa_per_sample"


def _varlen_attention(query, key, value, packed: PackedSequences, scaling: float | None) -> torch.Tensor:
    """[1, Hq, N, D] queries, [1, Hkv, N, D] keys/values → [1, N, Hq, D] with FlashAttention's varlen kernel."""
    varlen_attn, causal, params = _VARLEN
    q, k, v = (x[0].transpose(0, 1).contiguous() for x in (query, key, value))  # [N, H, D]
    extra = dict(causal)
    if "scale" in params:
        extra["scale"] = scaling
    elif scaling is not None and scaling != q.shape[-1] ** -0.5:
        raise NotImplementedError("this torch's varlen_attn takes no scale; the model's is not 1/sqrt(head_dim)")
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    cu = packed.cu_seq_lens
    out = varlen_attn(q, k, v, cu, cu, packed.max_len, packed.max_len, **extra)
    return out.unsqueeze(0)


def _per_sample_attention(query, key, value, packed: PackedSequences, scaling: float | None, dropout: float):
    """[1, Hq, N, D] queries, [1, Hkv, N, D] keys/values → [1, N, Hq, D]: causal SDPA over each sample's slice."""
    gqa = query.shape[1] != key.shape[1]
    outs, start = [], 0
    for n in packed.seq_lens:
        sl = slice(start, start + n)
        outs.append(
            F.scaled_dot_product_attention(
                query[:, :, sl], key[:, :, sl], value[:, :, sl],
                dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa,
            )
        )  # fmt: skip
        start += n
    return torch.cat(outs, dim=2).transpose(1, 2)


def _row_attention(query, key, value, rows: AttentionRows, scaling: float | None, dropout: float):
    """[1, Hq, N, D] queries, [1, Hkv, N, D] keys/values → [1, N, Hq, D]: one SDPA over the attention rows."""

    def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # [1, H, N, D] → [R, H, L, D]
        padded = F.pad(x[0], (0, 0, 0, 1))  # position N: a zero vector for the padding
        return padded[:, index].transpose(0, 1)

    out = F.scaled_dot_product_attention(
        gather(query, rows.query_index), gather(key, rows.key_index), gather(value, rows.key_index),
        attn_mask=rows.visible, dropout_p=dropout, scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
    )  # fmt: skip
    r, heads, tq, dim = out.shape
    return out.transpose(1, 2).reshape(r * tq, heads, dim).index_select(0, rows.output_index).unsqueeze(0)


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    packed_sequences: PackedSequences | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [b, Hq, N, D], key/value [b, Hkv, N, D] → (output
    [b, N, Hq, D], None). Block-diagonal causal attention when `packed_sequences` is given (b = 1, no mask);
    transformers' SDPA attention otherwise."""
    if packed_sequences is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("packed attention does not implement sliding-window layers (set packing=False)")
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError("packed attention takes one packed row (batch size 1) and no attention mask")
    if packed_sequences.rows is not None:
        return _row_attention(query, key, value, packed_sequences.rows, scaling, dropout), None
    if packed_kernel(query.device.type, query.dtype) == "varlen_attn" and dropout == 0.0:
        return _varlen_attention(query, key, value, packed_sequences, scaling), None
    return _per_sample_attention(query, key, value, packed_sequences, scaling, dropout), None


def register_packed_attention() -> None:
    """Register `PACKED_ATTENTION` with transformers (idempotent): the attention function above, and SDPA's
    mask builder for the padded layout."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
