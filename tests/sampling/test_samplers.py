"""Samplers on analytic velocity fields: the measured order of accuracy, and the contract's bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch

from qi_plugins.sampling.samplers import Euler, Heun

# dx/dσ = −x·σ  →  x(σ) = x(σ0)·exp((σ0² − σ²)/2): smooth, nonlinear in σ, exactly known
X0, S0, S1 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), 1.0, 0.2


def field(x: torch.Tensor, i: int, sigma: torch.Tensor) -> torch.Tensor:
    return -x * sigma


def error(sampler, n: int) -> float:
    sigmas = torch.linspace(S0, S1, n + 1, dtype=torch.float64)
    got = sampler.sample(field, X0.clone(), sigmas, state=None)
    exact = X0 * math.exp((S0**2 - S1**2) / 2)
    return (got - exact).abs().max().item()


@pytest.mark.parametrize(("sampler", "order"), [(Euler(), 1), (Heun(), 2)])
def test_measured_order(sampler, order):
    """Halving the step divides the error by 2^order (asymptotically: the coarsest pair may be 0.1 off)."""
    errs = [error(sampler, n) for n in (16, 32, 64, 128)]
    slopes = [math.log2(a / b) for a, b in zip(errs, errs[1:], strict=False)]
    print(
        f"{type(sampler).__name__}: errors {', '.join(f'{e:.3g}' for e in errs)}, measured order {slopes[-1]:.3f}"
    )
    assert all(abs(s - order) < 0.1 for s in slopes), slopes


class Recorder:
    def __init__(self):
        self.calls, self.done = [], []

    def velocity(self, x, i, sigma):
        self.calls.append((i, float(sigma)))
        return torch.ones_like(x)

    def progress(self, it):
        return it

    def step_done(self, i, latents):
        self.done.append(i)


def test_heun_evaluates_twice_per_step_and_once_at_the_end():
    rec = Recorder()
    sigmas = torch.tensor([1.0, 0.5, 0.25, 0.0])
    out = Heun().sample(rec.velocity, torch.zeros(2), sigmas, state=rec)
    assert rec.calls == [(0, 1.0), (0, 0.5), (1, 0.5), (1, 0.25), (2, 0.25)]
    assert rec.done == [0, 1, 2]
    assert torch.equal(out, torch.full((2,), -1.0))  # v = 1 integrated from σ=1 to σ=0


def test_euler_reports_every_step():
    rec = Recorder()
    Euler().sample(rec.velocity, torch.zeros(1), torch.tensor([1.0, 0.625, 0.0]), state=rec)
    assert rec.calls == [(0, 1.0), (1, 0.625)] and rec.done == [0, 1]
