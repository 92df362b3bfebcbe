"""Every memory policy and loop optimisation gives the same result as ``none`` (float32, CPU).

A policy only moves weights, so with the same loop settings it runs the very float ops of ``none``:
bit-identical. Against the plainest path (separate CFG passes, modulation inline) it is "the same" up to
float32 rounding: batching the CFG sides or the modulation of all steps changes the shapes of the GEMMs, and
whether a BLAS then sums in the same order is up to the CPU's kernels. So that comparison holds every output
to the float32 error bound of a whole call (``tests/tolerance.py``) around the float64 result of the plain
path, started from the same float32 noise, instead of to the plain float32 result bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import GOLDEN_MODEL, golden_case
from tolerance import check_float32, float32_noise, pipeline_terms

import qi_core as qi

CASE, WANT, _ = golden_case("t2i")
T2I = {**CASE["call"], "output_type": "np", "progress_bar_cmd": lambda x: x}
NON_SQUARE = {"prompt": "a lighthouse on a cliff", "negative_prompt": "fog", "cfg_scale": 3.0, "height": 48,
              "width": 112, "seed": 5, "num_inference_steps": 3, "output_type": "np",
              "progress_bar_cmd": lambda x: x}  # fmt: skip
POLICIES = ["none", "offload", "stream", "disk", "low-vram", "lowest-vram", {"dit": "disk", "vae": "offload"}]


CALLS = {"t2i": T2I, "non_square": NON_SQUARE}


@pytest.fixture(scope="module")
def baseline():
    """The plainest path (two separate passes, modulation inline, all resident) in float64, from float32
    noise."""
    pipe = float32_noise(
        qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False, torch_dtype=torch.float64)
    )
    pipe.batch_cfg = False
    pipe.memory["dit"].wants_step_cache = False
    return {name: pipe(**call) for name, call in CALLS.items()}


@pytest.fixture(scope="module")
def resident():
    """``none`` with the default loop settings (batched CFG, step cache), float32."""
    pipe = qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False)
    return {name: pipe(**call) for name, call in CALLS.items()}


def check(out, baseline, name: str, what: str = "") -> None:
    """``out`` (float32) within the float32 error bound of a whole call of the float64 result."""
    steps = CALLS[name]["num_inference_steps"]
    check_float32(out, baseline[name], terms=pipeline_terms(steps), what=f"{what} {name}")


@pytest.mark.parametrize("memory", POLICIES, ids=str)
def test_policy_output_equals_none(baseline, resident, memory):
    pipe = qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False, memory=memory)
    for name, call in CALLS.items():
        out = pipe(**call)
        assert np.array_equal(out, resident[name]), (memory, name, abs(out - resident[name]).max())
        check(out, baseline, name, str(memory))
    # and twice in a row (read-ahead state must not leak between calls)
    assert np.array_equal(pipe(**T2I), resident["t2i"])


def test_batched_cfg_equals_separate_passes(baseline):
    pipe = qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False)
    assert pipe.batch_cfg
    calls = []
    block = pipe.components["dit"].transformer_blocks[0]
    hook = block.register_forward_pre_hook(
        lambda m, a: calls.append(len(a[0]) if isinstance(a[0], list) else type(a[0]).__name__)
    )
    try:
        out = pipe(**NON_SQUARE)
    finally:
        hook.remove()
    # the modulation of all steps once per call, then each block once per step for both CFG sides
    assert calls == ["ModulationRequest", 2, 2, 2]
    check(out, baseline, "non_square", "batched")
    # golden values still hold on the batched path
    assert abs(torch.from_numpy(pipe(**T2I)) - WANT["image_float"][0].permute(1, 2, 0)).max() <= 1e-4


def test_fp8_storage_keeps_layers_in_8_bits_with_row_scales():
    from qi_plugins.memory.policies import LayerStream

    ref = qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False)
    pipe = qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False, memory="fp8")
    policy = pipe.memory["dit"]
    assert isinstance(policy, LayerStream)
    block = pipe.components["dit"].transformer_blocks[0]
    assert block.attn.to_q.weight.dtype == torch.float8_e4m3fn  # stored in fp8 …
    # … dequantised per row to within float8_e4m3's half-ulp (2^-4 relative to the row maximum)
    w = ref.components["dit"].transformer_blocks[0].attn.to_q.weight
    deq = block.attn.to_q.weight.float() * policy.streamer.scales[(0, "attn.to_q.weight")]
    assert ((deq - w).abs() / w.abs().amax(dim=1, keepdim=True)).max() <= 2**-4
    out = pipe(**NON_SQUARE)  # computed in float32
    assert block.attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert torch.isfinite(torch.from_numpy(out)).all() and abs(out - ref(**NON_SQUARE)).max() > 0


def test_disk_policy_keeps_layers_on_disk():
    pipe = qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False, memory="disk")
    dit = pipe.components["dit"]
    assert all(p.is_meta for p in dit.transformer_blocks.parameters())
    assert not dit.img_in.weight.is_meta
    pipe(**NON_SQUARE)
    assert all(p.is_meta for p in dit.transformer_blocks.parameters())


def test_bad_memory_settings():
    from qi_core.errors import InvalidInputError, UnknownNameError

    with pytest.raises(UnknownNameError, match="unknown memory policy 'lowvram'.*Did you mean 'low-vram'"):
        qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False, memory="lowvram")
    with pytest.raises(InvalidInputError, match="memory names component 'unet'"):
        qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False, memory={"unet": "disk"})
    from qi_plugins.memory.policies import parse_size

    assert parse_size("8GiB") == 8 * 1024**3 and parse_size(0.5) == 512 * 1024**2 and parse_size(None) is None
    with pytest.raises(InvalidInputError, match="vram_limit"):
        parse_size([8])


def test_fp8_quantised_while_loading_equals_quantised_after(tiny_model):
    """Loaded through the policy, the weights are quantised tensor by tensor into one 8-bit buffer; the result
    is exactly that of quantising the fully loaded model."""
    from qi_core.loading import loading_policy
    from qi_plugins.memory.policies import FP8Storage
    from qi_plugins.qwen_image.loading import load_dit

    folder = tiny_model / "transformer"
    after = FP8Storage("dit")
    full = after.attach(load_dit(folder), device="cpu", dtype=torch.float32)
    during = FP8Storage("dit")
    with loading_policy(during, device="cpu", dtype=torch.float32):
        loaded = load_dit(folder)
    loaded = during.attach(loaded, device="cpu", dtype=torch.float32)
    a, b = full.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].float(), b[k].float()), k
    assert after.streamer.scales.keys() == during.streamer.scales.keys()
    for k, s in after.streamer.scales.items():
        assert torch.equal(s, during.streamer.scales[k]), k
    eight = [p for p in loaded.transformer_blocks.parameters() if p.dtype == torch.float8_e4m3fn]
    assert len({p.untyped_storage().data_ptr() for p in eight}) == 1, "one buffer for all 8-bit weights"
