"""The learner's scale features are exact: packed micro-batches, the chunked LM head, activation checkpointing
and sharded (meta-device) loading give the same log-probs, gradients and parameters as the padded reference
path, which tests/test_learner.py pins against an independent transformers computation; here also against a
float64 transformers forward. One rank in-process (real FSDP2 over a one-process gloo group).

The CUDA test at the end (varlen attention kernel vs per-sample SDPA) runs only where a GPU is visible.
"""

import copy

import fp_bounds as fp
import pytest
import torch
from float64_checks import Run, check_first_step, check_log_probs, check_second_step, float64_reference
from test_learner import make_config as learner_config
from test_learner import process_group  # noqa: F401  (a fixture, used below)
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from learner.attention import PackedSequences, packed_attention, packed_kernel, shared_prompt_rows
from learner.batching import micro_batch_inputs
from learner.config import LearnerConfig
from learner.logprobs import head_log_probs
from learner.synthetic import random_batch
from learner.worker import LearnerWorker
from rollout.tiny import VOCAB_SIZE, build_tiny_model

REFERENCE = dict(packing=False, logprob_chunk_tokens=0, activation_checkpointing=False)
pytestmark = pytest.mark.usefixtures("process_group")  # one gloo group of world size 1 for the module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # 4 query heads over 2 key/value heads (grouped-query attention, as Qwen2.5), 3 layers
    path = tmp_path_factory.mktemp("packing") / "tiny"
    return str(
        build_tiny_model(path, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    )


def make_config(model_dir, **overrides) -> LearnerConfig:
    # FIPO, a few micro-batches per mini-batch; the rest as tests/test_learner.py
    return learner_config(model_dir, **{"micro_batch_tokens": 90, "policy_loss": "fipo", **overrides})


def train(model_dir, batch, **overrides) -> Run:
    """One step of two mini-batches (float64_checks.Run: π_old, per-mini-batch metrics, the state after the first
    mini-batch's optimizer step and at the end)."""
    worker = LearnerWorker(make_config(model_dir, **overrides))
    old = worker.compute_log_probs(batch)
    first = worker.update(batch.select(slice(0, 8)).replace(old_log_probs=old[:8]))
    after_first = copy.deepcopy(worker.full_state_dict(optimizer=True))  # in-process: live tensors
    rest = worker.update(batch.select(slice(8, None)).replace(old_log_probs=old[8:]))
    return Run(old, first + rest, after_first, worker.full_state_dict(optimizer=True))


# ----------------------------------------------------------------------------------------------------------
# the chunked LM head


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_head_matches_float64_and_never_holds_all_logits(dtype):
    gen = torch.Generator().manual_seed(0)
    num, hidden_size, vocab, chunk = 61, 24, 997, 8  # chunks and vocabulary slices that do not divide evenly
    hidden = torch.randn(num, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5
    ids = torch.randint(0, vocab, (num,), generator=gen)
    upstream = torch.randn(num, generator=gen)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logits64 = h64 @ w64.T
    want = torch.log_softmax(logits64, -1).gather(-1, ids[:, None])[:, 0]
    want_entropy = -(torch.softmax(logits64, -1) * torch.log_softmax(logits64, -1)).sum(-1)
    (want * upstream.double()).sum().backward()

    results = {}
    for c in (0, chunk):
        h, w = (x.to(dtype).clone().requires_grad_() for x in (hidden, weight))
        with LargestTensor() as largest:
            log_probs, entropy = head_log_probs(h, w, ids, chunk_tokens=c, with_entropy=True)
            (log_probs * upstream).sum().backward()
        results[c] = (log_probs.detach(), entropy, h.grad, w.grad, largest.numel)
    if dtype == torch.float32:  # float32 rounding bounds (tests/fp_bounds.py): a dot of H terms, a softmax of V
        n = 2 * (hidden_size + vocab + 4) + num  # forward, backward, and the backward's sum over the rows
        z = logits64.detach()
        lp_bound, entropy_bound = fp.log_prob_bound(z, n), fp.entropy_bound(z, n)
        # the gradients −u·(onehot − p)·W and −u·(onehot − p)ᵀ·h, from terms of magnitude A (p's own error,
        # ≤ 2·γ̃·max|z|·p per entry, adds 2·max|z| times A); normwise
        p = torch.softmax(z, -1)
        onehot_plus_p = torch.nn.functional.one_hot(ids, vocab).double() + p
        scale = fp.probabilistic_gamma(n) * (1 + 2 * float(z.abs().max()))
        h_bound = scale * float((upstream.double().abs()[:, None] * (onehot_plus_p @ w64.detach().abs())).norm())
        w_bound = scale * float(((upstream.double().abs()[:, None] * onehot_plus_p).T @ h64.detach().abs()).norm())
    else:  # bf16: the head's inputs are rounded to 8 bits (relative 2^-9), so a few 1e-3 of the logits
        lp_bound = entropy_bound = 0.2
        h_bound, w_bound = (2e-2 * float(x.grad.norm()) for x in (h64, w64))
    for c, (log_probs, entropy, h_grad, w_grad, _) in results.items():
        assert log_probs.dtype == torch.float32 and not entropy.requires_grad
        assert ((log_probs.double() - want.detach()).abs() <= lp_bound).all(), c
        assert ((entropy.double() - want_entropy.detach()).abs() <= entropy_bound).all(), c
        assert float((h_grad.double() - h64.grad).norm()) <= h_bound, c
        assert float((w_grad.double() - w64.grad).norm()) <= w_bound, c
    assert results[0][4] >= num * vocab  # the reference materialises all logits ...
    assert results[chunk][4] <= max(chunk * vocab, vocab * hidden_size, num * hidden_size)  # ... the chunked never


# ----------------------------------------------------------------------------------------------------------
# packed micro-batches


def test_packed_inputs_concatenate_samples_without_padding():
    batch = random_batch(4, vocab_size=VOCAB_SIZE, prompt_len=(2, 6), response_len=(1, 9), group_size=1, seed=1)
    rows = [2, 0, 3]
    inputs = micro_batch_inputs(batch, rows)
    expected, offsets = [], [0]
    for i in rows:
        n_resp = int(batch.response_mask[i].sum())
        expected.append(torch.cat([batch.prompt_ids[i][batch.prompt_mask[i]], batch.response_ids[i, :n_resp]]))
        offsets.append(offsets[-1] + len(expected[-1]))
    assert inputs.packed and inputs.input_ids.shape == (1, offsets[-1])
    assert torch.equal(inputs.input_ids[0], torch.cat(expected))
    assert torch.equal(inputs.position_ids[0], torch.cat([torch.arange(len(e)) for e in expected]))
    assert inputs.cu_seq_lens.tolist() == offsets and inputs.seq_lens == tuple(len(e) for e in expected)
    assert inputs.num_tokens == inputs.computed_tokens == offsets[-1]
    # the output at target_index[k] predicts target_ids[k]: the token right after it, in the same sample
    flat = inputs.input_ids[0]
    assert torch.equal(flat[inputs.target_index + 1], inputs.target_ids)
    for k, sample in enumerate((inputs.response_index // inputs.response_len).tolist()):
        assert offsets[sample] <= int(inputs.target_index[k]) < offsets[sample + 1] - 1, k
    responses = [batch.response_ids[i, : int(batch.response_mask[i].sum())] for i in rows]
    assert torch.equal(inputs.target_ids, torch.cat(responses))


def test_shared_prompt_inputs_hold_each_prompt_once():
    """Rows 0-3 share one prompt, rows 4-7 another; a micro-batch of rows [1, 0, 4, 2]: consecutive equal
    prompts share a segment, a prompt met again after another one starts a new segment."""
    batch = random_batch(8, vocab_size=VOCAB_SIZE, prompt_len=(2, 6), response_len=(0, 9), group_size=4, seed=3)
    batch = batch.replace(response_mask=batch.response_mask.clone())
    batch.response_mask[2] = False  # an empty response: nothing to predict, still a sample of the layout
    rows = [1, 0, 4, 2]
    inputs = micro_batch_inputs(batch, rows, share_prompts=True)
    prompt = {r: batch.prompt_ids[r][batch.prompt_mask[r]] for r in rows}
    assert not torch.equal(prompt[0], prompt[4])
    response = {r: batch.response_ids[r, : int(batch.response_mask[r].sum())] for r in rows}
    segments = [(prompt[1], [1, 0]), (prompt[4], [4]), (prompt[2], [2])]
    want_ids = torch.cat([torch.cat([p, *(response[r] for r in rs)]) for p, rs in segments])
    want_pos = torch.cat([
        torch.cat([torch.arange(len(p)), *(torch.arange(len(p), len(p) + len(response[r])) for r in rs)])
        for p, rs in segments
    ])  # fmt: skip
    assert torch.equal(inputs.input_ids[0], want_ids) and torch.equal(inputs.position_ids[0], want_pos)
    assert inputs.shared == tuple((len(p), tuple(len(response[r]) for r in rs)) for p, rs in segments)
    assert inputs.seq_lens == tuple(len(p) + sum(len(response[r]) for r in rs) for p, rs in segments)
    sample_tokens = sum(len(prompt[r]) + len(response[r]) for r in rows)
    assert inputs.computed_tokens == len(want_ids) < inputs.num_tokens == sample_tokens
    # each target is predicted by its own prompt's last token (first column) or the previous response token
    t, start, k = inputs.response_len, 0, 0
    for p, rs in segments:
        last_prompt, start = start + len(p) - 1, start + len(p)
        for r in rs:
            n = len(response[r])
            want_index = [last_prompt] + list(range(start, start + n - 1))
            assert inputs.target_index[k : k + n].tolist() == want_index[:n]
            assert torch.equal(inputs.target_ids[k : k + n], response[r])
            assert inputs.response_index[k : k + n].tolist() == [rows.index(r) * t + c for c in range(n)]
            k, start = k + n, start + n
    assert k == len(inputs.target_ids)


def test_shared_prompt_attention_sees_the_prompt_and_its_own_response():
    """Against a float64 reference written out: segments [prompt 3 | responses 2, 4], [prompt 1 | responses 3, 0];
    a prompt position sees earlier prompt positions, a response position its prompt and its own earlier ones."""
    gen = torch.Generator().manual_seed(0)
    shared, heads, kv_heads, dim = ((3, (2, 4)), (1, (3, 0))), 4, 2, 8  # an empty response too
    part = []  # (segment, response index or −1 for the prompt) of every position
    for s, (p, lens) in enumerate(shared):
        part += [(s, -1)] * p + [(s, j) for j, n in enumerate(lens) for _ in range(n)]
    n = len(part)
    q, k, v = (torch.randn(1, h, n, dim, generator=gen) for h in (heads, kv_heads, kv_heads))
    seq_lens = tuple(p + sum(lens) for p, lens in shared)
    cu = torch.tensor([0, 9, 13], dtype=torch.int32)
    packed = PackedSequences(seq_lens, cu, max(seq_lens), rows=shared_prompt_rows(shared))
    out, _ = packed_attention(torch.nn.Module(), q, k, v, None, scaling=dim**-0.5, packed_sequences=packed)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i, (si, ri) in enumerate(part):
        for j, (sj, rj) in enumerate(part[: i + 1]):
            allowed[i, j] = si == sj and (rj == -1 or rj == ri)
    kk, vv = (x.double().repeat_interleave(heads // kv_heads, dim=1) for x in (k, v))
    scores = (q.double() @ kk.transpose(-1, -2)) * dim**-0.5
    want = torch.softmax(scores.masked_fill(~allowed, -torch.inf), -1) @ vv
    assert out.shape == (1, n, heads, dim)
    torch.testing.assert_close(out.double(), want.transpose(1, 2), rtol=0, atol=1e-6)


def test_packed_attention_is_block_diagonal_causal_attention():
    """Against a float64 reference written out: softmax over each sample's own earlier keys only."""
    gen = torch.Generator().manual_seed(0)
    lens, heads, kv_heads, dim = (5, 1, 7), 4, 2, 8
    n = sum(lens)
    q, k, v = (torch.randn(1, h, n, dim, generator=gen) for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    out, _ = packed_attention(
        torch.nn.Module(), q, k, v, None, scaling=dim**-0.5, packed_sequences=PackedSequences(lens, cu, max(lens))
    )
    sample = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    pos = torch.arange(n)
    allowed = (sample[:, None] == sample[None, :]) & (pos[None, :] <= pos[:, None])
    kk, vv = (x.double().repeat_interleave(heads // kv_heads, dim=1) for x in (k, v))
    scores = (q.double() @ kk.transpose(-1, -2)) * dim**-0.5
    want = torch.softmax(scores.masked_fill(~allowed, -torch.inf), -1) @ vv
    assert out.shape == (1, n, heads, dim)
    torch.testing.assert_close(out.double(), want.transpose(1, 2), rtol=0, atol=1e-6)
    assert packed_kernel("cpu", torch.float32) == "sdpa_per_sample"


@pytest.fixture(scope="module")
def reference_step(model_dir):
    return train(model_dir, random_batch(16, vocab_size=VOCAB_SIZE, seed=21), **REFERENCE)


@pytest.mark.filterwarnings("ignore:FIPO with one mini-batch")  # two update calls of one mini-batch each
@pytest.mark.parametrize(
    "features",
    [
        dict(packing=True, logprob_chunk_tokens=0, activation_checkpointing=False),
        dict(packing=False, logprob_chunk_tokens=7, activation_checkpointing=False),
        dict(packing=False, logprob_chunk_tokens=0, activation_checkpointing=True),
        dict(packing=True, logprob_chunk_tokens=7, activation_checkpointing=True),
        dict(packing=True, share_prompts=True, logprob_chunk_tokens=0, activation_checkpointing=False),
        dict(packing=True, share_prompts=True, logprob_chunk_tokens=7, activation_checkpointing=True),
    ],
    ids=["packed", "chunked", "checkpointed", "all", "shared", "shared_all"],
)
def test_each_feature_gives_the_reference_update(model_dir, reference_step, features):
    """Against the padded, unchunked, uncheckpointed path on the same batch (packing also changes which samples
    share a micro-batch), both checked against an independent float64 computation with float32 rounding bounds
    (tests/float64_checks.py): log-probs, the first mini-batch's loss, gradient and AdamW step, the second
    mini-batch's gradient (FIPO is live there, so a moved policy is compared too), token counts and entropies."""
    batch = random_batch(16, vocab_size=VOCAB_SIZE, seed=21)
    runs = {"reference": reference_step, "features": train(model_dir, batch, **features)}
    start = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()  # what a rank loads
    check_first_step(model_dir, batch.select(slice(0, 8)), make_config(model_dir), start, runs)
    check_second_step(model_dir, batch.select(slice(8, None)), runs)
    metrics, ref_metrics = runs["features"].metrics, reference_step.metrics
    assert ref_metrics[1]["learner/influence_weights_max"] > 1.0  # FIPO active on the second mini-batch
    if features["packing"]:
        assert metrics[0]["perf/learner_padded_fraction"] == 0.0 < ref_metrics[0]["perf/learner_padded_fraction"]
    # groups of 4 samples share a prompt: with sharing, a micro-batch computes each of its prompts once
    assert (metrics[0]["perf/learner_shared_prompt_frac"] > 0.1) == features.get("share_prompts", False)


def test_packed_chunked_log_probs_match_a_float64_forward(model_dir):
    """Independent reference: transformers in float64, one unpadded sample at a time; every log-prob within the
    decoder's float32 rounding bound (tests/fp_bounds.py `log_prob_bound`)."""
    batch = random_batch(8, vocab_size=VOCAB_SIZE, seed=5)
    worker = LearnerWorker(make_config(model_dir, logprob_chunk_tokens=5, activation_checkpointing=True))
    check_log_probs(worker.compute_log_probs(batch), float64_reference(model_dir, batch))


@pytest.mark.parametrize("checkpoint_dtype", [torch.float32, torch.bfloat16])
def test_sharded_loading_gives_the_checkpoint_weights(model_dir, tmp_path, checkpoint_dtype):
    """The meta-device build + broadcast from rank 0 yields exactly what transformers loads in float32 (and the
    rotary buffers, which the checkpoint does not hold), also from a bfloat16 checkpoint."""
    if checkpoint_dtype != torch.float32:
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=checkpoint_dtype).save_pretrained(tmp_path / "m")
        model_dir = str(tmp_path / "m")
    worker = LearnerWorker(make_config(model_dir))
    state = worker.full_state_dict()["model"]
    source = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert state.keys() == source.state_dict().keys()
    assert all(state[k].dtype == torch.float32 and torch.equal(state[k], v) for k, v in source.state_dict().items())
    for name, buffer in source.named_buffers():
        assert torch.equal(worker.model.get_buffer(name), buffer), name


def _reference_varlen(query, key, value, cu_q, cu_k, max_q, max_k, *, scale=None, is_causal=None, window_size=None,
                      enable_gqa=False):  # fmt: skip
    """A stand-in for torch's varlen_attn ([N, H, D] layout, cumulative boundaries): float64, written out."""
    assert torch.equal(cu_q, cu_k) and max_q == max_k and (is_causal or window_size == (-1, 0))
    if key.shape[1] != query.shape[1]:
        assert enable_gqa
        key, value = (x.repeat_interleave(query.shape[1] // key.shape[1], dim=1) for x in (key, value))
    out = torch.empty_like(query)
    for start, stop in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        q, k, v = (x[start:stop].transpose(0, 1).double() for x in (query, key, value))
        scores = (q @ k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
        causal = torch.ones(stop - start, stop - start, dtype=torch.bool).tril()
        out[start:stop] = (torch.softmax(scores.masked_fill(~causal, -torch.inf), -1) @ v).transpose(0, 1).float()
    return out


@pytest.mark.parametrize(
    "params", [{"scale", "window_size", "enable_gqa"}, {"scale", "is_causal"}], ids=["torch-2.13", "older"]
)
def test_varlen_glue_for_either_signature(monkeypatch, params):
    """The CUDA path's layout handling ([1, H, N, D] ↔ [N, H, D], grouped-query heads passed or repeated, the
    causal flag spelled either way), run on the CPU against a reference kernel of the same signature; the
    kernel itself is tested on the GPU below."""
    from learner import attention

    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    monkeypatch.setattr(attention, "_VARLEN", (_reference_varlen, causal, params))
    gen = torch.Generator().manual_seed(0)
    lens = (6, 2, 9)
    q, k, v = (torch.randn(1, h, sum(lens), 8, generator=gen) for h in (4, 2, 2))
    packed = PackedSequences(lens, torch.tensor([0, 6, 8, 17], dtype=torch.int32), 9)
    got = attention._varlen_attention(q, k, v, packed, 8**-0.5)
    want = attention._per_sample_attention(q, k, v, packed, 8**-0.5, 0.0)
    assert got.shape == want.shape == (1, 17, 4, 8)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the CUDA varlen attention kernel)")
def test_cuda_varlen_attention_matches_per_sample_sdpa():
    """GPU only: the varlen kernel (bf16, grouped-query) against per-sample SDPA, forward and backward."""
    from learner import attention

    if attention._VARLEN is None:
        pytest.skip("this torch has no torch.nn.attention.varlen.varlen_attn")
    gen = torch.Generator(device="cuda").manual_seed(0)
    lens, heads, kv_heads, dim = (300, 1, 1000, 77), 14, 2, 64
    n = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    packed = PackedSequences(lens, cu, max(lens))
    inputs = [
        torch.randn(1, h, n, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
        for h in (heads, kv_heads, kv_heads)
    ]
    upstream = torch.randn(1, n, heads, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    outs, grads = [], []
    for fn in (attention._varlen_attention, lambda q, k, v, p, s: attention._per_sample_attention(q, k, v, p, s, 0.0)):
        q, k, v = (x.clone().requires_grad_() for x in inputs)
        out = fn(q, k, v, packed, dim**-0.5)
        (out.float() * upstream.float()).sum().backward()
        outs.append(out.float())
        grads.append([x.grad.float() for x in (q, k, v)])
    assert packed_kernel("cuda", torch.bfloat16) == "varlen_attn"
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=2e-2)
    for a, b in zip(*grads):
        assert float((a - b).norm() / b.norm()) < 2e-2
