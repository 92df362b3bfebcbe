"""Float32 tolerances from a float64 ground truth and an error bound, not from one CPU's rounding.

Two float32 computations of the same maths (fused vs unfused LoRA, qi vs diffusers, batched vs separate
passes) differ only by rounding, and how they round depends on the order in which the CPU kernels accumulate
(AVX2 vs AVX-512 GEMM micro-kernels, oneDNN vs BLAS, thread count). A tolerance read off the difference seen
on one machine therefore fails on another (``1.76e-5 > 1e-5`` on a Xeon for a gap of ``4.9e-6`` on an EPYC).
Instead:

1. the maths: both computations run in float64 as well, where rounding is ~1e-16, and must agree to
   ``F64_RTOL`` (1e-12) relative to the output's magnitude. This is the discriminative check and it is
   CPU-independent;
2. the float32 rounding: each float32 result must lie within :func:`float32_bound` of its float64 result,

       bound = factor · eps32 · max|float64 result| · sqrt(terms),

   the probabilistic forward-error bound of a computation whose deepest dependency chain accumulates ``terms``
   rounded multiply-adds: rounding errors behave like independent zero-mean variables, so an n-term sum is
   off by O(sqrt(n)·u) with overwhelming probability, not n·u (Higham & Mary, "A New Approach to Probabilistic
   Rounding Error Analysis", SIAM J. Sci. Comput. 41(5), 2019). ``factor`` (4 by default) is the safety
   margin; ``terms`` is counted per model below (sum of the contraction lengths along the longest path from
   input to output; the errors of successive stages add in variance, so their terms add). The magnitude is
   that of the float64 result unless a test passes the largest value on the computation's path (``scale=``,
   e.g. a VAE decoder whose clamped output is smaller than its input latents). Measured on the tiny models,
   every float32 error is ≤ 0.15 of its bound (an EPYC, AVX2; the change that introduced this module lists
   the figures);
3. by the triangle inequality the two float32 results then differ by at most twice the bound plus the float64
   gap, which is the figure the old single-CPU tolerances tried to pin.

Where a "float64" run keeps some float32 steps on purpose (RoPE as a complex64 multiply, sinusoidal timestep
features, RMS norms; the official implementations do the same), the float64 results agree only to the float32
rounding of those few steps: such tests pass ``f64_atol=float32_bound(..., terms=F32_ISLAND_TERMS)``
(:func:`check_vs_reference`).

Set ``QI_TOLERANCE_LOG=path`` to append every checked comparison's figures to ``path`` (one JSON line each).
"""

from __future__ import annotations

import copy
import json
import math
import os

import torch

EPS32 = torch.finfo(torch.float32).eps  # 2**-23 ≈ 1.19e-7: float32 spacing at 1
F64_RTOL = 1e-12  # two float64 computations of the same maths: ~1e4 · eps64, far below any real difference
FACTOR = 4.0

# Longest accumulation chains of the tiny models the tests use (sums of contraction lengths), rounded up.
# DiT (golden / `qi make-tiny-model` / layered: 2 blocks, width 64, 2 heads of 32, FFN 256, ≤ 150 tokens S):
#   timestep MLP 256+64, txt_norm+txt_in 128, img_in 64; per block modulation 64, LayerNorm 128, q/k/v 64,
#   q/k RMS 32, q·k 32, softmax + attention·V 2S, to_out 64, LayerNorm 128, FFN 64+256 (= 832 + 2S);
#   norm_out + modulation 192, proj_out 64: 2432 + 4S ≤ 3032.
TINY_DIT_TERMS = 3000
# VAE (base_dim 8, channels 8/16/32/32, one res block per stage), one direction: 3x3 convolutions 9·C_in each
# (conv_in 144, mid res blocks 2·576, mid attention ~250, up/down stages 1440+1440+720+288, head 72) ≈ 5500.
TINY_VAE_TERMS = 6000
# Text encoder (Qwen2.5-VL text tower: 2 layers, width 64, MLP 128, heads of 16, S tokens): 928 + 4S, that is
# ≤ 1528 for S ≤ 150 (prompts alone) and ≤ 2128 for S ≤ 300 (with image tokens). Vision tower (≤ 1024 patches
# P per image): patch embedding 3·2·14·14 = 1176, windowed block ~400, full-attention block ~240 + 2P, merger
# ~290, so ≤ 4200; both ≤ 6500.
TINY_TEXT_TERMS = 2000
TINY_VL_TERMS = 6500
# The float32 steps a "float64" run keeps (qi and the official code alike): per block the float32 cast and
# complex multiply of RoPE on q and k, the RMS norms' float32 statistics (transformers' RMSNorm rounds its
# input to float32), plus the timestep features: a few roundings per block of the 2-block tiny models.
F32_ISLAND_TERMS = 16


def pipeline_terms(steps: int, *, text: int = TINY_TEXT_TERMS, decode: bool = True) -> int:
    """A whole tiny pipeline call: the prompt encoding, ``steps`` DiT evaluations (each step's latents feed
    the next) and, for image outputs, the VAE decoder."""
    return text + steps * TINY_DIT_TERMS + (TINY_VAE_TERMS if decode else 0)


