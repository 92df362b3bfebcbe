"""The i2L encoding path on tiny random encoders: SigLIP2 + DINOv3 through transformers (official layout and
DiffSynth's key variants), the Qwen-VL residual through the golden tiny text encoder, and ``qi i2l`` on images."""

from __future__ import annotations

import pytest
import torch
from conftest import GOLDEN_MODEL
from PIL import Image
from safetensors.torch import load_file, save_file

from qi_plugins.i2l.encoders import I2LEncoder, PilProcessor, crop_and_resize

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    small = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, patch_size=16,
                 image_size=32)  # fmt: skip
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**small)).save_pretrained(root / "siglip2")
    transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**small)).save_pretrained(root / "dinov3")
    return root


def images() -> list[Image.Image]:
    g = torch.Generator().manual_seed(1)
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
            for h, w in ((40, 64), (64, 48))]  # fmt: skip


def test_crop_and_resize_covers_then_centre_crops():
    im = Image.new("RGB", (200, 100))
    im.paste((255, 0, 0), (0, 0, 40, 100))  # a red band on the left, cut away by the centre crop
    out = crop_and_resize(im, 64)
    assert out.size == (64, 64) and out.getpixel((0, 32)) == (0, 0, 0)


def test_embed_is_siglip_pooled_then_dinov3_pooled(encoder_dirs):
    enc = I2LEncoder.load(encoder_dirs / "siglip2", encoder_dirs / "dinov3")
    x = enc.embed(images())
    assert x.shape == (2, 1, 16)
    sig = transformers.SiglipVisionModel.from_pretrained(encoder_dirs / "siglip2").eval()
    dino = transformers.DINOv3ViTModel.from_pretrained(encoder_dirs / "dinov3").eval()
    crop = crop_and_resize(images()[1], 1024)
    with torch.no_grad():
        want_sig = sig(pixel_values=enc.siglip2_processor(images=crop, return_tensors="pt")["pixel_values"])
        want_dino = dino(pixel_values=enc.dinov3_processor(images=crop, return_tensors="pt")["pixel_values"])
    torch.testing.assert_close(x[1, 0, :8], want_sig.pooler_output[0])
    torch.testing.assert_close(x[1, 0, 8:], want_dino.pooler_output[0])  # the normed CLS token


def test_diffsynth_key_layouts_load(encoder_dirs, tmp_path):
    """SigLIP inside a full model (``vision_model.`` + text tower) and DINOv3 as ``model.layer.*``."""
    sig = load_file(str(encoder_dirs / "siglip2" / "model.safetensors"))
    full = {f"vision_model.{k}": v for k, v in sig.items()} | {
        "text_model.x": torch.zeros(1),
        "logit_scale": torch.zeros(1),
    }
    (tmp_path / "s").mkdir()
    save_file(full, str(tmp_path / "s" / "model.safetensors"))
    (tmp_path / "s" / "config.json").write_text((encoder_dirs / "siglip2" / "config.json").read_text())
    dino = load_file(str(encoder_dirs / "dinov3" / "model.safetensors"))
    dino = {
        ("model." + k if k.startswith("layer.") else k): v for k, v in dino.items() if "mask_token" not in k
    }
    (tmp_path / "d").mkdir()
    save_file(dino, str(tmp_path / "d" / "model.safetensors"))
    (tmp_path / "d" / "config.json").write_text((encoder_dirs / "dinov3" / "config.json").read_text())
    a = I2LEncoder.load(tmp_path / "s", tmp_path / "d").embed(images())
    b = I2LEncoder.load(encoder_dirs / "siglip2", encoder_dirs / "dinov3").embed(images())
    torch.testing.assert_close(
        a, b, rtol=0, atol=1e-6
    )  # same weights (float32 kernels may round differently)


def test_pil_processor_matches_the_transformers_pil_processor():
    ref = transformers.SiglipImageProcessor(size={"height": 24, "width": 24}, resample=Image.BILINEAR,
                                            image_mean=[0.5] * 3, image_std=[0.5] * 3)  # fmt: skip
    ours = PilProcessor({"height": 24, "width": 24}, Image.BILINEAR, [0.5] * 3, [0.5] * 3)
    im = images()[0]
    torch.testing.assert_close(ours(im)["pixel_values"], ref(images=im, return_tensors="pt")["pixel_values"])


def test_residual_is_the_edit_template_hidden_states_of_a_224_crop():
    from qi_plugins.i2l.cli import vl_processor
    from qi_plugins.qwen_image.text_encoder import load_text_encoder

    te = load_text_encoder(GOLDEN_MODEL, GOLDEN_MODEL / "text_encoder")
    processor = vl_processor(GOLDEN_MODEL, "cpu", torch.float32)  # the edit plugin's torch-only processor
    enc = I2LEncoder((None, None), (None, None), text_encoder=te, processor=processor)
    res = enc.residual(images())
    assert res.shape == (2, 1, 71 * 64)  # 8x8 merged vision tokens + 7 template tokens, width 64
    assert not torch.allclose(res[0], res[1])


def test_qi_i2l_on_image_files(encoder_dirs, tmp_path):
    """The real path of the command: images → SigLIP2/DINOv3 → a (tiny, style) i2L model → LoRA file."""
    import json

    from qi_core.cli import main
    from qi_plugins.i2l.model import I2LConfig, Image2LoRA, save_lora

    cfg = I2LConfig(num_blocks=1, use_residual=False, compress_dim=2, rank=1, embed_dim=16, dim=8)
    save_lora(Image2LoRA(cfg).state_dict(), tmp_path / "style.safetensors")
    (tmp_path / "style.json").write_text(json.dumps({"init_args": cfg.__dict__}))
    files = []
    for k, im in enumerate(images()):
        im.save(tmp_path / f"{k}.png")
        files.append(str(tmp_path / f"{k}.png"))
    out = tmp_path / "lora.safetensors"
    argv = ["i2l", *files, "--i2l", str(tmp_path / "style.safetensors"), "--siglip2", str(encoder_dirs / "siglip2"),
            "--dinov3", str(encoder_dirs / "dinov3"), "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    lora = load_file(str(out))
    assert lora["transformer_blocks.0.img_mod.1.lora_B.default.weight"].shape == (48, 2)  # 6·8 out, 2 images
