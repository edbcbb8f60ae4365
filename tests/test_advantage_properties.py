"""Properties of advantage/ against the independent float64 reference in tests/fipo_reference.py."""

import math

import fipo_reference as ref
import fp_bounds as fp
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from advantage import (
    LOSS_AGG_MODES,
    FIPOLossConfig,
    PPOLossConfig,
    aggregate_loss,
    discounted_future_sum,
    fipo_policy_loss,
    gamma_from_decay_rate,
    influence_weights,
    loss_normalizer,
    ppo_policy_loss,
)

SETTINGS = settings(max_examples=40, deadline=None)


def random_inputs(seed, batch, length, scale=0.5, pad=True):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(batch, length, generator=g) * 3
    old = logp + torch.randn(batch, length, generator=g) * scale
    adv = torch.randn(batch, 1, generator=g).expand(batch, length).contiguous()
    lengths = torch.randint(1, length + 1, (batch,), generator=g) if pad else torch.full((batch,), length)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return logp, old, adv, mask


@SETTINGS
@given(
    seed=st.integers(0, 10**6),
    length=st.integers(1, 300),
    gamma=st.sampled_from([0.0, 1e-3, 0.5, 0.9, gamma_from_decay_rate(32), 0.9999, 1.0]),
    block=st.sampled_from([1, 2, 3, 7, 32, 128, 4096]),
    nonneg=st.booleans(),
)
@example(seed=0, length=129, gamma=1e-3, block=128, nonneg=False)  # γ^K underflows; the next block reaches this tail
@example(seed=1, length=70, gamma=1e-9, block=32, nonneg=False)
def test_future_sum_matches_float64_recurrence_for_any_block(seed, length, gamma, block, nonneg):
    """Every position within the float32 rounding bound of the scan (tests/fp_bounds.py `scan_roundings`:
    γ(Σ_levels (min(K, t) + 4)) times the discounted sum of |x|). With non-negative inputs that bound is
    relative to F itself (≤ 8.3e-6 for blocks up to 128, 1.8e-5 for one 300-term block), so a wrong decay
    exponent (a relative error of at least 1 − γ) or a lost carry is caught for every γ ≤ 0.9999."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, length, generator=g)
    x = x.abs() if nonneg else x
    mask = torch.rand(3, length, generator=g) > 0.3
    got = discounted_future_sum(x, gamma, mask, block_size=block).double()
    want = torch.tensor([ref.future_sum(r, gamma, m) for r, m in zip(x.double().tolist(), mask.tolist())])
    bound = fp.future_sum_bound(x, gamma, mask, block_size=block)
    assert ((got - want).abs() <= bound).all(), float(((got - want).abs() / bound.clamp(min=1e-300)).max())


def test_future_sum_long_sequences_float64_exact():
    """T = 32768 (three levels of blocks), against a float64 recurrence, for several decays: every position
    within the scan's rounding bound (γ(108) ≈ 6.4e-6 times the discounted sum of |x|). The non-negative
    case makes that bound relative to F, tight enough to catch an off-by-one decay exponent even at
    τ = 4096 (a relative error of 1 − γ = 1.7e-4)."""
    g = torch.Generator().manual_seed(1)
    signed = torch.randn(2, 32768, generator=g)
    for x in (signed, signed.abs()):
        for tau in (1.0, 32.0, 4096.0):
            gamma = gamma_from_decay_rate(tau)
            got = discounted_future_sum(x, gamma).double()
            want = discounted_future_sum(x.double(), gamma, block_size=1)  # float64 sequential recurrence
            bound = fp.future_sum_bound(x, gamma)
            assert ((got - want).abs() <= bound).all(), (tau, float(((got - want).abs() / bound).max()))


@SETTINGS
@given(seed=st.integers(0, 10**6), extra=st.integers(1, 40))
def test_padding_does_not_change_valid_positions(seed, extra):
    logp, old, adv, mask = random_inputs(seed, 3, 20, pad=False)
    g = torch.Generator().manual_seed(seed + 1)
    pad = lambda x, v: torch.cat([x, v], dim=1)  # noqa: E731
    logp2 = pad(logp, torch.randn(3, extra, generator=g) * 5)
    old2 = pad(old, torch.randn(3, extra, generator=g) * 5)
    adv2 = pad(adv, torch.randn(3, extra, generator=g))
    mask2 = pad(mask, torch.zeros(3, extra, dtype=torch.bool))
    # Padding moves the scan's block boundaries and the sums' vector lanes, so the float32 results may differ
    # in the last digits (on an AVX-512 EPYC 7% of these cases differ by more than rtol 1e-6): each layout
    # must equal the exact float64 value of the unpadded inputs within its own rounding bound.
    cfg = FIPOLossConfig()
    a, ma = fipo_policy_loss(logp, old, adv, mask, cfg)
    b, mb = fipo_policy_loss(logp2, old2, adv2, mask2, cfg)
    exact = fp.fipo_bounds(logp, old, adv, mask, cfg)
    padded = fp.fipo_bounds(logp2, old2, adv2, mask2, cfg)
    want = ref.aggregate(exact.token_losses.tolist(), exact.keep.tolist(), "token-mean")
    assert abs(a.item() - want) <= exact.loss_bound() and abs(b.item() - want) <= padded.loss_bound()
    want_f = torch.tensor([ref.future_sum(r, 0.97, m) for r, m in zip((logp - old).double().tolist(), mask.tolist())])
    f1 = discounted_future_sum(logp - old, 0.97, mask).double()
    f2 = discounted_future_sum(logp2 - old2, 0.97, mask2).double()
    assert ((f1 - want_f).abs() <= fp.future_sum_bound(logp - old, 0.97, mask)).all()
    assert ((f2[:, :20] - want_f).abs() <= fp.future_sum_bound(logp2 - old2, 0.97, mask2)[:, :20]).all()
    want_w = exact.weights[mask].mean().item()
    for metrics, t, m in ((ma, exact, mask), (mb, padded, mask2)):
        w_bound = fp.aggregate_bound(t.weight_err, t.weights, m, "token-mean")
        assert abs(metrics["influence_weights_mean"].item() - want_w) <= w_bound


@SETTINGS
@given(
    seed=st.integers(0, 10**6),
    scale=st.sampled_from([0.05, 0.5, 3.0]),
    tau=st.sampled_from([1.0, 8.0, 32.0]),
    eps_f=st.sampled_from([0.0, 0.2]),
    high_only=st.booleans(),
    safety=st.sampled_from([3.0, 10.0]),
    drop=st.booleans(),
)
def test_fipo_loss_matches_float64_reference(seed, scale, tau, eps_f, high_only, safety, drop):
    logp, old, adv, mask = random_inputs(seed, 4, 24, scale=scale)
    cfg = FIPOLossConfig(
        decay_rate=tau,
        weight_clip=eps_f,
        weight_clip_high_only=high_only,
        safety_threshold=safety,
        drop_seq_on_dual_clip=drop,
    )
    loss, metrics = fipo_policy_loss(logp, old, adv, mask, cfg)
    kw = dict(tau=tau, eps_f=eps_f, high_only=high_only, safety=safety)
    rows = [x.tolist() for x in (logp.double(), old.double(), adv.double(), mask)]
    want = ref.fipo_loss(*rows, drop_seq=drop, **kw)
    exact = fp.fipo_bounds(logp, old, adv, mask, cfg)  # the same reference, per token, with float32 error bounds
    assert abs(loss.item() - want) <= exact.loss_bound()
    weights = [w for lp, lo, a, m in zip(*rows) for w, mm in zip(ref.fipo_token_losses(lp, lo, a, m, **kw)[1], m) if mm]
    mean_bound = fp.aggregate_bound(exact.weight_err, exact.weights, mask, "token-mean")
    assert abs(metrics["influence_weights_mean"].item() - sum(weights) / len(weights)) <= mean_bound
    assert abs(metrics["influence_weights_min"].item() - min(weights)) <= exact.weight_err[mask].max().item()
    active = sum(abs(w - 1.0) > 0.01 for w in weights) / len(weights)
    assert metrics["influence_weights_active_frac"].item() == pytest.approx(active, abs=1e-6)


@SETTINGS
@given(seed=st.integers(0, 10**6), mode=st.sampled_from(LOSS_AGG_MODES), dual=st.booleans())
def test_ppo_loss_matches_float64_reference(seed, mode, dual):
    logp, old, adv, mask = random_inputs(seed, 4, 16, scale=1.0)
    cfg = PPOLossConfig(clip_c=10.0 if dual else None, loss_agg_mode=mode)
    loss, _ = ppo_policy_loss(logp, old, adv, mask, cfg)
    tokens = [
        ref.ppo_token_losses(a, b, c, c=cfg.clip_c)
        for a, b, c in zip(logp.double().tolist(), old.double().tolist(), adv.double().tolist())
    ]
    bound = fp.ppo_bounds(logp, old, adv, mask, clip_c=cfg.clip_c).loss_bound(mode)
    assert abs(loss.item() - ref.aggregate(tokens, mask.tolist(), mode)) <= bound


@SETTINGS
@given(seed=st.integers(0, 10**6), tau=st.sampled_from([1.0, 32.0]), high_only=st.booleans())
def test_fipo_gradient_is_dapo_gradient_scaled_by_weight(seed, tau, high_only):
    logp, old, adv, mask = random_inputs(seed, 3, 20, scale=0.3)
    cfg = FIPOLossConfig(decay_rate=tau, weight_clip_high_only=high_only, drop_seq_on_dual_clip=False)
    a = logp.clone().requires_grad_(True)
    loss, _ = fipo_policy_loss(a, old, adv, mask, cfg)
    loss.backward()
    assert loss.grad_fn is not None
    delta = (logp - old).clamp(-20, 20)
    weights = influence_weights(discounted_future_sum(delta, cfg.gamma, mask & (delta <= math.log(10.0))), cfg)
    weights = torch.where((adv < 0) & (delta.exp() > cfg.safety_threshold), weights.clamp(0.8, 1.0), weights)
    b = logp.clone().requires_grad_(True)
    dapo, _ = ppo_policy_loss(b, old, adv * weights, mask, PPOLossConfig())
    dapo.backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-9)


def test_influence_weights_never_require_grad_and_no_graph_through_future_kl():
    logp, old, adv, mask = random_inputs(0, 2, 30)
    logp.requires_grad_(True)
    cfg = FIPOLossConfig()
    loss, metrics = fipo_policy_loss(logp, old, adv, mask, cfg)
    assert all(not v.requires_grad for v in metrics.values())
    # The future sum is a matmul scan: no Mm/Bmm/Addcmul node may appear in the loss's autograd graph.
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    names = {type(node).__name__ for node in seen}
    assert not any(n.startswith(("Mm", "Bmm", "Addcmul", "Pow")) for n in names), names
    loss.backward()
    assert torch.isfinite(logp.grad).all()


@pytest.mark.parametrize("delta", [20.0, -20.0, 2.0, 2.3])
@pytest.mark.parametrize("eps_f", [0.0, 0.2])
def test_no_nan_or_inf_at_extremes(delta, eps_f):
    length = 20480
    logp = torch.full((2, length), delta, requires_grad=True)
    adv = torch.tensor([[1.0], [-1.0]]).expand(2, length)
    mask = torch.ones(2, length, dtype=torch.bool)
    cfg = FIPOLossConfig(weight_clip=eps_f)
    loss, metrics = fipo_policy_loss(logp, torch.zeros(2, length), adv, mask, cfg)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v).all() for v in metrics.values()), metrics
    if delta == 2.0 and eps_f == 0.2:  # FIPO_SPEC §8.1: F ≈ 93 overflows exp in fp32, the weight must be 1.2
        assert metrics["influence_weights_max"].item() == pytest.approx(1.2)


@SETTINGS
@given(
    seed=st.integers(0, 10**6),
    mode=st.sampled_from(LOSS_AGG_MODES),
    parts=st.sampled_from([1, 2, 3, 6]),
    loss_name=st.sampled_from(["fipo", "dapo"]),
)
def test_aggregation_invariant_to_micro_batch_split(seed, mode, parts, loss_name):
    logp, old, adv, mask = random_inputs(seed, 6, 12, scale=0.3)
    if loss_name == "fipo":
        fn, cfg = fipo_policy_loss, FIPOLossConfig(loss_agg_mode=mode, drop_seq_on_dual_clip=False)
        token_bounds = lambda rows: fp.fipo_bounds(logp[rows], old[rows], adv[rows], mask[rows], cfg)  # noqa: E731
    else:
        fn, cfg = ppo_policy_loss, PPOLossConfig(loss_agg_mode=mode)
        token_bounds = lambda rows: fp.ppo_bounds(logp[rows], old[rows], adv[rows], mask[rows])  # noqa: E731
    whole = logp.clone().requires_grad_(True)
    loss, _ = fn(whole, old, adv, mask, cfg)
    loss.backward()
    split = logp.clone().requires_grad_(True)
    normalizer = loss_normalizer(mask, mode)
    total, bound = 0.0, 0.0
    for idx in torch.arange(6).chunk(parts):
        part_loss, _ = fn(split[idx], old[idx], adv[idx], mask[idx], cfg, normalizer=normalizer)
        part_loss.backward()
        total += part_loss.item()  # summed in float64: exact enough
        bound += token_bounds(idx).loss_bound(mode, float(normalizer))
    # Both sides equal the exact loss within their float32 rounding bounds (tests/fp_bounds.py); the sum
    # of the parts is taken in float64.
    exact = token_bounds(torch.arange(6))
    assert abs(total - loss.item()) <= bound + exact.loss_bound(mode, float(normalizer))
    # Per token the gradient is −Ã·r / N on the active branch (0 when clipped): each side within its relative
    # error bound of the exact gradient, so they differ by at most twice that bound, relative to either.
    rel = exact.grad_rel_error()
    assert ((split.grad - whole.grad).double().abs() <= 2 * rel / (1 - rel) * whole.grad.double().abs()).all()


def test_aggregate_modes_hand_values():
    losses = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert aggregate_loss(losses, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(losses, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_loss(losses, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate_loss(losses, mask, "seq-mean-token-sum-norm").item() == pytest.approx(10 / (2 * 3))
    assert aggregate_loss(losses, torch.zeros_like(mask), "token-mean").item() == 0.0
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate_loss(losses, mask, "mean")
