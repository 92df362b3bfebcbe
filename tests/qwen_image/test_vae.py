"""Qwen-Image VAE: parity with diffusers, the golden tiled case, strict loading, full-size structure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tolerance import TINY_VAE_TERMS, check_same_maths

from qi_core.errors import InvalidInputError, ModelLoadError, WeightMismatchError
from qi_plugins.qwen_image.vae import QwenImageVAE, VAEConfig, load_vae

GOLDEN = Path(__file__).parents[1] / "fixtures/golden"
VAE_DIRS = {
    "rgb": GOLDEN / "models/qwen_image/vae",
    "rgba": GOLDEN / "models/qwen_image_layered/vae",
}


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def _diffusers_vae(folder: Path, dtype: torch.dtype):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.AutoencoderKLQwenImage.from_pretrained(folder).to(dtype).eval()


def _reference_codec(ref, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers encode (posterior mode, normalised) of x and decode (clamped) of normalised z, in x's dtype."""
    mean = torch.tensor(ref.config.latents_mean).view(1, -1, 1, 1, 1).to(x.dtype)
    inv_std = (1 / torch.tensor(ref.config.latents_std)).view(1, -1, 1, 1, 1).to(x.dtype)
    enc = (ref.encode(x.unsqueeze(2)).latent_dist.mode() - mean) * inv_std
    dec = ref.decode(z.unsqueeze(2) / inv_std + mean).sample
    return enc[:, :, 0], dec[:, :, 0]


