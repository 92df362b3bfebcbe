"""Our DiT against the official implementation (diffusers QwenImageTransformer2DModel), same weights.

Each comparison runs in float32 and in float64 (``tests/tolerance.py``): the float64 outputs agree to the
float32 rounding of the few steps both implementations keep in float32, and each float32 output lies within
the float32 error bound of its float64 one; no tolerance rests on how one CPU rounds.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import GOLDEN_MODEL
from tolerance import TINY_DIT_TERMS, check_vs_reference

from qi_core.protocols import DenoiseInput, ImageSegment, TextSegment
from qi_plugins.qwen_image.loading import load_dit

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def models():
    ref = diffusers.QwenImageTransformer2DModel.from_pretrained(GOLDEN_MODEL / "transformer").eval()
    ours = load_dit(GOLDEN_MODEL / "transformer").eval()
    return {
        torch.float32: (ours, ref),
        torch.float64: (copy.deepcopy(ours).double(), copy.deepcopy(ref).double()),
    }


def pack(x):
    B, C, h, w = x.shape
    return x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def test_dit_matches_official_with_padding_mask(models):
    out = []
    for dtype, (ours, ref) in models.items():
        g = torch.Generator().manual_seed(1)
        B, h, w, L = 2, 10, 14, 9  # non-square 20x28 tokens... latent 10x14 -> 5x7 tokens
        x = torch.randn(B, 16, h, w, generator=g).to(dtype)
        txt = torch.randn(B, L, 64, generator=g).to(dtype)
        mask = torch.ones(B, L, dtype=torch.long)
        mask[1, 6:] = 0  # second prompt is shorter: padding present
        t = torch.tensor([700.0, 700.0], dtype=dtype)
        with torch.no_grad():
            got = ours(DenoiseInput(latents=x, timestep=t, text=[TextSegment(txt, mask)]))
            want = ref(
                hidden_states=pack(x),
                encoder_hidden_states=txt,
                encoder_hidden_states_mask=mask,
                timestep=t / 1000,
                img_shapes=[[(1, h // 2, w // 2)]] * B,
                return_dict=False,
            )[0]
        out += [pack(got), want]
    check_vs_reference(*out, terms=TINY_DIT_TERMS)


def test_dit_appended_images_and_zero_cond_t(models):
    """Two reference images with their own RoPE frames; modulation index 1 = timestep 0 (Edit-2511)."""
    out = []
    for dtype, (ours, ref) in models.items():
        ref.zero_cond_t = True
        for blk in ref.transformer_blocks:
            blk.zero_cond_t = True
        try:
            g = torch.Generator().manual_seed(2)
            x = torch.randn(1, 16, 8, 12, generator=g).to(dtype)
            e1, e2 = torch.randn(1, 16, 6, 6, generator=g), torch.randn(1, 16, 10, 4, generator=g)
            e1, e2 = e1.to(dtype), e2.to(dtype)
            txt = torch.randn(1, 7, 64, generator=g).to(dtype)
            t = torch.tensor([420.0], dtype=dtype)
            with torch.no_grad():
                got = ours(
                    DenoiseInput(
                        latents=x,
                        timestep=t,
                        text=[TextSegment(txt)],
                        images=[ImageSegment(e1, modulation=1), ImageSegment(e2, modulation=1)],
                        extra_timesteps=[0.0],
                    )
                )
                want = ref(
                    hidden_states=torch.cat([pack(x), pack(e1), pack(e2)], dim=1),
                    encoder_hidden_states=txt,
                    timestep=t / 1000,
                    img_shapes=[[(1, 4, 6), (1, 3, 3), (1, 5, 2)]],
                    return_dict=False,
                )[0][:, :24]
            out += [pack(got), want]
        finally:
            ref.zero_cond_t = False
            for blk in ref.transformer_blocks:
                blk.zero_cond_t = False
    check_vs_reference(*out, terms=TINY_DIT_TERMS)


def test_full_size_dit_on_meta_has_official_keys_and_20_43b_params():
    from qi_plugins.qwen_image.dit import DiTConfig, QwenImageDiT

    with torch.device("meta"):
        ours = QwenImageDiT(DiTConfig())
        ref = diffusers.QwenImageTransformer2DModel()
    n = sum(p.numel() for p in ours.parameters())
    assert round(n / 1e9, 2) == 20.43, n
    assert n == sum(p.numel() for p in ref.parameters())
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert len(ours.state_dict()) == 1933


def test_rope_eager_and_compiled_forms_rotate_pairs_alike():
    """RoPE runs as a complex multiply in eager code and in real arithmetic under ``torch.compile`` (inductor
    has no complex codegen): both round each of the two products and their sum once, as float64 bounds."""
    from qi_plugins.qwen_image.dit import rope

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 3, 16, generator=g)
    angles = torch.rand(37, 8, generator=g, dtype=torch.float64) * 100
    rot = torch.stack([angles.cos(), angles.sin()], dim=-1).float()
    eager = rope(x, rot)
    compiled = torch.compile(rope, backend="aot_eager", dynamic=True)(x, rot)
    xr, xi = x.double().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = rot.double()[:, None].unbind(-1)
    exact = torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1).flatten(-2)
    scale = torch.stack(
        [(xr * cos).abs() + (xi * sin).abs(), (xr * sin).abs() + (xi * cos).abs()], -1
    ).flatten(-2)
    bound = 2 * torch.finfo(torch.float32).eps * scale + torch.finfo(torch.float32).tiny
    for got in (eager, compiled):
        assert got.dtype == torch.float32 and ((got.double() - exact).abs() <= bound).all()
    assert torch.equal(eager, compiled)  # the same roundings in the same order
