"""The learner on one rank, in-process (no Ray): plan, schedule, loss plumbing, micro-batch invariance,
FIPO = DAPO on the first mini-batch, exact checkpoint resume, Hugging Face export.

World size 1 still runs the real FSDP2 code over a one-process gloo group.
"""

import copy

import pytest
import torch
import torch.distributed as dist
from float64_checks import Run, check_first_step, check_log_probs, float64_reference
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from advantage import POLICY_LOSSES
from learner.batching import micro_batch_inputs, plan_step, prompt_keys_of, response_lengths
from learner.config import LearnerConfig, LRScheduleConfig, OptimizerConfig
from learner.distributed import free_port, init_distributed
from learner.synthetic import random_batch
from learner.worker import LearnerWorker
from rollout.tiny import VOCAB_SIZE, build_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("learner") / "tiny"))


@pytest.fixture(scope="module")
def process_group():
    created = not dist.is_initialized()
    if created:
        init_distributed(0, 1, "127.0.0.1", free_port(), timeout_s=60)
    yield
    if created:
        dist.destroy_process_group()


def make_config(model_dir, **overrides) -> LearnerConfig:
    values = dict(
        model_dir=model_dir,
        mini_batch_samples=8,
        micro_batch_tokens=4096,
        policy_loss="dapo",
        optimizer=OptimizerConfig(lr=1e-3, grad_clip=None),
        lr_schedule=LRScheduleConfig(warmup_steps=0),
    )
    values.update(overrides)
    return LearnerConfig(**values)


def with_old_log_probs(worker, batch):
    return batch.replace(old_log_probs=worker.compute_log_probs(batch))


# ----------------------------------------------------------------------------------------------------------
# pure parts


@pytest.mark.parametrize("packing", [True, False])
def test_plan_splits_mini_batches_ranks_and_token_budget(packing):
    batch = random_batch(16, vocab_size=VOCAB_SIZE, prompt_len=(2, 6), response_len=(1, 30), seed=3)
    p_len, r_len = batch.prompt_mask.sum(-1), response_lengths(batch.response_mask)
    budget = 60

    def cost(part):  # positions computed: packed Σ tokens, padded rows × (longest prompt + longest response)
        if packing:
            return int(sum(p_len[i] + r_len[i] for i in part))
        return len(part) * int(max(p_len[i] for i in part) + max(r_len[i] for i in part))

    plan = plan_step(
        batch.prompt_mask, batch.response_mask, mini_batch_samples=8, micro_batch_tokens=budget, world_size=2,
        packing=packing,
    )  # fmt: skip
    assert plan.num_mini_batches == 2
    for m in range(2):  # two mini-batches of 8: each rank holds 4 of the mini-batch's rows
        per_rank = plan.micro_batches[m]
        assert len({len(parts) for parts in per_rank}) == 1, "every rank runs the same number of micro-batches"
        rows = [sorted(i for part in parts for i in part) for parts in per_rank]
        assert [len(r) for r in rows] == [4, 4] and sorted(rows[0] + rows[1]) == list(range(8 * m, 8 * m + 8))
        for parts in per_rank:
            assert all(len(part) == 1 or cost(part) <= budget for part in parts)
    one_each = plan_step(
        batch.prompt_mask, batch.response_mask, mini_batch_samples=8, micro_batch_tokens=1, world_size=1
    )
    assert [len(parts[0]) for parts in one_each.micro_batches] == [8, 8]  # over the budget: one sample each
    with pytest.raises(ValueError, match="16 samples .* mini_batch_samples=6"):
        plan_step(batch.prompt_mask, batch.response_mask, mini_batch_samples=6, micro_batch_tokens=9, world_size=1)
    with pytest.raises(ValueError, match="mini_batch_samples=8 .* world_size=3"):
        plan_step(batch.prompt_mask, batch.response_mask, mini_batch_samples=8, micro_batch_tokens=9, world_size=3)