@pytest.mark.parametrize("kind", ["rgb", "rgba"])
@torch.no_grad()
def test_parity_with_diffusers(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = VAE_DIRS[kind]
    # diffusers' upsampler round-trips through float32 (meant for half precision); in float64 that rounding would
    # be the only difference, so let it upsample in the input dtype (nearest upsampling is exact either way).
    from diffusers.models.autoencoders import autoencoder_kl_qwenimage as dq

    monkeypatch.setattr(dq.QwenImageUpsample, "forward", torch.nn.Upsample.forward)
    ours = load_vae(folder)
    channels = 3 if kind == "rgb" else 4
    assert (ours.image_channels, ours.latent_channels, ours.scale_factor) == (channels, 16, 8)
    torch.manual_seed(0)
    x = torch.rand(1, channels, 48, 80) * 2 - 1  # non-square on purpose

    # float64: same architecture ⇒ agreement far below float32 rounding (a structural check free of noise).
    ref64, ours64 = _diffusers_vae(folder, torch.float64), load_vae(folder, dtype=torch.float64)
    z64 = ours64.encode(x.double())
    enc_ref64, dec_ref64 = _reference_codec(ref64, x.double(), z64)
    assert z64.shape == (1, 16, 6, 10)
    assert (z64 - enc_ref64).abs().max().item() < 1e-11
    assert (ours64.decode(z64).clamp(-1, 1) - dec_ref64).abs().max().item() < 1e-11

    # float32: our 2-D convolutions sum in another order than diffusers' causal 3-D ones, so the two differ by
    # float32 rounding noise. Both must lie within the same float32 error bound of the float64 result, i.e. be
    # as accurate as the official float32 implementation, whatever order this CPU's kernels sum in
    # (tests/tolerance.py): one VAE direction for the encoding; encoder then decoder for the decoding, whose
    # values on the way are of the size of its input latents (|z| ≈ 6–7, activations up to ~8), not of its
    # clamped output (≤ 1), so the bound scales with max|z|.
    ref = _diffusers_vae(folder, torch.float32)
    z = ours.encode(x)
    enc_ref, dec_ref = _reference_codec(ref, x, z)
    dec = ours.decode(z)
    check_same_maths(z, enc_ref, z64, enc_ref64, terms=TINY_VAE_TERMS, f64_atol=1e-11, what="encode")
    dec64 = ours64.decode(z64).clamp(-1, 1)
    check_same_maths(dec.clamp(-1, 1), dec_ref, dec64, dec_ref64, terms=2 * TINY_VAE_TERMS, f64_atol=1e-11,
                     scale=z64.abs().max().item(), what="decode")  # fmt: skip

    # time_conv only exists for checkpoint compatibility: diffusers ignores it for a single frame too.
    for name, param in ref.named_parameters():
        if "time_conv" in name:
            param.add_(torch.randn_like(param))
    enc_ref2, dec_ref2 = _reference_codec(ref, x, z)
    assert torch.equal(enc_ref2, enc_ref) and torch.equal(dec_ref2, dec_ref)


@torch.no_grad()
def test_golden_tiled_case() -> None:
    case = GOLDEN / "cases/tiled"
    call = json.loads((case / "case.json").read_text())["call"]
    tiles = {"tile_size": call["tile_size"], "tile_stride": call["tile_stride"]}
    assert tiles == {"tile_size": 6, "tile_stride": 4}
    tensors = load_file(case / "tensors.safetensors")
    vae = load_vae(VAE_DIRS["rgb"])

    pixels = np.array(Image.open(case / "input_image.png").convert("RGB"))
    x = torch.from_numpy(pixels).to(torch.float32).permute(2, 0, 1)[None] * (2 / 255) - 1
    z = tensors["final_latents"]
    checks = {
        "vae_encode_tiled": (vae.encode(x, tiled=True, **tiles), 1e-4),
        "vae_encode_untiled": (vae.encode(x), 1e-4),
        "vae_decode_untiled": (vae.decode(z), 2e-4),
        "image_float": (vae.decode(z, tiled=True, **tiles), 2e-4),
    }
    for name, (ours, atol) in checks.items():
        assert ours.shape == tensors[name].shape, name
        assert (ours - tensors[name]).abs().max().item() <= atol, name
    # The small tiles make tiling visible, so the tiled path is really exercised.
    assert (checks["image_float"][0] - checks["vae_decode_untiled"][0]).abs().max() > 0.1


@torch.no_grad()
def test_tiling_rules() -> None:
    vae = load_vae(VAE_DIRS["rgb"])
    torch.manual_seed(1)
    z = torch.randn(2, 16, 5, 7)
    # One tile covering everything (no blending) reproduces the untiled result exactly.
    assert torch.equal(vae.decode(z, tiled=True, tile_size=(5, 8), tile_stride=(3, 4)), vae.decode(z))
    # (h, w) tuples, batch > 1, sizes that do not divide evenly.
    out = vae.decode(z, tiled=True, tile_size=(3, 4), tile_stride=(2, 3))
    assert out.shape == (2, 3, 40, 56) and torch.isfinite(out).all()
    with pytest.raises(InvalidInputError):
        vae.decode(z, tiled=True, tile_size=4, tile_stride=5)
    with pytest.raises(InvalidInputError):
        vae.encode(torch.zeros(1, 3, 44, 48))


def test_strict_loading(tmp_path: Path) -> None:
    folder = VAE_DIRS["rgb"]
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    model = QwenImageVAE(VAEConfig.from_dict(json.loads((folder / "config.json").read_text())))
    model.load_state_dict(state, strict=True)

    missing_key = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"
    bad = {k: v for k, v in state.items() if k != missing_key}
    with pytest.raises(RuntimeError, match=missing_key):
        model.load_state_dict(bad, strict=True)
    wrong_key = "encoder.mid_block.attentions.0.norm.gamma"
    bad = dict(state, **{wrong_key: torch.ones(state[wrong_key].numel())})
    with pytest.raises(RuntimeError, match=wrong_key):
        model.load_state_dict(bad, strict=True)

    # The folder loader reads the sharded layout and names offending keys in a WeightMismatchError.
    good = _write_folder(tmp_path / "good", folder, state, sharded=True)
    loaded = load_vae(good)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    without = {k: v for k, v in state.items() if k != missing_key}
    with pytest.raises(WeightMismatchError, match=missing_key):
        load_vae(_write_folder(tmp_path / "missing", folder, without, sharded=True))
    with pytest.raises(WeightMismatchError, match=wrong_key):
        load_vae(_write_folder(tmp_path / "shape", folder, bad, sharded=False))


def _write_folder(dst: Path, src: Path, state: dict[str, torch.Tensor], sharded: bool) -> Path:
    """A vae/ folder with src's config and the given weights, as one file or as two shards plus an index."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    if not sharded:
        save_file(state, dst / "diffusion_pytorch_model.safetensors")
        return dst
    keys = sorted(state)
    shards = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2 :]}
    for shard, names in shards.items():
        save_file({k: state[k] for k in names}, dst / shard)
    weight_map = {k: shard for shard, names in shards.items() for k in names}
    (dst / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map})
    )
    return dst


def test_config_from_dict() -> None:
    d = json.loads((VAE_DIRS["rgba"] / "config.json").read_text())
    cfg = VAEConfig.from_dict({**d, "_some_future_meta": 1})
    assert cfg.input_channels == 4 and cfg.base_dim == 8 and cfg.num_res_blocks == 1
    assert cfg.dim_mult == (1, 2, 4, 4) and cfg.temperal_downsample == (False, True, True)
    assert cfg.attn_scales == () and cfg.latents_mean == VAEConfig().latents_mean
    assert cfg.latents_std == VAEConfig().latents_std
    with pytest.raises(ModelLoadError, match="not_a_field"):
        VAEConfig.from_dict({**d, "not_a_field": 1})


def test_full_size_structure_matches_diffusers() -> None:
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ours = QwenImageVAE(VAEConfig())
        ref = diffusers.AutoencoderKLQwenImage()
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes
    n_ours = sum(p.numel() for p in ours.parameters())
    assert n_ours == sum(p.numel() for p in ref.parameters())
    assert 126.8e6 < n_ours < 127.0e6 and len(ours_shapes) == 194