def _max_abs(x) -> float:
    t = torch.as_tensor(x).detach()
    return float(t.abs().max()) if t.numel() else 0.0


def float32_bound(reference, *, terms: int, factor: float = FACTOR) -> float:
    """``factor · eps32 · max|reference| · sqrt(terms)``: how far a float32 computation accumulating ``terms``
    rounded terms along its longest chain may lie from the exact (float64) ``reference``."""
    return factor * EPS32 * _max_abs(reference) * math.sqrt(terms)


def _gap(a, b) -> float:
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    return _max_abs(a.to(torch.float64) - b.to(torch.float64))


def _log(what: str, figures: dict) -> None:
    path = os.environ.get("QI_TOLERANCE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"what": what, **figures}) + "\n")


def check_float32(result32, truth64, *, terms: int, factor: float = FACTOR, scale: float | None = None,
                  what: str = "") -> float:  # fmt: skip
    """Assert a float32 result lies within :func:`float32_bound` of the float64 result of the same maths
    (``scale``: the largest magnitude on the computation's path, default ``max|truth64|``); returns its
    error."""
    scale = _max_abs(truth64) if scale is None else scale
    err, bound = _gap(result32, truth64), float32_bound(scale, terms=terms, factor=factor)
    _log(what, {"err32": err, "bound": bound, "scale": scale})
    assert err <= bound, f"{what}: float32 result is {err:.3g} from float64, beyond the bound {bound:.3g}"
    return err


def check_same_maths(a32, b32, a64, b64, *, terms: int, factor: float = FACTOR, f64_atol: float | None = None,
                     scale: float | None = None, what: str = "") -> dict[str, float]:  # fmt: skip
    """Two computations ``a`` and ``b`` of the same maths, run in float32 (``a32``, ``b32``) and in float64
    (``a64``, ``b64``): the float64 results agree to ``f64_atol`` (default ``F64_RTOL · scale``) and each
    float32 result lies within ``float32_bound(scale, terms, factor)`` of its float64 result (so the float32
    results are within twice that of each other). ``scale``: the largest magnitude on the computations' path,
    default the largest float64 result. Returns the figures."""
    scale = max(_max_abs(a64), _max_abs(b64)) if scale is None else scale
    figures = {
        "scale": scale,
        "f32_gap": _gap(a32, b32),
        "f64_gap": _gap(a64, b64),
        "err_a32": _gap(a32, a64),
        "err_b32": _gap(b32, b64),
        "bound": factor * EPS32 * scale * math.sqrt(terms),
        "f64_atol": F64_RTOL * scale if f64_atol is None else f64_atol,
    }
    _log(what, figures)
    f = {k: f"{v:.3g}" for k, v in figures.items()}
    assert figures["f64_gap"] <= figures["f64_atol"], f"{what}: the float64 results differ: {f}"
    assert figures["err_a32"] <= figures["bound"] and figures["err_b32"] <= figures["bound"], (
        f"{what}: a float32 result is further from float64 than the bound: {f}"
    )
    assert figures["f32_gap"] <= 2 * figures["bound"] + figures["f64_gap"], f  # implied by the two above
    return figures


def check_float32_gap(a32, b32, *, terms: int, factor: float = FACTOR, scale: float | None = None,
                      what: str = "") -> float:  # fmt: skip
    """Two float32 computations of the same maths where a float64 run in the test would cost too much: each lies
    within the float32 bound of the exact result (what a float64 comparison, made when the test was written,
    showed), so they lie within twice that bound of each other. Returns the gap."""
    scale = max(_max_abs(a32), _max_abs(b32)) if scale is None else scale
    gap, bound = _gap(a32, b32), 2 * float32_bound(scale, terms=terms, factor=factor)
    _log(what, {"f32_gap": gap, "bound": bound, "scale": scale})
    assert gap <= bound, (
        f"{what}: the float32 results differ by {gap:.3g}, beyond twice the bound ({bound:.3g})"
    )
    return gap


def check_vs_reference(ours32, ref32, ours64, ref64, *, terms: int, what: str = "") -> dict[str, float]:
    """qi against an official implementation (diffusers, transformers) on the same weights:
    :func:`check_same_maths` where the float64 runs agree to the float32 rounding of the steps both keep in
    float32 (RoPE as a complex64 multiply, sinusoidal timestep features, RMS norms), that is to
    ``float32_bound(ref64, terms=F32_ISLAND_TERMS)``."""
    island = float32_bound(ref64, terms=F32_ISLAND_TERMS)
    return check_same_maths(ours32, ref32, ours64, ref64, terms=terms, f64_atol=island, what=what)


def float32_noise(pipe):
    """Let a float64 pipeline draw its seeded noise in float32 and widen it, as the float32 pipeline draws it,
    so that both start from the same noise and differ only by the rounding of what follows (as the golden
    data's float64 runs do). Returns ``pipe``."""
    draw = type(pipe).noise

    def noise(state):
        narrow = copy.copy(pipe)
        narrow.dtype = torch.float32
        return draw(narrow, state).to(pipe.dtype)

    pipe.noise = noise
    return pipe