def test_plan_balances_tokens_over_ranks():
    """Hand-worked: samples of 10, 8, 1 and 1 tokens over two ranks. Consecutive halves would give 18 vs 2
    tokens; longest-first to the least-loaded rank with room gives {10, 1} and {8, 1}."""
    prompt_mask = torch.ones(4, 1, dtype=torch.bool)
    response_mask = torch.arange(9).unsqueeze(0) < torch.tensor([9, 7, 0, 0]).unsqueeze(1)
    plan = plan_step(prompt_mask, response_mask, mini_batch_samples=4, micro_batch_tokens=100, world_size=2)
    assert [sorted(plan.rank_rows(r)) for r in range(2)] == [[0, 3], [1, 2]]
    assert plan.tokens(0) == (20, 20)  # packed: every computed position is a real token
    padded = plan_step(
        prompt_mask, response_mask, mini_batch_samples=4, micro_batch_tokens=100, world_size=2, packing=False
    )
    assert padded.tokens(0) == (20, 2 * (1 + 9) + 2 * (1 + 7))  # rows × (longest prompt + longest response)


def test_plan_keeps_groups_together_when_prompts_are_shared():
    """Hand-worked: two groups of 4 samples (prompts of 10 and 2 tokens, responses 1-4 tokens) over two ranks.
    Without sharing the ranks get rows longest first, each group split over both ranks; with shared prompts
    each rank gets one whole group, in one micro-batch that holds its prompt once."""
    prompt_ids = torch.zeros(8, 10, dtype=torch.int64)
    prompt_ids[:4] = torch.arange(1, 11)
    prompt_ids[4:, -2:] = torch.tensor([7, 8])
    prompt_mask = prompt_ids != 0
    response_mask = torch.arange(4).unsqueeze(0) < torch.tensor([4, 3, 2, 1, 4, 3, 2, 1]).unsqueeze(1)
    keys = prompt_keys_of(prompt_ids, prompt_mask)
    assert keys == [0, 0, 0, 0, 1, 1, 1, 1]
    split = plan_step(prompt_mask, response_mask, mini_batch_samples=8, micro_batch_tokens=100, world_size=2)
    assert {frozenset(keys[i] for i in split.rank_rows(r)) for r in range(2)} == {frozenset({0, 1})}
    plan = plan_step(
        prompt_mask, response_mask, mini_batch_samples=8, micro_batch_tokens=100, world_size=2, prompt_keys=keys
    )
    assert plan.micro_batches[0] == (((0, 1, 2, 3),), ((4, 5, 6, 7),))  # the costlier group to rank 0
    assert plan.tokens(0) == (4 * 10 + 4 * 2 + 2 * 10, 10 + 2 + 2 * 10)  # (each sample's tokens, each prompt once)
    tight = plan_step(  # a budget of 13: the 10-token prompt with its 4-token response does not fit beside others
        prompt_mask, response_mask, mini_batch_samples=8, micro_batch_tokens=13, world_size=2, prompt_keys=keys
    )
    assert tight.micro_batches[0][0] == ((0,), (1,), (2, 3))
    with pytest.raises(ValueError, match="packed"):
        plan_step(prompt_mask, response_mask, mini_batch_samples=8, micro_batch_tokens=9, world_size=1,
                  packing=False, prompt_keys=keys)  # fmt: skip


def test_micro_batch_inputs_trim_padding_and_count_positions():
    batch = random_batch(4, vocab_size=VOCAB_SIZE, prompt_len=(2, 6), response_len=(1, 9), group_size=1, seed=1)
    inputs = micro_batch_inputs(batch, range(0, 4), packing=False)
    p = int(batch.prompt_mask.sum(-1).max())
    t = int(response_lengths(batch.response_mask).max())
    assert inputs.input_ids.shape == (4, p + t) and inputs.response_len == t
    for i in range(4):
        n_prompt, n_resp = int(batch.prompt_mask[i].sum()), int(batch.response_mask[i].sum())
        real = inputs.attention_mask[i].bool()
        expected = torch.cat([batch.prompt_ids[i][batch.prompt_mask[i]], batch.response_ids[i, :n_resp]])
        assert torch.equal(inputs.input_ids[i][real], expected)
        assert torch.equal(inputs.position_ids[i][real], torch.arange(n_prompt + n_resp))


