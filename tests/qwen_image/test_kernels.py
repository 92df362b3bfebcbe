"""qi_plugins.qwen_image.kernels: the oneDNN linear path equals F.linear (to float32 rounding) and steps aside where it
must.

"To float32 rounding" is checked against float64 (``tests/tolerance.py``): the fast and the plain float32
results must each lie within the float32 error bound of the float64 result (a linear layer with K = 96
accumulates 96 products, the bias and the activation: ≤ 100 rounded terms), not within a gap seen on one
CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerance import TINY_DIT_TERMS, check_float32
from torch import nn

from qi_plugins.qwen_image import kernels

needs_onednn = pytest.mark.skipif(
    not kernels.available(), reason="oneDNN linear not available in this torch build"
)


@pytest.fixture
def onednn():
    """The oneDNN path on, whatever this CPU's default (the rule picks the BLAS on AVX2-only CPUs)."""
    with kernels.forced():
        yield


def _layer(k=96, n=160, bias=True):
    lin = nn.Linear(k, n, bias=bias)
    nn.init.normal_(lin.weight, std=k**-0.5)
    return lin


@needs_onednn
@pytest.mark.parametrize("activation", [None, "gelu-tanh", "gelu"])
@pytest.mark.parametrize("bias", [True, False])
def test_fast_path_matches_eager(activation, bias, onednn):
    lin, x = _layer(bias=bias), torch.randn(2, 37, 96)
    with torch.no_grad():
        assert kernels.fast_path(lin, x)
        got = kernels.linear(lin, x, activation)
        with kernels.disabled():
            assert not kernels.fast_path(lin, x)
            want = kernels.linear(lin, x, activation)
    assert got.shape == want.shape == (2, 37, 160)
    truth = kernels.linear(lin.double(), x.double(), activation)  # float64: the plain path
    check_float32(got, truth, terms=100, what="fast")
    check_float32(want, truth, terms=100, what="plain")


@needs_onednn
def test_fast_path_takes_strided_inputs(onednn):
    lin, x = _layer(), torch.randn(37, 2, 96).transpose(0, 1)
    with torch.no_grad():
        assert kernels.fast_path(lin, x)
        got = kernels.linear(lin, x)
        truth = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    check_float32(got, truth, terms=100)


def test_falls_back_where_it_must():
    lin, x = _layer(), torch.randn(4, 96)
    assert not kernels.fast_path(lin, x), "autograd on: the oneDNN op has no backward"
    with torch.no_grad():
        assert not kernels.fast_path(lin.to(torch.bfloat16), x.bfloat16())
        lin.float()

        class Sub(nn.Linear):
            pass

        assert not kernels.fast_path(Sub(96, 160), x)
        handle = lin.register_forward_hook(lambda m, a, out: out + 1.0)
        try:
            assert not kernels.fast_path(lin, x)
            assert torch.equal(kernels.linear(lin, x), F.linear(x, lin.weight, lin.bias) + 1.0), (
                "hooks must run"
            )
        finally:
            handle.remove()


def test_training_gradients_flow_through_linear():
    lin, x = _layer(), torch.randn(3, 96, requires_grad=True)
    kernels.linear(lin, x, "gelu-tanh").sum().backward()
    assert x.grad is not None and lin.weight.grad is not None


@needs_onednn
def test_default_follows_the_cpu_rule_and_the_overrides(monkeypatch):
    """AVX-512 CPUs default to oneDNN, the others to the BLAS; ``forced``/``disabled`` override either, and
    ``QI_CPU_KERNELS`` is read at import (an unknown value warns and keeps the rule)."""
    for preferred in (True, False):
        monkeypatch.setattr(kernels, "_PREFERRED", preferred)
        assert kernels.enabled() is preferred
        with kernels.forced():
            assert kernels.enabled()
            with kernels.disabled():
                assert not kernels.enabled()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert kernels._prefers_onednn()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not kernels._prefers_onednn()
    for value, mode in (("onednn", "onednn"), ("0", "plain"), ("", "auto"), ("1", "auto")):
        monkeypatch.setenv("QI_CPU_KERNELS", value)
        assert kernels._env_mode() == mode
    monkeypatch.setenv("QI_CPU_KERNELS", "fast")
    with pytest.warns(UserWarning, match="QI_CPU_KERNELS='fast'"):
        assert kernels._env_mode() == "auto"


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="gelu-tanh"):
        kernels.linear(_layer(), torch.randn(2, 96), "relu6")


@needs_onednn
def test_dit_output_with_and_without_fast_kernels(tiny_model, onednn):
    """The whole DiT through the fast kernels stays within float32 rounding of the plain torch kernels."""
    from qi_core.protocols import DenoiseInput, TextSegment
    from qi_plugins.qwen_image.loading import load_dit

    dit = load_dit(tiny_model / "transformer").eval()
    g = torch.Generator().manual_seed(3)
    inp = DenoiseInput(
        latents=torch.randn(1, 16, 6, 10, generator=g),
        timestep=torch.tensor([500.0]),
        text=[TextSegment(torch.randn(1, 7, dit.config.joint_attention_dim, generator=g), None)],
    )
    with torch.no_grad():
        fast = dit(inp)
        with kernels.disabled():
            plain = dit(inp)
        inp.latents, inp.text[0].emb = inp.latents.double(), inp.text[0].emb.double()
        truth = dit.double()(inp)  # float64 never takes the fast path
    check_float32(fast, truth, terms=TINY_DIT_TERMS, what="fast")
    check_float32(plain, truth, terms=TINY_DIT_TERMS, what="plain")
