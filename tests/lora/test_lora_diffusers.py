"""On the tiny golden DiT, our LoRA equals diffusers' for every layout (diffusers as test-only reference).

diffusers reads each layout with ``QwenImagePipeline.lora_state_dict`` (its converter: prefixes, kohya names,
``.default``, alpha baking) and the update is fused into ``QwenImageTransformer2DModel`` as PEFT's
``fuse_lora`` does (``W += B @ A``, lora_alpha = r after the converter). Where ``peft`` is installed, the
full ``load_lora_weights`` + ``fuse_lora`` path is checked too.

Tolerances (``tests/tolerance.py``): every comparison runs in float64 as well. The maths must agree there (to
1e-12 relative, or, between qi and diffusers, to the float32 rounding of the RoPE / timestep-feature steps
both keep in float32 on purpose), and each float32 result must lie within the float32 error bound of its
float64 result, so no tolerance depends on how one CPU's kernels round.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import GOLDEN_MODEL
from lora_cases import LAYOUTS, dit_pipe, layout, random_lora
from tolerance import TINY_DIT_TERMS, check_float32_gap, check_same_maths, check_vs_reference

from qi_core.protocols import DenoiseInput, TextSegment
from qi_plugins.lora import LoRA
from qi_plugins.qwen_image.loading import load_dit

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def models():
    ref = diffusers.QwenImageTransformer2DModel.from_pretrained(GOLDEN_MODEL / "transformer").eval()
    ours = load_dit(GOLDEN_MODEL / "transformer").eval()
    return ours, ref


@pytest.fixture(scope="module")
def models64(models):
    """The same two models in float64 (the ground truth of the float32 comparisons)."""
    return tuple(copy.deepcopy(m).double() for m in models)


@pytest.fixture(scope="module")
def lora(models):
    return random_lora(models[0], rank=4, seed=7)


def pack(x):
    B, C, h, w = x.shape
    return x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(11)
    x, txt = torch.randn(1, 16, 8, 10, generator=g), torch.randn(1, 7, 64, generator=g)
    return x.to(dtype), txt.to(dtype), torch.tensor([640.0], dtype=dtype)


def ours_out(dit):
    x, txt, t = inputs(next(dit.parameters()).dtype)
    with torch.no_grad():
        return pack(dit(DenoiseInput(latents=x, timestep=t, text=[TextSegment(txt)])))


def ref_out(ref):
    dtype = next(ref.parameters()).dtype
    x, txt, t = inputs(dtype)
    mask = torch.ones(1, 7, dtype=dtype)
    with torch.no_grad():
        return ref(hidden_states=pack(x), encoder_hidden_states=txt, encoder_hidden_states_mask=mask,
                   timestep=t / 1000, img_shapes=[[(1, 4, 5)]], return_dict=False)[0]  # fmt: skip


def diffusers_fused(ref, sd, scale: float):
    """A copy of the diffusers transformer with ``sd`` read by diffusers and fused on it directly."""
    converted = diffusers.QwenImagePipeline.lora_state_dict({k: v.clone() for k, v in sd.items()})
    model = copy.deepcopy(ref)
    fused = 0
    with torch.no_grad():
        for key, a in converted.items():
            if key.endswith(".lora_A.weight"):
                name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                b = converted[key.replace(".lora_A.", ".lora_B.")]
                model.get_submodule(name).weight += scale * (b @ a)
                fused += 1
    return model, fused


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_fused_output_matches_diffusers(models, models64, lora, fmt):
    ours, ref = models
    ours64, ref64 = models64
    sd = layout(lora, fmt)
    theirs, fused = diffusers_fused(ref, sd, scale=0.8)
    theirs64, _ = diffusers_fused(ref64, {k: v.double() for k, v in sd.items()}, scale=0.8)
    assert fused == len(lora)
    pipe, pipe64 = dit_pipe(ours), dit_pipe(ours64)
    adapter, adapter64 = LoRA(sd, scale=0.8), LoRA(sd, scale=0.8)
    base = ours_out(ours)
    adapter.apply(pipe)
    adapter64.apply(pipe64)
    try:
        want, got = ref_out(theirs), ours_out(ours)
        assert (got - base).abs().max() > 1e-2  # the LoRA matters
        check_vs_reference(got, want, ours_out(ours64), ref_out(theirs64), terms=TINY_DIT_TERMS, what=fmt)
        for name in lora:  # the fused weights themselves: W + s·B·A, r + 1 = 5 rounded terms per element
            check_same_maths(*(m.get_submodule(name).weight for m in (ours, theirs, ours64, theirs64)),
                             terms=5, what=f"{fmt}: {name}")  # fmt: skip
    finally:
        adapter.remove(pipe)
        adapter64.remove(pipe64)
    assert torch.equal(ours_out(ours), base)


@pytest.mark.parametrize("fmt", ["diffsynth", "kohya"])
def test_unfused_branches_match_fused(models, models64, lora, fmt):
    """Same maths (W x + s·B(A x) vs (W + s·B A) x), other rounding: equal in float64, and each float32 output
    within the float32 bound of its float64 one (the float32 gap was 4.9e-6 on an EPYC, 1.8e-5 on a Xeon)."""
    out = {}
    for dit in (models[0], models64[0]):
        pipe = dit_pipe(dit)
        base = ours_out(dit)
        fused = LoRA(layout(lora, fmt), scale=1.3)
        fused.apply(pipe)
        want = ours_out(dit)
        fused.remove(pipe)
        branches = LoRA(layout(lora, fmt), scale=1.3, fuse=False)
        branches.apply(pipe)
        try:
            out[dit] = (ours_out(dit), want)
        finally:
            branches.remove(pipe)
        assert torch.equal(ours_out(dit), base)
    check_same_maths(*out[models[0]], *out[models64[0]], terms=TINY_DIT_TERMS, what=fmt)


def test_matches_diffusers_load_lora_weights_and_fuse_lora(models, lora):
    """The real diffusers path (needs peft, which diffusers uses for LoRA). Its float64 run (peft in float64)
    agrees with ours to 7.9e-8 and each float32 output is within 1e-6 of its float64 one, as in
    ``test_fused_output_matches_diffusers``; it doubles peft's slow loading, so the float32 outputs are held to
    twice the float32 bound of the DiT instead."""
    pytest.importorskip("peft")
    ours, ref = models
    pipe = diffusers.QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                       transformer=copy.deepcopy(ref))  # fmt: skip
    for fmt in LAYOUTS:
        pipe.load_lora_weights(layout(lora, fmt), adapter_name=fmt.replace("-", "_"))
        pipe.fuse_lora(lora_scale=0.8, adapter_names=[fmt.replace("-", "_")])
        want = ref_out(pipe.transformer)
        pipe.unfuse_lora()
        pipe.delete_adapters(fmt.replace("-", "_"))
        adapter = LoRA(layout(lora, fmt), scale=0.8)
        adapter.apply(dit_pipe(ours))
        try:
            got = ours_out(ours)
        finally:
            adapter.remove(dit_pipe(ours))
        check_float32_gap(got, want, terms=TINY_DIT_TERMS, what=fmt)
