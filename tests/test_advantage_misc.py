"""Estimators, KL estimators, registries, configs and the batch type."""

import math

import fipo_reference as ref
import fp_bounds as fp
import pytest
import torch

from advantage import (
    ADVANTAGE_ESTIMATORS,
    POLICY_LOSSES,
    SAMPLE_FILTERS,
    FIPOLossConfig,
    PPOLossConfig,
    Registry,
    RolloutBatch,
    broadcast_to_tokens,
    discounted_future_sum,
    drgrpo_advantages,
    filter_groups,
    group_outcomes,
    grpo_advantages,
    kl_penalty,
    overlong_penalty,
    ppo_policy_loss,
)


def test_grpo_matches_reference_on_random_groups():
    g = torch.Generator().manual_seed(3)
    groups = torch.randint(0, 7, (60,), generator=g)
    rewards = torch.randn(60, generator=g)
    for norm in (True, False):  # statistics in float64, the result rounded once to float32 (relative ≤ 2^-24)
        got = grpo_advantages(rewards, groups, norm_by_std=norm)
        want = ref.grpo(rewards.double().tolist(), groups.tolist(), norm_by_std=norm)
        assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert torch.equal(drgrpo_advantages(rewards, groups), grpo_advantages(rewards, groups, norm_by_std=False))


def test_grpo_singleton_and_constant_groups_and_invalid_samples():
    groups = torch.tensor([0, 1, 1, 2, 2, 2])
    rewards = torch.tensor([0.7, 1.0, 1.0, 1.0, -1.0, 5.0])
    adv = grpo_advantages(rewards, groups)
    assert adv[0].item() == pytest.approx(0.7 / (1 + 1e-6), rel=1e-7)  # a group of one: mean 0, std 1
    assert adv[1:3].tolist() == [0.0, 0.0]  # identical rewards: zero advantage, no NaN
    valid = torch.tensor([True, True, True, True, True, False])
    adv = grpo_advantages(rewards, groups, valid=valid)
    assert adv[5].item() == 0.0  # an invalid sample gets no advantage...
    assert adv[3].item() == pytest.approx(1 / (math.sqrt(2) + 1e-6), rel=1e-6)  # ...and leaves the statistics


def test_filter_groups_uses_correctness_not_rewards_and_keeps_singletons():
    groups = torch.tensor([0, 0, 1, 1, 2, 3, 3])
    correct = torch.tensor([1, 1, 0, 1, 1, 0, 0], dtype=torch.bool)
    assert filter_groups(correct, groups).tolist() == [False, False, True, True, True, False, False]
    assert group_outcomes(correct, groups) == {"all_correct": 2, "all_wrong": 1, "mixed": 1}
    valid = torch.tensor([True, True, True, False, True, True, True])
    assert filter_groups(correct, groups, valid).tolist() == [False, False, True, False, True, False, False]


def test_overlong_penalty_validation_and_shape():
    assert overlong_penalty(torch.tensor([5, 9, 10]), 10, 4, 0.5).tolist() == pytest.approx([0, -0.375, -0.5])
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(torch.tensor([1]), 10, 0)


def test_kl_estimators_closed_form():
    lp, rp = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert kl_penalty(lp, rp, "k1").tolist() == pytest.approx([0.5, -1.0])
    assert kl_penalty(lp, rp, "k2").tolist() == pytest.approx([0.125, 0.5])
    k3 = [math.exp(r - p) - (r - p) - 1 for p, r in zip(lp.tolist(), rp.tolist())]
    k3_bound = max(fp.k3_error(r - p) for p, r in zip(lp.tolist(), rp.tolist()))  # e^x − x − 1 cancels: ~20x
    assert kl_penalty(lp, rp, "low_var_kl").tolist() == pytest.approx(k3, abs=k3_bound)
    assert kl_penalty(lp, rp, "k3").tolist() == pytest.approx(k3, abs=k3_bound)


