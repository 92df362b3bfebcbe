"""The layered DiT against the official implementation: diffusers ``QwenImageTransformer2DModel`` with
``use_layer3d_rope=True, use_additional_t_cond=True`` and the same weights (golden tiny layered transformer).

The RGBA VAE (``input_channels: 4``) is checked against ``AutoencoderKLQwenImage(input_channels=4)`` in
``tests/qwen_image/test_vae.py::test_parity_with_diffusers[rgba]``.

Each comparison runs in float32 and in float64 (``tests/tolerance.py``): the float64 outputs agree to the
float32 rounding of the few steps both implementations keep in float32, and each float32 output lies within
the float32 error bound of its float64 one.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import GOLDEN
from tolerance import TINY_DIT_TERMS, check_vs_reference

from qi_core.protocols import DenoiseInput, ImageSegment, TextSegment
from qi_plugins.layered.dit import LayeredDiT, load_layered_dit

diffusers = pytest.importorskip("diffusers")
FOLDER = GOLDEN / "models" / "qwen_image_layered" / "transformer"


@pytest.fixture(scope="module")
def models():
    ref = diffusers.QwenImageTransformer2DModel.from_pretrained(FOLDER).eval()
    assert ref.config.use_layer3d_rope and ref.config.use_additional_t_cond
    ours = load_layered_dit(FOLDER)
    return {
        torch.float32: (ours, ref),
        torch.float64: (copy.deepcopy(ours).double(), copy.deepcopy(ref).double()),
    }


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) → (B, (h/2)(w/2), 4C), diffusers' latent packing."""
    B, C, h, w = x.shape
    return x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def run_both(models, frames, hw, cond_hw, context=False, t_cond=0, context_last=False, dtype=torch.float32):
    ours, ref = models[dtype]
    g = torch.Generator().manual_seed(frames * 100 + hw[0])
    h, w = hw
    x = torch.randn(frames, 16, h, w, generator=g).to(dtype)
    cond = torch.randn(1, 16, *cond_hw, generator=g).to(dtype)
    ctx = torch.randn(1, 16, h, w, generator=g).to(dtype)
    txt = torch.randn(1, 7, 64, generator=g).to(dtype)
    t = torch.tensor([640.0], dtype=dtype)
    segs = [ImageSegment(ctx)] if context else []
    segs = [*segs, ImageSegment(cond, frame=-1)]
    if context_last:  # another injector appended the context after the layer input
        segs = segs[::-1]
    with torch.no_grad():
        got = ours(DenoiseInput(latents=x, timestep=t, text=[TextSegment(txt)], images=segs,
                                target_frames=frames, extras={"layered": {"addition_t_cond": t_cond}}))  # fmt: skip
        seq = [pack(x[i : i + 1]) for i in range(frames)] + ([pack(ctx)] if context else []) + [pack(cond)]
        shapes = [(1, h // 2, w // 2)] * (frames + int(context)) + [(1, cond_hw[0] // 2, cond_hw[1] // 2)]
        want = ref(hidden_states=torch.cat(seq, 1), encoder_hidden_states=txt, timestep=t / 1000,
                   img_shapes=[shapes], additional_t_cond=torch.tensor([t_cond]), return_dict=False)[0]  # fmt: skip
    n = (h // 2) * (w // 2)
    got = torch.cat([pack(got[i : i + 1]) for i in range(frames)], dim=1)
    return got, want[:, : frames * n]


def check_both(models, *args, **kwargs):
    """qi vs diffusers in float32 and in float64; returns the float32 pair."""
    got, want = run_both(models, *args, **kwargs)
    check_vs_reference(
        got, want, *run_both(models, *args, **kwargs, dtype=torch.float64), terms=TINY_DIT_TERMS
    )
    return got, want


@pytest.mark.parametrize(
    "frames, hw, cond_hw, context",
    [
        (3, (8, 12), (6, 10), False),  # layered: composite + 2 layers, smaller layer input
        (1, (8, 10), (8, 10), True),  # layered-control with a brush-mask context image
        (6, (4, 4), (4, 4), False),  # text offset = parts - 1 = 6 > largest half side 1
    ],
)
def test_layered_dit_matches_official(models, frames, hw, cond_hw, context):
    got, want = check_both(models, frames, hw, cond_hw, context)
    assert got.shape == want.shape


def test_layer_input_goes_last_whatever_the_segment_order(models):
    check_both(models, 1, (8, 10), (8, 10), context=True, context_last=True)


def test_addition_t_cond_selects_the_embedding_row(models):
    got1, _ = check_both(models, 2, (4, 6), (4, 6), t_cond=1)
    got0, _ = run_both(models, 2, (4, 6), (4, 6), t_cond=0)
    assert (got1 - got0).abs().max().item() > 1e-3  # the condition is not a no-op


def test_text_offset_is_what_makes_layered_rope_differ(models):
    """Without the layer-3D text offset the many-frame case would differ: the test above is discriminative."""
    ours, _ = models[torch.float32]
    base = super(LayeredDiT, ours).rope_tables
    g = torch.Generator().manual_seed(3)
    x, cond = torch.randn(6, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)
    inp = DenoiseInput(latents=x, timestep=torch.tensor([500.0]), text=[TextSegment(torch.randn(1, 5, 64))],
                       images=[ImageSegment(cond, frame=-1)], target_frames=6)  # fmt: skip
    grids, segs = [(6, 2, 2), (1, 2, 2)], [None, inp.images[0]]
    _, txt_layered = ours.rope_tables(inp, grids, segs)
    _, txt_base = base(inp, grids, segs)
    assert not torch.allclose(txt_layered[0], txt_base[0])


def test_full_size_layered_dit_has_the_official_keys():
    from qi_plugins.layered.dit import LAYERED_CONFIG

    with torch.device("meta"):
        ours = LayeredDiT(LAYERED_CONFIG)
        ref = diffusers.QwenImageTransformer2DModel(use_layer3d_rope=True, use_additional_t_cond=True)
    assert set(ours.state_dict()) == set(ref.state_dict())
    assert ours.state_dict()["time_text_embed.addition_t_embedding.weight"].shape == (2, 3072)


def test_a_base_checkpoint_is_refused_with_the_missing_key(tmp_path):
    from safetensors.torch import load_file, save_file

    from qi_core.errors import WeightMismatchError

    sd = load_file(str(FOLDER / "diffusion_pytorch_model.safetensors"))
    del sd["time_text_embed.addition_t_embedding.weight"]
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text((FOLDER / "config.json").read_text())
    with pytest.raises(WeightMismatchError, match="addition_t_embedding"):
        load_layered_dit(tmp_path)


def test_batched_sides_reorder_the_layer_input_too(models):
    """The batched (CFG) forward puts the layer input last as the single forward does: each side's result is
    its own forward's, bit for bit, whatever order the injectors appended the segments in."""
    ours, _ = models[torch.float32]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 8, 8, generator=g)
    cond, ctx = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    inputs = [
        DenoiseInput(
            latents=x,
            timestep=torch.tensor([500.0]),
            text=[TextSegment(torch.randn(1, n, 64, generator=g))],
            images=[ImageSegment(cond, frame=-1), ImageSegment(ctx)],
            target_frames=2,
        )  # fmt: skip
        for n in (5, 9)
    ]
    with torch.no_grad():
        batched = ours.forward_many(inputs)
        single = [ours(inp) for inp in inputs]
    assert all(torch.equal(a, b) for a, b in zip(batched, single, strict=True))
