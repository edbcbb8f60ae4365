"""FIPO_SPEC §10 test vectors TV1-TV10 (hand-checkable values from the spec, not from our code), to the spec's
6 decimals plus the float32 rounding of the computation (`spec`)."""

import math

import fp_bounds as fp
import pytest
import torch

from advantage import (
    FIPOLossConfig,
    PPOLossConfig,
    discounted_future_sum,
    filter_groups,
    fipo_policy_loss,
    gamma_from_decay_rate,
    grpo_advantages,
    influence_weights,
    overlong_penalty,
    ppo_policy_loss,
)

SPEC_ROUNDING = 5e-7  # the spec gives its values to 6 decimals: half a unit of the last one
F32_ROUNDINGS = 32  # a value here is at most ~25 float32 roundings from its inputs (4-token sums, exp, products)


def spec(expected):
    """pytest.approx of a spec value (or list) to its rounding plus γ(32)·max(1, |value|): the float32 error of a
    computation whose terms are no larger than the value (one sign of advantage within a test)."""
    values = expected if isinstance(expected, (list, tuple)) else [expected]
    return pytest.approx(expected, abs=SPEC_ROUNDING + fp.gamma(F32_ROUNDINGS) * max(1.0, *(abs(v) for v in values)))


def t(values):
    return torch.tensor([values], dtype=torch.float32)


def run(delta, adv, *, mask=None, tau=1.0, high_only=False, safety=10.0):
    logp = t(delta).requires_grad_(True)
    mask = torch.ones_like(logp, dtype=torch.bool) if mask is None else torch.tensor([mask], dtype=torch.bool)
    cfg = FIPOLossConfig(decay_rate=tau, weight_clip_high_only=high_only, safety_threshold=safety)
    loss, metrics = fipo_policy_loss(logp, torch.zeros_like(logp), torch.full_like(logp, adv), mask, cfg)
    return loss, logp, metrics, cfg


def per_token(delta, adv, **kw):
    """Per-token losses via the mean over a single valid token at a time (uses only the public loss)."""
    out = []
    for i in range(len(delta)):
        # weights depend on the future, so compute the full weight vector and then isolate token i's loss
        mask = [j == i for j in range(len(delta))]
        logp = t(delta)
        cfg = FIPOLossConfig(
            decay_rate=kw.get("tau", 1.0),
            weight_clip_high_only=kw.get("high_only", False),
            safety_threshold=kw.get("safety", 10.0),
            drop_seq_on_dual_clip=False,
        )
        f = influence_weights(discounted_future_sum(logp, cfg.gamma, logp <= math.log(cfg.clip_c)), cfg)
        ratio = torch.exp(logp)
        if adv < 0:
            f = torch.where(ratio > cfg.safety_threshold, f.clamp(0.8, 1.0), f)
        loss, _ = ppo_policy_loss(logp, torch.zeros_like(logp), adv * f, torch.tensor([mask]), PPOLossConfig())
        out.append(loss.item())
    return out


def test_tv1_future_sum_and_weights():
    delta = t([0.1, -0.4, 0.3, -0.2])
    f = discounted_future_sum(delta, 0.5)
    assert f[0].tolist() == spec([-0.05, -0.3, 0.2, -0.2])
    mode_a = influence_weights(f, FIPOLossConfig(weight_clip_high_only=False))
    assert mode_a[0].tolist() == spec([0.951229, 0.8, 1.2, 0.818731])
    mode_b = influence_weights(f, FIPOLossConfig(weight_clip_high_only=True))
    assert mode_b[0].tolist() == spec([1.0, 1.0, 1.2, 1.0])


@pytest.mark.parametrize(
    "adv,high_only,tokens,mean",
    [
        (1.0, False, [-1.051271, -0.536256, -1.536, -0.670320], -0.948462),
        (-1.0, False, [1.051271, 0.64, 1.619831, 0.670320], 0.995355),
        (1.0, True, [-1.105171, -0.670320, -1.536, -0.818731], -1.032555),
        (-1.0, True, [1.105171, 0.8, 1.619831, 0.818731], 1.085933),
    ],
)
def test_tv1_losses(adv, high_only, tokens, mean):
    delta = [0.1, -0.4, 0.3, -0.2]
    loss, *_ = run(delta, adv, high_only=high_only)
    assert loss.item() == spec(mean)
    assert per_token(delta, adv, high_only=high_only) == spec(tokens)


@pytest.mark.parametrize(
    "adv,grad", [(1.0, [-0.262818, -0.134064, 0.0, -0.167580]), (-1.0, [0.262818, 0.0, 0.404958, 0.167580])]
)
def test_tv1_gradient(adv, grad):
    loss, logp, *_ = run([0.1, -0.4, 0.3, -0.2], adv)
    loss.backward()
    assert logp.grad[0].tolist() == spec(grad)


def test_tv2_tau_32():
    delta = t([0.1, -0.4, 0.3, -0.2])
    f = discounted_future_sum(delta, gamma_from_decay_rate(32.0))
    assert f[0].tolist() == spec([-0.191565, -0.297949, 0.104286, -0.2])
    loss, *_ = run([0.1, -0.4, 0.3, -0.2], 1.0, tau=32.0)
    assert loss.item() == spec(-0.884943)