def test_grpo_loss_adds_kl_term():
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old, ref_lp = lp.detach().clone(), torch.tensor([[-1.5, -1.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    cfg = POLICY_LOSSES.get("grpo").default_config
    loss, metrics = ppo_policy_loss(lp, old, torch.ones(1, 2), mask, cfg, ref_log_probs=ref_lp)
    k3 = sum(math.exp(r - p) - (r - p) - 1 for p, r in zip([-1.0, -2.0], [-1.5, -1.0])) / 2
    k3_bound = max(fp.k3_error(x) for x in (-0.5, 1.0)) + fp.gamma(2) * k3  # the per-token bound, then the mean
    # -1.0 + 1e-3·k3: the policy term is exact (r ≡ 1), the KL term carries its bound, the sum and product round
    assert abs(loss.item() - (-1.0 + 1e-3 * k3)) <= 1e-3 * k3_bound + fp.gamma(3) * (1.0 + 1e-3 * k3)
    with pytest.raises(ValueError, match="ref_log_probs"):
        ppo_policy_loss(lp, old, torch.ones(1, 2), mask, cfg)


def test_registries_defaults_and_errors():
    assert POLICY_LOSSES.names() == ["dapo", "fipo", "grpo"]
    fipo = POLICY_LOSSES.get("fipo").default_config
    assert fipo == FIPOLossConfig(0.2, 0.28, 10.0, 32.0, 0.2, True, 10.0, True)
    assert POLICY_LOSSES.get("dapo").default_config == PPOLossConfig(0.2, 0.28, 10.0, "token-mean", 0.0)
    seven_b = POLICY_LOSSES.get("fipo").make_config(weight_clip_high_only=False, safety_threshold=3.0)
    assert (seven_b.weight_clip_high_only, seven_b.safety_threshold, seven_b.decay_rate) == (False, 3.0, 32.0)
    with pytest.raises(ValueError, match=r"unknown policy loss 'ppo2'.*\['dapo', 'fipo', 'grpo'\]"):
        POLICY_LOSSES.get("ppo2")
    with pytest.raises(TypeError):
        POLICY_LOSSES.get("fipo").make_config(decay=3)
    reg = Registry("thing")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 2)
    assert "grpo" in ADVANTAGE_ESTIMATORS and "correctness_varies" in SAMPLE_FILTERS


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(clip_low=1.0), "clip_low"),
        (dict(clip_c=1.1), "clip_c"),
        (dict(decay_rate=0.0), "decay_rate"),
        (dict(weight_clip=1.5), "weight_clip"),
        (dict(loss_agg_mode="sum"), "loss_agg_mode"),
    ],
)
def test_fipo_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FIPOLossConfig(**kwargs)


def test_future_sum_argument_errors():
    with pytest.raises(ValueError, match="gamma"):
        discounted_future_sum(torch.zeros(1, 3), 1.5)
    with pytest.raises(ValueError, match="mask shape"):
        discounted_future_sum(torch.zeros(1, 3), 0.5, torch.ones(1, 4))
    assert discounted_future_sum(torch.zeros(2, 0), 0.5).shape == (2, 0)


def test_broadcast_to_tokens():
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert out.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]


def make_batch(b=4, p=3, t=5):
    return RolloutBatch(
        prompt_ids=torch.zeros(b, p, dtype=torch.long),
        prompt_mask=torch.ones(b, p, dtype=torch.bool),
        response_ids=torch.arange(b * t).view(b, t),
        response_mask=torch.ones(b, t, dtype=torch.bool),
        rollout_log_probs=torch.zeros(b, t),
        group_index=torch.tensor([0, 0, 1, 1])[:b],
        policy_version=3,
    )


def test_batch_split_select_replace_and_shape_errors():
    batch = make_batch()
    halves = batch.split(2)
    assert [h.response_ids[:, 0].tolist() for h in halves] == [[0, 5], [10, 15]]
    assert halves[1].policy_version == 3
    assert batch.select(torch.tensor([False, True, False, True])).group_index.tolist() == [0, 1]
    assert batch.replace(advantages=torch.ones(4, 5)).advantages.shape == (4, 5)
    with pytest.raises(ValueError, match="old_log_probs"):
        batch.replace(old_log_probs=torch.zeros(4, 6))
    with pytest.raises(ValueError, match="3 equal parts"):
        batch.split(3)