def test_lr_schedule_warmup_constant_and_cosine():
    constant = LRScheduleConfig(warmup_steps=4)
    assert [constant.lr_factor(k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = LRScheduleConfig(warmup_steps=2, kind="cosine", total_steps=12, min_lr_ratio=0.1)
    assert cosine.lr_factor(1) == 1.0 and cosine.lr_factor(2) == pytest.approx(1.0)
    assert cosine.lr_factor(7) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert cosine.lr_factor(12) == pytest.approx(0.1) and cosine.lr_factor(50) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="total_steps"):
        LRScheduleConfig(kind="cosine", total_steps=None)


def test_config_checks_name_the_fields(model_dir):
    with pytest.raises(TypeError, match="FIPOLossConfig"):
        make_config(model_dir, policy_loss="fipo", policy_loss_config=POLICY_LOSSES.get("dapo").default_config)
    with pytest.raises(ValueError, match="valid names"):
        make_config(model_dir, policy_loss="nope")
    assert make_config(model_dir, policy_loss="grpo").uses_reference  # GRPO's KL term needs π_ref


# ----------------------------------------------------------------------------------------------------------
# FSDP2 worker, one rank


def test_log_probs_and_gradient_match_a_plain_hf_model(model_dir, process_group):
    """Independent check of the plumbing: a per-sample unpadded float64 forward of a plain transformers model and
    the DAPO loss written by hand (at θ = θ_old the ratio is 1: loss = −Σ Â·r / N_tokens), with float32 rounding
    bounds for the log-probs, loss, gradient, its norm and the AdamW step (tests/float64_checks.py)."""
    batch = random_batch(8, vocab_size=VOCAB_SIZE, seed=5)
    cfg = make_config(model_dir)
    worker = LearnerWorker(cfg)
    start = copy.deepcopy(worker.full_state_dict()["model"])  # in-process: live tensors
    batch = with_old_log_probs(worker, batch)
    metrics = worker.update(batch)
    assert len(metrics) == 1 and metrics[0]["learner/num_micro_batches"] == 1
    assert torch.all(batch.old_log_probs[~batch.response_mask] == 0)
    state = worker.full_state_dict(optimizer=True)
    check_first_step(model_dir, batch, cfg, start, {"learner": Run(batch.old_log_probs, metrics, state, state)})


@pytest.mark.parametrize("packing", [True, False])
def test_one_or_several_micro_batches_give_the_same_update(model_dir, process_group, packing):
    """One micro-batch vs several (a different summation of the same per-token gradients): the same update,
    within float32 rounding of an independent float64 computation (tests/float64_checks.py)."""
    batch = random_batch(8, vocab_size=VOCAB_SIZE, response_len=(8, 16), seed=7)
    runs, start = {}, None
    for budget in (10_000, 60):
        cfg = make_config(model_dir, micro_batch_tokens=budget, packing=packing)
        worker = LearnerWorker(cfg)
        start = copy.deepcopy(worker.full_state_dict()["model"])  # in-process: live tensors
        old = worker.compute_log_probs(batch)
        metrics = worker.update(batch.replace(old_log_probs=old))
        state = worker.full_state_dict(optimizer=True)
        runs[f"budget {budget}"] = Run(old, metrics, state, state)
    assert runs["budget 10000"].metrics[0]["learner/num_micro_batches"] == 1
    assert runs["budget 60"].metrics[0]["learner/num_micro_batches"] >= 3
    check_first_step(model_dir, batch, cfg, start, runs)


@pytest.mark.parametrize(
    "layout",
    [
        dict(packing=True),
        dict(packing=False),
        dict(packing=True, logprob_chunk_tokens=7, activation_checkpointing=True),
    ],
    ids=["packed", "padded", "packed-chunked-checkpointed"],
)
def test_fipo_first_mini_batch_is_exactly_dapo(model_dir, process_group, layout):
    """FIPO_SPEC §4: on the first mini-batch θ = θ_old, so Δ ≡ 0 (the recompute is bitwise the training
    forward), f ≡ 1 and the update is DAPO's bit for bit; on the second the policy has moved."""
    batch = random_batch(16, vocab_size=VOCAB_SIZE, seed=11)
    fipo_cfg = POLICY_LOSSES.get("fipo").make_config(weight_clip=0.2, weight_clip_high_only=False)
    dapo_cfg = POLICY_LOSSES.get("dapo").make_config(clip_low=fipo_cfg.clip_low, clip_high=fipo_cfg.clip_high)
    micro = dict(micro_batch_tokens=60, **layout)  # several micro-batches per mini-batch
    fipo = LearnerWorker(make_config(model_dir, policy_loss="fipo", policy_loss_config=fipo_cfg, **micro))
    dapo = LearnerWorker(make_config(model_dir, policy_loss="dapo", policy_loss_config=dapo_cfg, **micro))
    batch = with_old_log_probs(fipo, batch)
    assert torch.equal(batch.old_log_probs, dapo.compute_log_probs(batch))

    fipo_metrics = fipo.update(batch)
    first_only = dapo.update(batch.select(slice(0, 8)))  # DAPO on the first mini-batch only
    assert fipo_metrics[0]["learner/num_micro_batches"] > 1
    m0 = fipo_metrics[0]
    assert m0["learner/ppo_kl"] == 0.0 and m0["learner/future_kl_min"] == m0["learner/future_kl_max"] == 0.0
    assert m0["learner/influence_weights_min"] == m0["learner/influence_weights_max"] == 1.0
    for key in ("learner/loss", "learner/grad_norm", "learner/pg_clipfrac", "learner/entropy"):
        assert m0[key] == first_only[0][key], key  # bitwise

    # parameters after the first mini-batch: FIPO on that mini-batch alone vs DAPO, bit for bit
    fipo_first = LearnerWorker(make_config(model_dir, policy_loss="fipo", policy_loss_config=fipo_cfg, **micro))
    with pytest.warns(UserWarning, match="reduces to DAPO"):  # one mini-batch: FIPO is DAPO, and it says so
        fipo_first.update(batch.select(slice(0, 8)))
    fipo_state, dapo_state = fipo_first.full_state_dict()["model"], dapo.full_state_dict()["model"]
    assert all(torch.equal(fipo_state[k], dapo_state[k]) for k in dapo_state)

    m1 = fipo_metrics[1]  # the second mini-batch sees a moved policy: Δ ≠ 0, weights ≠ 1
    assert m1["learner/ppo_kl"] != 0.0
    assert m1["learner/influence_weights_min"] < 1.0 < m1["learner/influence_weights_max"]


def test_checkpoint_restore_gives_the_identical_next_update(model_dir, process_group, tmp_path):
    cfg = make_config(model_dir, policy_loss="fipo", lr_schedule=LRScheduleConfig(warmup_steps=3))
    first, second = random_batch(16, vocab_size=VOCAB_SIZE, seed=1), random_batch(16, vocab_size=VOCAB_SIZE, seed=2)
    worker = LearnerWorker(cfg)
    worker.update(with_old_log_probs(worker, first))
    worker.save_checkpoint(tmp_path / "ckpt")
    uninterrupted = worker.update(with_old_log_probs(worker, second))
    expected = worker.full_state_dict(optimizer=True)

    restored = LearnerWorker(cfg)  # a fresh rank, as after a restart
    restored.load_checkpoint(tmp_path / "ckpt")
    assert restored.optimizer_steps == 2
    resumed = restored.update(with_old_log_probs(restored, second))
    actual = restored.full_state_dict(optimizer=True)
    assert all(torch.equal(actual["model"][k], v) for k, v in expected["model"].items())
    for name, state in expected["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(actual["optimizer"]["state"][name][key]), torch.as_tensor(value))
    strip = lambda ms: [{k: v for k, v in m.items() if not k.startswith("perf/")} for m in ms]  # noqa: E731
    assert strip(resumed) == strip(uninterrupted)
    assert [m["learner/lr"] for m in resumed] == [1e-3, 1e-3]  # warm-up (3 steps) continued, not restarted


def test_hf_export_loads_unchanged_in_transformers(model_dir, process_group, tmp_path):
    worker = LearnerWorker(make_config(model_dir))
    batch = random_batch(8, vocab_size=VOCAB_SIZE, seed=4)
    worker.update(with_old_log_probs(worker, batch))  # export trained (not initial) weights
    worker.export_hf(tmp_path / "hf")
    state = worker.full_state_dict()["model"]
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert exported.keys() == state.keys() and all(torch.equal(exported[k], state[k]) for k in state)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert all(torch.equal(p, state[n]) for n, p in model.named_parameters())
    inputs = micro_batch_inputs(batch, range(0, 8), packing=False)
    with torch.no_grad():
        logits = model(
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids
        ).logits[:, -inputs.response_len - 1 : -1]
    response_ids = batch.response_ids[:, : inputs.response_len]
    log_probs = torch.log_softmax(logits, -1).gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    log_probs = log_probs * batch.response_mask[:, : inputs.response_len]
    # both float32 (transformers padded, the learner packed) within rounding of the exported model in float64
    ref = float64_reference(str(tmp_path / "hf"), batch)
    check_log_probs(torch.nn.functional.pad(log_probs, (0, batch.response_mask.shape[1] - log_probs.shape[1])), ref)
    check_log_probs(worker.compute_log_probs(batch), ref)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        assert (tmp_path / "hf" / name).is_file(), name


def test_tied_embeddings_train_export_and_stream_once(process_group, tmp_path):
    """Tied input/output embeddings stay in the root FSDP group; the export and the weight buckets carry the
    shared matrix once (as transformers and vLLM expect), and the export loads back with the tie intact."""
    tied_dir = str(build_tiny_model(tmp_path / "tied", tie_word_embeddings=True))
    worker = LearnerWorker(make_config(tied_dir))
    batch = random_batch(8, vocab_size=VOCAB_SIZE, seed=6)
    worker.update(with_old_log_probs(worker, batch))
    names = [name for bucket in worker.iter_weight_buckets(1 << 30) for name, _ in bucket]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    worker.export_hf(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    state = worker.full_state_dict()["model"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.embed_tokens.weight, state["model.embed_tokens.weight"])


def test_grpo_reference_model_and_bf16_mixed_precision(model_dir, process_group):
    """GRPO's KL term loads a frozen reference copy: π_ref = π_old before the update and stays put after it.
    bf16 parameters (FSDP2 MixedPrecisionPolicy, float32 master weights) train and still give Δ ≡ 0 on the
    first mini-batch."""
    batch = random_batch(16, vocab_size=VOCAB_SIZE, seed=8)
    worker = LearnerWorker(make_config(model_dir, policy_loss="grpo", param_dtype="bfloat16"))
    assert worker.ref_model is not None
    batch = with_old_log_probs(worker, batch)
    ref = worker.compute_log_probs(batch, reference=True)
    assert ref.dtype == torch.float32 and torch.equal(ref, batch.old_log_probs)
    with pytest.raises(ValueError, match="ref_log_probs"):
        worker.update(batch)
    metrics = worker.update(batch.replace(ref_log_probs=ref))
    assert metrics[0]["learner/ppo_kl"] == 0.0 and metrics[0]["learner/kl_loss"] == 0.0
    assert metrics[1]["learner/kl_loss"] > 0.0  # the policy moved away from the reference
    assert torch.equal(worker.compute_log_probs(batch, reference=True), ref)
    assert not torch.equal(worker.compute_log_probs(batch), batch.old_log_probs)


def test_samples_whose_reward_failed_leave_the_loss(model_dir, process_group):
    batch = random_batch(8, vocab_size=VOCAB_SIZE, seed=9)
    status = torch.zeros(8, dtype=torch.int8)
    status[:3] = 1  # REWARD_TIMEOUT
    worker = LearnerWorker(make_config(model_dir))
    metrics = worker.update(with_old_log_probs(worker, batch.replace(reward_status=status)))
    assert metrics[0]["learner/response_tokens"] == int(batch.response_mask[3:].sum())
