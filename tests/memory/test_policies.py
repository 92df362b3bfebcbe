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
    pipe.memory["dit"].precompute = False
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
    modulation = block.modulation
    block.modulation = lambda temb: calls.append("modulation") or modulation(temb)
    hook = block.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        out = pipe(**NON_SQUARE)
    finally:
        hook.remove()
        del block.modulation
    # the modulation of the 3 steps before the first (once for both CFG sides), then the block for each side
    assert calls == ["modulation"] * 3 + [1, 1] * 3
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
    deq = block.attn.to_q.weight.float() * policy.streamers[0].scales[(0, "attn.to_q.weight")]
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
    from qi_core.loading import Loaded, PolicyLoader
    from qi_plugins.memory.policies import FP8Storage
    from qi_plugins.memory.storage import QuantisedRead
    from qi_plugins.qwen_image.loading import load_dit

    folder = tiny_model / "transformer"
    after = FP8Storage("dit")
    full = after.attach(Loaded(load_dit(folder)), device="cpu", dtype=torch.float32)
    during = FP8Storage("dit")
    load = PolicyLoader(during, device="cpu")
    loaded = load_dit(folder, load=load)
    [read] = load.reads  # what the policy read, handed back explicitly
    assert isinstance(read, QuantisedRead) and read.module is loaded
    loaded = during.attach(Loaded(loaded, tuple(load.reads)), device="cpu", dtype=torch.float32)
    a, b = full.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].float(), b[k].float()), k
    scales_after, scales_during = after.streamers[0].scales, during.streamers[0].scales
    assert scales_after.keys() == scales_during.keys()
    for k, s in scales_after.items():
        assert torch.equal(s, scales_during[k]), k
    eight = [p for p in loaded.transformer_blocks.parameters() if p.dtype == torch.float8_e4m3fn]
    assert len({p.untyped_storage().data_ptr() for p in eight}) == 1, "one buffer for all 8-bit weights"


def test_streamed_layer_moves_once_per_step_and_its_modulation_once_per_call():
    """Under ``stream`` (no resident layers) both CFG sides run a layer while it is in: each layer is brought
    in once per step, plus its modulation weights alone once per call before the first step; nothing stays
    in after the call, and the modulation weights are never moved while denoising."""
    pipe = qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False, memory="stream")
    [streamer] = pipe.memory["dit"].streamers
    moved = []
    bring_in = streamer.bring_in
    streamer.bring_in = lambda i, only=None: moved.append((i, only)) or bring_in(i, only)
    try:
        pipe(**NON_SQUARE)
    finally:
        del streamer.bring_in
    n, steps = len(streamer.layers), NON_SQUARE["num_inference_steps"]
    assert moved == [(i, ("img_mod", "txt_mod")) for i in range(n)] + [(i, None) for i in range(n)] * steps
    assert not streamer.kept and not streamer.pending and streamer.skip == ()


def test_policies_keep_nothing_on_the_modules():
    """What a policy read or keeps lives in the policy: no ``_qi_*`` attribute on any module."""
    for memory in ("disk", "fp8", "stream"):
        pipe = qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False, memory=memory)
        pipe(**NON_SQUARE)
        stashed = [
            (n, k) for n, m in pipe.components["dit"].named_modules() for k in vars(m) if k.startswith("_qi")
        ]
        assert not stashed, (memory, stashed[:3])


def test_factory_without_load_still_works(tiny_model):
    """A factory that takes no ``load`` is called without it and reads its weights in full; ``disk`` then
    streams the layers from host memory. One that takes it lets the policy read them."""
    from qi_core.loading import load_component, takes_load
    from qi_plugins.memory.policies import Disk
    from qi_plugins.memory.storage import LazyRead
    from qi_plugins.qwen_image.loading import load_dit
    from qi_plugins.qwen_image.parts import dit

    def old(root, folder, device, dtype):
        return load_dit(folder, device=device, dtype=dtype)

    assert takes_load(dit) and not takes_load(old) and not takes_load(lambda **kw: None)
    folder = tiny_model / "transformer"
    for factory, lazy in ((old, False), (dit, True)):
        policy = Disk("dit")
        loaded = load_component(
            factory, policy, root=tiny_model, folder=folder, device="cpu", dtype=torch.float32
        )
        assert [type(r) for r in loaded.reads] == ([LazyRead] if lazy else [])
        model = policy.attach(loaded, device="cpu", dtype=torch.float32)
        assert model is loaded.component and len(policy.streamers) == 1
        assert all(p.is_meta for p in model.transformer_blocks.parameters()) == lazy