def test_tv3_filter():
    delta = [0.1, 2.5, 0.3, -0.2]
    loss, _, metrics, _ = run(delta, 1.0)
    assert loss.item() == spec(-1.226241)
    assert per_token(delta, 1.0) == spec([-1.284025, -1.414619, -1.536, -0.670320])
    assert metrics["future_kl_max"].item() == spec(0.2)  # unfiltered it would be 2.6
    loss, _, metrics, _ = run(delta, -1.0)
    assert loss.item() == spec(3.393544)
    assert per_token(delta, -1.0) == spec([1.284025, 10.0, 1.619831, 0.670320])
    assert metrics["dropped_seqs"].item() == 0  # one dual-clipped token is tolerated


@pytest.mark.parametrize(
    "safety,high_only,mean", [(10.0, False, 2.248596), (4.0, False, 2.024511), (4.0, True, 2.061614)]
)
def test_tv4_safety_threshold(safety, high_only, mean):
    loss, *_ = run([0.1, 1.5, 0.3, -0.2], -1.0, safety=safety, high_only=high_only)
    assert loss.item() == spec(mean)


def test_tv5_padding():
    loss, *_ = run([0.1, -0.4, 0.3, 5.0], 1.0, mask=[1, 1, 1, 0])
    assert loss.item() == spec(-1.050047)
    f = discounted_future_sum(t([0.1, -0.4, 0.3, 5.0]), 0.5, torch.tensor([[1, 1, 1, 0]]))
    assert f[0].tolist() == spec([-0.025, -0.25, 0.3, 0.0])


def test_tv6_sequence_drop():
    logp = torch.tensor([[2.5, 0.0, 2.6, 0.0], [0.0, 0.0, 0.0, 0.1]])
    cfg = FIPOLossConfig(decay_rate=1.0, weight_clip_high_only=False)
    loss, metrics = fipo_policy_loss(
        logp, torch.zeros_like(logp), -torch.ones_like(logp), torch.ones_like(logp, dtype=torch.bool), cfg
    )
    assert loss.item() == spec(1.077642)
    assert metrics["dropped_seqs"].item() == 1
    no_drop = FIPOLossConfig(decay_rate=1.0, weight_clip_high_only=False, drop_seq_on_dual_clip=False)
    loss_kept, _ = fipo_policy_loss(
        logp, torch.zeros_like(logp), -torch.ones_like(logp), torch.ones_like(logp, dtype=torch.bool), no_drop
    )
    assert loss_kept.item() == spec((10 + 1 + 10 + 1 + 4 * 1.077642) / 8)


@pytest.mark.parametrize("high_only", [False, True])
@pytest.mark.parametrize("tau", [1.0, 32.0, 256.0])
def test_tv7_zero_drift_equals_dapo(high_only, tau):
    torch.manual_seed(0)
    logp = torch.randn(3, 17)
    adv = torch.randn(3, 1).expand(3, 17).contiguous()
    mask = torch.rand(3, 17) > 0.2
    a = logp.clone().requires_grad_(True)
    b = logp.clone().requires_grad_(True)
    cfg = FIPOLossConfig(decay_rate=tau, weight_clip_high_only=high_only)
    fipo, metrics = fipo_policy_loss(a, logp, adv, mask, cfg)
    dapo, _ = ppo_policy_loss(b, logp, adv, mask, PPOLossConfig())
    fipo.backward()
    dapo.backward()
    assert fipo.item() == dapo.item()
    assert torch.equal(a.grad, b.grad)
    assert metrics["influence_weights_min"].item() == metrics["influence_weights_max"].item() == 1.0


def test_tv8_long_sequence_closed_form():
    gamma = gamma_from_decay_rate(32.0)
    f = discounted_future_sum(torch.full((1, 4), 0.01), gamma)
    assert f[0].tolist() == spec([0.038733, 0.029362, 0.019786, 0.01])
    long = 20480
    for delta, f1, weight in [(1e-3, 0.046668, 1.047774), (2.0, 93.336, 1.2), (-20.0, -933.36, None)]:
        fut = discounted_future_sum(torch.full((1, long), delta), gamma)
        closed = delta * (1 - gamma**long) / (1 - gamma)
        # a constant, non-negative input: the scan's bound is relative to F itself (plus the input's rounding)
        assert fut[0, 0].item() == pytest.approx(closed, rel=fp.gamma(fp.scan_roundings(long)) + fp.U)
        assert fut[0, 0].item() == pytest.approx(f1, rel=1e-4)
        for high_only in (False, True):
            cfg = FIPOLossConfig(weight_clip_high_only=high_only)
            w = influence_weights(fut, cfg)[0, 0].item()
            lower = 1.0 if high_only else 0.8
            expected = weight if weight is not None else lower
            assert math.isfinite(w) and w == spec(expected)


def test_tv9_gamma_half_life():
    for tau in (8.0, 32.0, 128.0, 256.0):
        assert gamma_from_decay_rate(tau) ** tau == pytest.approx(0.5, abs=1e-12)
    assert gamma_from_decay_rate(32.0) == pytest.approx(0.978572062, abs=1e-9)


def test_tv10_baselines():
    adv = grpo_advantages(torch.tensor([1.0, -1, -1, 1]), torch.zeros(4, dtype=torch.long))
    assert adv.tolist() == spec([0.866025, -0.866025, -0.866025, 0.866025])
    adv = grpo_advantages(torch.tensor([1.0, 0.5, -1, -1]), torch.zeros(4, dtype=torch.long))
    assert adv.tolist() == spec([1.091409, 0.606338, -0.848874, -0.848874])
    pen = overlong_penalty(torch.tensor([1000, 16384, 16385, 18432, 20480]), 20480, 4096, 1.0)
    assert pen.tolist() == spec([0.0, 0.0, -0.000244, -0.5, -1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    correct = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    keep = filter_groups(correct, groups)
    assert keep.tolist() == [False] * 8 + [True] * 4
