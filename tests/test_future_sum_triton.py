"""The Triton kernel for the discounted future sum (advantage/future_sum_triton.py) and its dispatch.

* Dispatch tests run everywhere (no triton needed): CPU tensors always take the torch path, which is the
  reference and keeps its numerics.
* Kernel tests need triton. With a GPU they run the compiled kernel on CUDA tensors; without one they run it in
  Triton's interpreter (TRITON_INTERPRET=1, set below before the kernel module is imported) on CPU tensors.
  Without triton they are skipped. They compare against a float64 right-to-left recurrence:
  ‖F − F64‖ / ‖F64‖ ≤ 1e-6, and per element |F − F64| ≤ 1e-6 · (the same sum of |values|) + 1e-30.

    PYTHONPATH=/path/to/triton TRITON_INTERPRET=1 python -m pytest tests/test_future_sum_triton.py -q
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

import advantage.future_sum as future_sum_module
from advantage import discounted_future_sum, gamma_from_decay_rate

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON and not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernel module's import (triton.jit reads it)
DEVICE = "cuda" if HAS_CUDA else "cpu"
REL_TOL = 1e-6

needs_triton = pytest.mark.skipif(
    not HAS_TRITON or not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="triton is not installed (the kernel runs on CUDA, or on CPU under TRITON_INTERPRET=1)",
)


def recurrence64(values: torch.Tensor, gamma: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """F_t = x_t + γ·F_{t+1}, right to left, float64 on the CPU, over the last axis of a 2-D tensor."""
    x = values.detach().cpu().double()
    if mask is not None:
        x = torch.where(mask.cpu().bool(), x, 0.0)
    out = torch.empty_like(x)
    acc = torch.zeros(x.shape[0], dtype=torch.float64)
    for t in range(x.shape[1] - 1, -1, -1):
        acc = x[:, t] + gamma * acc
        out[:, t] = acc
    return out


def check_close(got: torch.Tensor, values: torch.Tensor, gamma: float, mask: torch.Tensor | None = None) -> float:
    """Assert the norm-relative and per-element bounds of the module docstring; return the relative error."""
    want = recurrence64(values, gamma, mask)
    scale = recurrence64(values.abs(), gamma, mask)  # per element: the sum of |terms|
    diff = got.detach().cpu().double() - want
    assert torch.isfinite(got).all()
    assert (diff.abs() <= REL_TOL * scale + 1e-30).all(), (
        f"max elementwise excess {(diff.abs() - REL_TOL * scale).max()}"
    )
    norm = want.norm().item()
    rel = diff.norm().item() / norm if norm > 0 else diff.norm().item()
    assert rel <= REL_TOL, rel
    return rel


@pytest.fixture(scope="module")
def kernel():
    from advantage import future_sum_triton

    return future_sum_triton


# --------------------------------------------------------------------------------------------------------
# dispatch (no triton needed)


def test_cpu_tensors_take_the_torch_path(monkeypatch):
    monkeypatch.setattr(future_sum_module, "triton_available", lambda: True)  # even if triton were there
    x = torch.randn(3, 70)
    assert not future_sum_module._use_triton(x, "auto")
    assert not future_sum_module._use_triton(x, "torch")
    assert future_sum_module._use_triton(x, "triton")
    gamma = gamma_from_decay_rate(8.0)
    mask = torch.rand(3, 70) > 0.2
    torch.testing.assert_close(
        discounted_future_sum(x, gamma, mask), discounted_future_sum(x, gamma, mask, backend="torch"), rtol=0, atol=0
    )


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="backend"):
        discounted_future_sum(torch.randn(2, 5), 0.5, backend="cuda")


def test_mask_shape_checked_before_dispatch():
    with pytest.raises(ValueError, match="mask shape"):
        discounted_future_sum(torch.randn(2, 5), 0.5, torch.ones(2, 4, dtype=torch.bool), backend="triton")


def test_autograd_through_values_keeps_the_torch_path(monkeypatch):
    monkeypatch.setattr(future_sum_module, "triton_available", lambda: True)
    x = torch.randn(2, 40, requires_grad=True)
    assert not future_sum_module._use_triton(x, "auto")  # CPU anyway; and on CUDA the kernel has no backward
    discounted_future_sum(x, 0.9).sum().backward()
    assert x.grad is not None


def test_a_failing_kernel_falls_back_to_the_torch_path_under_auto(monkeypatch):
    """A kernel that fails to compile or launch (simulated) warns once and never stops training."""
    import sys
    import types

    def broken(*args, **kwargs):
        raise RuntimeError("simulated compile failure")

    monkeypatch.setitem(sys.modules, "advantage.future_sum_triton", types.SimpleNamespace(future_sum_triton=broken))
    monkeypatch.setattr(future_sum_module, "_triton_failure", [])
    monkeypatch.setattr(future_sum_module, "_use_triton", lambda values, backend: backend != "torch")
    x, mask = torch.randn(2, 50), torch.rand(2, 50) > 0.5
    with pytest.warns(RuntimeWarning, match="simulated compile failure"):
        got = discounted_future_sum(x, 0.9, mask)
    torch.testing.assert_close(got, discounted_future_sum(x, 0.9, mask, backend="torch"), rtol=0, atol=0)
    assert future_sum_module._triton_failure
    with pytest.raises(RuntimeError, match="simulated"):  # forcing the kernel surfaces the error
        discounted_future_sum(x, 0.9, mask, backend="triton")


@pytest.mark.skipif(HAS_TRITON, reason="triton is installed")
def test_forcing_triton_without_triton_raises_import_error():
    assert not future_sum_module.triton_available()
    with pytest.raises(ImportError):
        discounted_future_sum(torch.randn(2, 5), 0.5, backend="triton")


# --------------------------------------------------------------------------------------------------------
# the kernel (CUDA, or the interpreter on CPU)

GAMMAS = [0.0, 1e-20, 0.5, gamma_from_decay_rate(32.0), gamma_from_decay_rate(1024.0), 1.0 - 1e-7, 1.0]


@needs_triton
@pytest.mark.parametrize("length", [1, 2, 15, 16, 17, 255, 1023, 1024, 1025, 2049, 4100])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_kernel_matches_float64_recurrence(kernel, length, gamma):
    gen = torch.Generator().manual_seed(length)
    values = torch.randn(3, length, generator=gen).to(DEVICE)
    mask = (torch.rand(3, length, generator=gen) > 0.25).to(DEVICE)
    check_close(kernel.future_sum_triton(values, gamma), values, gamma)
    check_close(kernel.future_sum_triton(values, gamma, mask), values, gamma, mask)


@needs_triton
@pytest.mark.parametrize("decay_rate", [8.0, 32.0, 1024.0, 1e6])
def test_kernel_full_length_20480(kernel, decay_rate):
    """The official recipe's length, right-padded rows of random lengths (as FIPO calls it)."""
    gen = torch.Generator().manual_seed(int(decay_rate))
    length = 20480
    values = (torch.randn(2, length, generator=gen) * 1e-2).to(DEVICE)
    lengths = torch.tensor([length, 7000])
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(DEVICE)
    gamma = gamma_from_decay_rate(decay_rate)
    got = kernel.future_sum_triton(values, gamma, mask)
    check_close(got, values, gamma, mask)
    assert (got[1, 7000:] == 0).all()
    cpu_path = discounted_future_sum(values.cpu(), gamma, mask.cpu(), backend="torch")
    assert (got.cpu().double() - cpu_path.double()).norm() <= REL_TOL * cpu_path.double().norm()


