"""Dynamic sampling pool, advantage stage and evaluation estimators, on hand-made samples."""

import math

import fp_bounds as fp
import pytest
import torch

from advantage import ADVANTAGE_ESTIMATORS, REWARD_OK, REWARD_TIMEOUT, SAMPLE_FILTERS
from advantage.stage import AdvantageStageConfig, compute_advantages
from orchestration.data.prompts import PromptRow
from orchestration.evaluation import majority_correct, pass_at_k, summarize
from orchestration.metrics import rollout_metrics
from orchestration.sampling import GroupPool, OverlongShaping, group_samples
from reward.result import RewardResult
from rollout.types import Sample

PAD = 0


def sample(prompt, length, version=3):
    return Sample(
        prompt_index=prompt,
        prompt_ids=(5, 6, 7)[: 1 + prompt % 3],
        response_ids=tuple(range(10, 10 + length)),
        log_probs=torch.full((length,), -0.5),
        finish_reason="stop",
        policy_version=version,
        text="x",
    )


def ok(correct):
    return RewardResult(correct, 1.0 if correct else -1.0, extracted="1" if correct else "2")


def make_round(verdicts, lengths=None):
    """verdicts: per prompt a list of True/False/'timeout'."""
    rows = [PromptRow(({"role": "user", "content": f"p{i}"},), "1", f"f:{i}") for i in range(len(verdicts))]
    samples, results = [], []
    for p, group in enumerate(verdicts):
        for j, v in enumerate(group):
            samples.append(sample(p, (lengths or {}).get((p, j), 4)))
            results.append(RewardResult.failed("timeout", "slow") if v == "timeout" else ok(v))
    return group_samples(rows, samples, results)


def test_pool_keeps_varying_groups_and_counts_drops():
    pool = GroupPool(target_prompts=2, sample_filter=SAMPLE_FILTERS.get("correctness_varies"))
    pool.add(make_round([[True, True], [False, False], [True, False]]))
    assert not pool.full()
    pool.add(make_round([["timeout", "timeout"], [False, True], [True, False]]))
    assert pool.full() and len(pool.kept) == 3
    m = pool.metrics()
    assert m["dynamic_filter/gen_rounds"] == 2 and m["dynamic_filter/groups_seen"] == 6
    assert (m["dynamic_filter/drop_all_correct"], m["dynamic_filter/drop_all_wrong"]) == (1, 1)
    assert m["dynamic_filter/drop_no_valid_reward"] == 1 and m["dynamic_filter/kept_frac"] == 0.5
    batch = pool.to_batch(PAD, None)
    assert batch.num_samples == 4  # surplus third group discarded
    assert batch.group_index.tolist() == [0, 0, 1, 1]  # renumbered across rounds
    assert batch.correct.tolist() == [True, False, False, True]
    assert batch.rewards.tolist() == [1.0, -1.0, -1.0, 1.0]


def test_pool_with_a_timeout_inside_a_kept_group_and_overlong_shaping():
    pool = GroupPool(target_prompts=1, sample_filter=SAMPLE_FILTERS.get("correctness_varies"))
    pool.add(make_round([[True, False, "timeout"]], lengths={(0, 0): 10, (0, 1): 8}))
    batch = pool.to_batch(PAD, OverlongShaping(max_response_tokens=10, buffer_tokens=4, factor=1.0))
    assert batch.reward_status.tolist() == [REWARD_OK, REWARD_OK, REWARD_TIMEOUT]
    # length 10: penalty -1; length 8: -(8 - 6) / 4 = -0.5; the timeout sample keeps score 0, no penalty
    assert batch.rewards.tolist() == pytest.approx([0.0, -1.5, 0.0])


def test_pool_without_filter_keeps_everything_valid():
    pool = GroupPool(target_prompts=2, sample_filter=None)
    pool.add(make_round([[True, True], [False, False]]))
    assert pool.full()


