"""On the tiny golden DiT, our LoRA equals diffusers' for every layout (diffusers as test-only reference).

diffusers reads each layout with ``QwenImagePipeline.lora_state_dict`` (its converter: prefixes, kohya names,
``.default``, alpha baking) and the update is fused into ``QwenImageTransformer2DModel`` as PEFT's
``fuse_lora`` does (``W += B @ A``, lora_alpha = r after the converter). Where ``peft`` is installed, the
full ``load_lora_weights`` + ``fuse_lora`` path is checked too.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import GOLDEN_MODEL
from lora_cases import LAYOUTS, dit_pipe, layout, random_lora

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
def lora(models):
    return random_lora(models[0], rank=4, seed=7)


def pack(x):
    B, C, h, w = x.shape
    return x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def inputs():
    g = torch.Generator().manual_seed(11)
    x, txt = torch.randn(1, 16, 8, 10, generator=g), torch.randn(1, 7, 64, generator=g)
    return x, txt, torch.tensor([640.0])


def ours_out(dit):
    x, txt, t = inputs()
    with torch.no_grad():
        return pack(dit(DenoiseInput(latents=x, timestep=t, text=[TextSegment(txt)])))


def ref_out(ref):
    x, txt, t = inputs()
    with torch.no_grad():
        return ref(hidden_states=pack(x), encoder_hidden_states=txt, encoder_hidden_states_mask=torch.ones(1, 7),
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
def test_fused_output_matches_diffusers(models, lora, fmt):
    ours, ref = models
    sd = layout(lora, fmt)
    theirs, fused = diffusers_fused(ref, sd, scale=0.8)
    assert fused == len(lora)
    pipe = dit_pipe(ours)
    adapter = LoRA(sd, scale=0.8)
    base = ours_out(ours)
    adapter.apply(pipe)
    try:
        want, got = ref_out(theirs), ours_out(ours)
        assert (got - base).abs().max() > 1e-2  # the LoRA matters
        diff = (got - want).abs().max().item()
        assert diff <= 1e-5, f"{fmt}: {diff:.3g}"
        for name in lora:  # the fused weights themselves
            d = (ours.get_submodule(name).weight - theirs.get_submodule(name).weight).abs().max().item()
            assert d <= 1e-6, (name, d)
    finally:
        adapter.remove(pipe)
    assert torch.equal(ours_out(ours), base)


@pytest.mark.parametrize("fmt", ["diffsynth", "kohya"])
def test_unfused_branches_match_fused(models, lora, fmt):
    ours, _ = models
    pipe = dit_pipe(ours)
    base = ours_out(ours)
    fused = LoRA(layout(lora, fmt), scale=1.3)
    fused.apply(pipe)
    want = ours_out(ours)
    fused.remove(pipe)
    branches = LoRA(layout(lora, fmt), scale=1.3, fuse=False)
    branches.apply(pipe)
    try:
        assert (ours_out(ours) - want).abs().max().item() <= 1e-5
    finally:
        branches.remove(pipe)
    assert torch.equal(ours_out(ours), base)


def test_matches_diffusers_load_lora_weights_and_fuse_lora(models, lora):
    """The real diffusers path (needs peft, which diffusers uses for LoRA)."""
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
            diff = (ours_out(ours) - want).abs().max().item()
        finally:
            adapter.remove(dit_pipe(ours))
        assert diff <= 1e-5, f"{fmt}: {diff:.3g}"