@needs_triton
def test_kernel_tuning_knobs_give_the_same_result(kernel):
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(2, 3001, generator=gen).to(DEVICE)
    gamma = gamma_from_decay_rate(32.0)
    for sub_block, sub_blocks in [(16, 16), (16, 64), (32, 32), (64, 16)]:
        check_close(kernel.future_sum_triton(values, gamma, sub_block=sub_block, sub_blocks=sub_blocks), values, gamma)
    with pytest.raises(ValueError, match="power of two"):
        kernel.future_sum_triton(values, gamma, sub_block=8)


@needs_triton
def test_kernel_writes_every_element_and_ignores_garbage_under_the_mask(kernel):
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(4, 1500, generator=gen)
    mask = torch.rand(4, 1500, generator=gen) > 0.5
    mask[2] = False  # a row with nothing to sum
    values[~mask] = math.nan  # padding garbage must not leak (the torch path zeroes it too)
    out = torch.full((4, 1500), math.nan, device=DEVICE)  # poisoned: every element must be written
    got = kernel.future_sum_triton(values.to(DEVICE), 0.97, mask.to(DEVICE), out=out)
    assert got is out
    check_close(got, torch.where(mask, values, 0.0), 0.97, mask)
    assert (got[2] == 0).all()


@needs_triton
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64])
def test_kernel_mask_dtypes(kernel, mask_dtype):
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(2, 300, generator=gen)
    mask = torch.rand(2, 300, generator=gen) > 0.4
    got = kernel.future_sum_triton(values.to(DEVICE), 0.9, mask.to(mask_dtype).to(DEVICE))
    check_close(got, values, 0.9, mask)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dispatch_leading_dims_and_low_precision(kernel, dtype):
    gen = torch.Generator().manual_seed(4)
    values = torch.randn(2, 3, 257, generator=gen).to(DEVICE, dtype)
    mask = (torch.rand(2, 3, 257, generator=gen) > 0.3).to(DEVICE)
    got = discounted_future_sum(values, 0.95, mask, backend="triton")
    assert got.shape == values.shape and got.dtype == dtype
    want = discounted_future_sum(values, 0.95, mask, backend="torch")  # float32 inside, cast back
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@needs_triton
def test_empty_inputs(kernel):
    for shape in [(0, 5), (3, 0)]:
        got = kernel.future_sum_triton(torch.empty(shape, device=DEVICE), 0.5)
        assert got.shape == shape


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")
def test_auto_dispatch_uses_the_kernel_on_cuda(monkeypatch):
    from advantage import future_sum_triton

    calls = []
    real = future_sum_triton.future_sum_triton
    monkeypatch.setattr(future_sum_triton, "future_sum_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    values = torch.randn(2, 100, device="cuda")
    check_close(discounted_future_sum(values, 0.9), values, 0.9)
    assert calls == [1]
    discounted_future_sum(values.double(), 0.9)  # float64 stays on the torch path
    discounted_future_sum(values.requires_grad_(True), 0.9)  # so does autograd through values
    assert calls == [1]