def test_advantages_skip_invalid_samples_and_report_mismatch():
    pool = GroupPool(target_prompts=1, sample_filter=None)
    pool.add(make_round([[True, False, "timeout"]]))
    batch = pool.to_batch(PAD, None)
    old = batch.rollout_log_probs.clone()
    old[0, :4] = -0.7  # rollout says -0.5: diff +0.2 on the first sample's 4 tokens
    batch = batch.replace(old_log_probs=old)
    out, metrics = compute_advantages(batch, ADVANTAGE_ESTIMATORS.get("grpo"), AdvantageStageConfig())
    a = 1.0 / (math.sqrt(2.0) + 1e-6)  # rewards [1, -1]: mean 0, std sqrt(2)
    assert out.advantages[0, :4].tolist() == pytest.approx([a] * 4)
    assert out.advantages[1, :4].tolist() == pytest.approx([-a] * 4)
    assert out.advantages[2].abs().sum() == 0 and not out.response_mask[2].any()
    assert metrics["mismatch/abs_log_prob_diff_mean"].item() == pytest.approx(0.1)  # 0.2 on 4 of 8 tokens
    k3, k3_bound = math.exp(-0.2) + 0.2 - 1, fp.k3_error(-0.2)  # e^x − x − 1 cancels: its float32 bound
    assert metrics["mismatch/kl_k3"].item() == pytest.approx(k3 / 2, abs=k3_bound / 2 + fp.gamma(8) * k3)
    m = rollout_metrics(batch, max_response_tokens=4)  # on the generated batch, before masks are cleared
    assert m["reward/status_timeout"] == 1 and m["reward/accuracy"] == 0.5 and m["rollout/overlong_frac"] == 1.0
    # ratio π_old / π_rollout = e^-0.2 on 4 tokens, 1 on 4: quantiles by hand (torch's linear interpolation)
    low = math.exp(-0.2)
    assert metrics["mismatch/ratio_p05"].item() == pytest.approx(low)
    assert metrics["mismatch/ratio_p50"].item() == pytest.approx((low + 1) / 2)  # position 3.5 of 8 values
    assert metrics["mismatch/ratio_max"].item() == pytest.approx(1.0)
    assert "mismatch/is_weight_mean" not in metrics  # truncated importance sampling is off by default

    # With rollout_is_cap the advantages carry w = min(π_old / π_rollout, cap) token by token.
    old[1, :4] = -0.2  # sample 1: rollout -0.5, old -0.2 → ratio e^0.3 = 1.35, truncated at 1.2
    tis, tis_metrics = compute_advantages(
        batch.replace(old_log_probs=old), ADVANTAGE_ESTIMATORS.get("grpo"), AdvantageStageConfig(rollout_is_cap=1.2)
    )
    assert tis.advantages[0, :4].tolist() == pytest.approx([a * low] * 4)
    assert tis.advantages[1, :4].tolist() == pytest.approx([-a * 1.2] * 4)
    assert tis_metrics["mismatch/is_truncated_frac"].item() == pytest.approx(0.5)
    assert tis_metrics["mismatch/is_weight_mean"].item() == pytest.approx((low + 1.2) / 2)
    with pytest.raises(ValueError, match="rollout_is_cap"):
        AdvantageStageConfig(rollout_is_cap=0.0)


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0
    assert pass_at_k(32, 1, 1) == pytest.approx(1 / 32)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_majority_vote_and_summary():
    assert majority_correct(["7", "8", "7", None], [True, False, True, False])
    assert not majority_correct(["8", "8", "7"], [False, False, True])
    assert majority_correct(["7", "8"], [True, False])  # tie: the first answer wins
    assert not majority_correct([None, None], [False, False])
    s = summarize(
        [(["7", "7", "8", "9"], [True, True, False, False]), (["1", "2", "2", "2"], [True, False, False, False])], 4
    )
    assert s["avg_at_k"] == pytest.approx((0.5 + 0.25) / 2)
    assert s["cons_at_k"] == 0.5 and s["pass_at_k"] == 1.0


def test_round_sizer_sizes_rounds_from_the_running_keep_rate():
    from orchestration.sampling import RoundSizer

    sizer = RoundSizer(max_prompts=32, margin=1.25, window=2)
    assert sizer.size(16) == 32  # no history yet: DAPO's fixed round
    sizer.record(kept=27, seen=32)  # keep-rate 27/32
    assert sizer.size(16) == math.ceil(16 / (27 / 32) * 1.25) == 24
    assert sizer.size(3) == 5  # a top-up round: ceil(3 / 0.84375 × 1.25)
    sizer.record(kept=2, seen=32)  # keep-rate over the window: 29 / 64
    assert sizer.size(16) == 32  # ceil(16 / (29/64) × 1.25) = 45, capped at max_prompts
    sizer.record(kept=32, seen=32)  # the window keeps the last 2 steps: 34 / 64
    assert sizer.size(16) == 32  # ceil(16 / (34/64) × 1.25) = 38, capped at max_prompts
    restored = RoundSizer(32, 1.25, window=2)
    restored.load_state_dict(sizer.state_dict())
    assert restored.size(10) == sizer.size(10) == math.ceil(10 / (34 / 64) * 1.25)
    with pytest.raises(ValueError, match="margin >= 1"):
        RoundSizer(32, 0.5)


def test_pool_reports_surplus_groups():
    pool = GroupPool(target_prompts=1, sample_filter=None)
    pool.add(make_round([[True, False], [True, True], [False, False]]))
    assert pool.metrics()["dynamic_filter/surplus_groups"] == 2
