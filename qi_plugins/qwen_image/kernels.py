"""Fast inference kernels for the layers every model here is made of.

``linear(layer, x, activation)`` computes ``activation(layer(x))``. On CPU, in float32, without autograd, and for a
plain ``nn.Linear`` (no adapter hooks, no subclass), it can run oneDNN's matmul with the activation fused into the
GEMM epilogue instead of the BLAS that ``F.linear`` uses. Which is faster depends on the CPU:

* with AVX-512 (torch's CPU capability ``AVX512``), oneDNN's own kernels use the wide vectors on any vendor while
  the BLAS may not (MKL keeps non-Intel CPUs on its AVX2 code): the fused path is the default there;
* on AVX2-only CPUs the BLAS wins (measured on an AVX2 AMD EPYC: 172–181 against 135–160 GFLOP/s for the DiT's
  shapes, and oneDNN's fused tanh-GELU costs 18 ms where a separate GELU costs 6): the plain path is the default.

The choice is a fixed rule of the CPU, not a timing, so every process on a machine computes the same numbers.
The two paths differ only by float32 summation order (≈1e-7 relative). ``QI_CPU_KERNELS`` in the environment
overrides the rule (``onednn``: the fused path; ``0`` or ``plain``: ``F.linear``), as do ``with
kernels.forced():`` and ``with kernels.disabled():``. Everywhere else (CUDA, half precision, training, wrapped or
hooked layers) ``linear`` is exactly ``activation(layer(x))``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

# name -> (oneDNN post-op, its algorithm, the same activation in plain torch)
_ACTIVATIONS = {
    None: ("none", "", lambda x: x),
    "gelu-tanh": ("gelu", "tanh", lambda x: F.gelu(x, approximate="tanh")),
    "gelu": ("gelu", "none", F.gelu),
}
_MODES = {"": "auto", "1": "auto", "auto": "auto", "onednn": "onednn", "0": "plain", "plain": "plain"}


def _env_mode() -> str:
    value = os.environ.get("QI_CPU_KERNELS", "")
    if value.lower() not in _MODES:
        warnings.warn(
            f"QI_CPU_KERNELS={value!r} is not one of auto, onednn, plain (or 1, 0); using auto", stacklevel=2
        )
    return _MODES.get(value.lower(), "auto")


_DEFAULT_MODE: str = _env_mode()
_mode = contextvars.ContextVar("qi_cpu_kernels", default=_DEFAULT_MODE)


def _has_onednn() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _prefers_onednn() -> bool:
    """The rule of the module docstring: oneDNN by default on CPUs where torch dispatches AVX-512 kernels."""
    try:
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _has_onednn()
_PREFERRED = _ONEDNN and _prefers_onednn()


@contextlib.contextmanager
def _using(mode: str) -> Iterator[None]:
    token = _mode.set(mode)
    try:
        yield
    finally:
        _mode.reset(token)


def disabled() -> contextlib.AbstractContextManager[None]:
    """Run the enclosed code with the plain torch kernels (for comparisons and debugging)."""
    return _using("plain")


def forced() -> contextlib.AbstractContextManager[None]:
    """Run the enclosed code on the oneDNN path wherever this torch has it, whatever the CPU rule says."""
    return _using("onednn")


def available() -> bool:
    """Whether this torch build has the oneDNN linear at all."""
    return _ONEDNN


def enabled() -> bool:
    """Whether ``linear`` takes the oneDNN path now (the CPU rule, the environment, ``forced``/``disabled``)."""
    mode = _mode.get()
    return _ONEDNN and (mode == "onednn" or (mode == "auto" and _PREFERRED))


def _unknown(activation: str | None) -> ValueError:
    names = sorted(k for k in _ACTIVATIONS if k)
    return ValueError(f"unknown activation {activation!r}; expected None or one of {names}")


def fast_path(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``linear`` would run ``layer`` on ``x`` through oneDNN (never while ``torch.compile`` traces: the
    compiler picks the kernels of compiled code)."""
    if torch.compiler.is_compiling():
        return False
    if type(layer) is not nn.Linear or layer._forward_hooks or layer._forward_pre_hooks:
        return False
    w = layer.weight
    if (x.device.type, x.dtype, w.device.type, w.dtype) != ("cpu", torch.float32, "cpu", torch.float32):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return False
    if x.numel() == 0 or w.is_meta or not enabled():
        return False
    # global module hooks would be skipped by the direct call
    return not (_module._global_forward_hooks or _module._global_forward_pre_hooks)


def linear(layer: nn.Module, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
    """``activation(layer(x))``; ``activation`` is None, ``"gelu-tanh"`` or ``"gelu"``."""
    if activation not in _ACTIVATIONS:
        raise _unknown(activation)
    attr, algorithm, eager = _ACTIVATIONS[activation]
    if not fast_path(layer, x):
        return eager(layer(x))
    return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, attr, [], algorithm)
