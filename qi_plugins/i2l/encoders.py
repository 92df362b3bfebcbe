"""The i2L image encodings (DiffSynth-Studio's ``QwenImageUnit_Image2LoRAEncode``), through transformers.

Per image:

* ``x`` (1, 1, E): SigLIP2-G384 pooled output (attention-pooling head, 1536) ⊕ DINOv3-7B pooled output (the
  normed CLS token, 4096), each image first centre-cropped and resized to 1024x1024 (bilinear), then
  processed by the encoder's own image processor (SigLIP: 384², mean/std 0.5; DINOv3: 224², ImageNet
  mean/std; both bilinear);
* ``residual`` (1, 1, R·D) for coarse models: the Qwen2.5-VL hidden states of the single-image edit template
  with an empty prompt (system prefix of 64 tokens dropped) for the image cropped to 224x224 (R = 64 + 7 = 71);
  ``residual_highres`` for fine models: the same at 1024x1024 (R = 37·37 + 7 = 1376).

The encoders load from the official layouts: a folder with transformers' ``config.json`` and safetensors
(``vision_model.`` prefixes of full SigLIP checkpoints are dropped), or DiffSynth-Studio's
``General-Image-Encoders`` files without a config (the G384 / 7B sizes are then assumed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from qi_core.errors import ModelLoadError
from qi_core.images import load_image
from qi_core.loading import check_state_dict, read_state_dict, weight_files

# Edit template of Qwen-Image-Edit with one image; the residual drops its 64-token system prefix.
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
EDIT_DROP = 64
CROP = 1024  # every image is first centre-cropped to a square of this side
RESIDUAL_SIDE = {False: 28 * 8, True: 1024}  # coarse (224²) / fine (1024²) residual image side
COARSE_TOKENS = (RESIDUAL_SIDE[False] // 28) ** 2 + 7  # 71 = 8x8 merged vision tokens + 7 template tokens

# DiffSynth's hard-coded encoder sizes (used when a folder has no config.json)
SIGLIP2_G384 = dict(hidden_size=1536, image_size=384, intermediate_size=6144, num_attention_heads=16,
                    num_hidden_layers=40, patch_size=16, layer_norm_eps=1e-6,
                    hidden_act="gelu_pytorch_tanh")  # fmt: skip
DINOV3_7B = dict(hidden_size=4096, intermediate_size=8192, num_attention_heads=32, num_hidden_layers=40,
                 patch_size=16, image_size=224, layer_norm_eps=1e-5, layerscale_value=1.0, mlp_bias=True,
                 num_register_tokens=4, pos_embed_rescale=2.0, proj_bias=True, query_bias=False, key_bias=False,
                 value_bias=False, rope_theta=100.0, use_gated_mlp=True, hidden_act="silu")  # fmt: skip


def crop_and_resize(image: Image.Image, side: int) -> Image.Image:
    """Scale so the image covers ``side`` x ``side`` (bilinear), then centre-crop (DiffSynth's
    ``ImageCropAndResize``)."""
    image = image.convert("RGB")
    w, h = image.size
    scale = max(side / w, side / h)
    image = image.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
    w, h = image.size
    left, top = int(round((w - side) / 2.0)), int(round((h - side) / 2.0))
    return image.crop((left, top, left + side, top + side))


def _config(folder: Path, defaults: dict[str, Any], nested: str) -> dict[str, Any]:
    """The vision config of ``folder/config.json`` (the ``vision_config`` of a full model), else ``defaults``."""
    path = folder / "config.json"
    if not path.exists():
        return dict(defaults)
    d = json.loads(path.read_text())
    return dict(d.get(nested, d))


def _load(build, source: Path, rename, rebuild_buffers, what: str) -> torch.nn.Module:
    """Build on the meta device, assign the checkpoint's tensors (no random init of billions of weights), then
    recompute the buffers that are not in checkpoints (``rebuild_buffers(model)``)."""
    sd = {}
    for k, v in read_state_dict(weight_files(source)).items():
        k = rename(k)
        if k is not None:
            sd[k] = v
    with torch.device("meta"):
        model = build()
    expected = model.state_dict()
    # DINOv3's mask token is only used for masked-image training; some exports leave it out
    check_state_dict(expected, sd, what, allow_missing=lambda k: k.endswith("mask_token"))
    missing = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in expected.items() if k not in sd}
    model.load_state_dict({**sd, **missing}, assign=True, strict=True)
    rebuild_buffers(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelLoadError(
            f"{what}: {left[:3]} were not initialised; this transformers version is not supported"
        )
    return model


def load_siglip2(folder: str | Path, device: Any = "cpu", dtype: torch.dtype = torch.float32):
    """SigLIP2 vision tower with its pooling head (transformers ``SiglipVisionModel``) and its processor."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    folder = Path(folder)
    base = folder if folder.is_dir() else folder.parent
    cfg = _config(base, SIGLIP2_G384, "vision_config")
    config = SiglipVisionConfig(
        **{k: v for k, v in cfg.items() if not k.startswith("_") and k != "model_type"}
    )

    def rename(k: str) -> str | None:
        if k.startswith(("text_model.", "logit_")):
            return None  # the text half of a full SigLIP checkpoint
        return k.removeprefix("vision_model.")

    def rebuild(model) -> None:
        emb = model.embeddings
        emb.register_buffer("position_ids", torch.arange(emb.num_positions)[None], persistent=False)

    model = _load(lambda: SiglipVisionModel(config), folder, rename, rebuild, f"SigLIP2 encoder ({folder})")
    size = config.image_size
    processor = SiglipImageProcessor(size={"height": size, "width": size}, resample=Image.BILINEAR,
                                     image_mean=[0.5] * 3, image_std=[0.5] * 3)  # fmt: skip
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), processor


def load_dinov3(folder: str | Path, device: Any = "cpu", dtype: torch.dtype = torch.float32):
    """DINOv3 ViT (transformers ``DINOv3ViTModel``; pooled = the normed CLS token) and its processor."""
    from transformers import DINOv3ViTConfig, DINOv3ViTImageProcessor, DINOv3ViTModel

    folder = Path(folder)
    base = folder if folder.is_dir() else folder.parent
    cfg = _config(base, DINOV3_7B, "vision_config")
    config = DINOv3ViTConfig(**{k: v for k, v in cfg.items() if not k.startswith("_") and k != "model_type"})

    def rename(k: str) -> str:
        return "model." + k if k.startswith("layer.") else k  # both key layouts DiffSynth has used

    def rebuild(model) -> None:
        model.rope_embeddings = type(model.rope_embeddings)(config)  # its inv_freq is computed, not stored

    model = _load(lambda: DINOv3ViTModel(config), folder, rename, rebuild, f"DINOv3 encoder ({folder})")
    settings = dict(size={"height": config.image_size, "width": config.image_size}, resample=Image.BILINEAR,
                    image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])  # fmt: skip
    try:  # DiffSynth's processor (torchvision-backed)
        processor = DINOv3ViTImageProcessor(**settings)
    except ImportError:  # no torchvision: the same steps with PIL (bilinear resize, rescale, normalise)
        processor = PilProcessor(**settings)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False), processor


class PilProcessor:
    """Resize (PIL) → ×1/255 → (x − mean) / std → (1, 3, H, W) ``pixel_values``; the fallback when the
    transformers image processor needs torchvision."""

    def __init__(self, size: dict[str, int], resample: int, image_mean: list[float], image_std: list[float]):
        self.size, self.resample = (size["width"], size["height"]), resample
        self.mean = torch.tensor(image_mean).view(3, 1, 1)
        self.std = torch.tensor(image_std).view(3, 1, 1)

    def __call__(self, images: Image.Image, return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        x = torch.from_numpy(
            np.asarray(images.convert("RGB").resize(self.size, self.resample), dtype=np.float32)
        )
        x = rearrange(x, "H W C -> C H W") / 255
        return {"pixel_values": ((x - self.mean) / self.std)[None]}


class I2LEncoder:
    """SigLIP2 + DINOv3 (+ the Qwen-VL text encoder for residuals) → the inputs of :class:`Image2LoRA`."""

    def __init__(self, siglip2: tuple[Any, Any], dinov3: tuple[Any, Any], text_encoder: Any = None,
                 processor: Any = None):  # fmt: skip
        self.siglip2, self.siglip2_processor = siglip2
        self.dinov3, self.dinov3_processor = dinov3
        self.text_encoder = text_encoder  # a qi text encoder (encode_prompt with images)
        self.processor = processor  # the Qwen2-VL processor for it; None = the text encoder's own

    @classmethod
    def load(cls, siglip2: str | Path, dinov3: str | Path, text_encoder: Any = None, processor: Any = None, *,
             device: Any = "cpu", dtype: torch.dtype = torch.float32) -> I2LEncoder:  # fmt: skip
        return cls(load_siglip2(siglip2, device, dtype), load_dinov3(dinov3, device, dtype), text_encoder,
                   processor)  # fmt: skip

    @torch.no_grad()
    def embed(self, images: Sequence[Any]) -> torch.Tensor:
        """(n, 1, E): SigLIP2 pooled ⊕ DINOv3 pooled of every image."""
        out = []
        for image in images:
            image = crop_and_resize(load_image(image, "i2l image"), CROP)
            parts = []
            for model, processor in (
                (self.siglip2, self.siglip2_processor),
                (self.dinov3, self.dinov3_processor),
            ):
                p = next(model.parameters())
                pixels = processor(images=image, return_tensors="pt")["pixel_values"].to(p.device, p.dtype)
                parts.append(model(pixel_values=pixels).pooler_output.float())
            out.append(torch.cat(parts, dim=-1))
        return torch.stack(out)

    @torch.no_grad()
    def residual(self, images: Sequence[Any], highres: bool = False) -> torch.Tensor:
        """(n, 1, R·D): the text encoder's hidden states of each image in the edit template, flattened."""
        if self.text_encoder is None:
            raise ModelLoadError(
                "coarse/fine i2L models need the Qwen-Image text encoder (and the Qwen-Image-Edit processor) "
                "for their residual input; load one or use the style model"
            )
        out = []
        for image in images:
            image = crop_and_resize(load_image(image, "i2l image"), RESIDUAL_SIDE[highres])
            extra = {} if self.processor is None else {"processor": self.processor}
            seg = self.text_encoder.encode_prompt(
                "", images=[image], template=EDIT_TEMPLATE, drop=EDIT_DROP, **extra
            )
            out.append(seg.emb.float().reshape(1, -1))
        return torch.stack(out)

    def inputs(self, images: Sequence[Any], models: Sequence[Any]) -> dict[str, torch.Tensor]:
        """``image2lora_x`` and the residuals the i2L ``models`` need (coarse: 224², fine: 1024² images)."""
        out = {"image2lora_x": self.embed(images)}
        lengths = {m.config.residual_length for m in models if m.config.use_residual}
        if any(n <= COARSE_TOKENS for n in lengths):
            out["image2lora_residual"] = self.residual(images, highres=False)
        if any(n > COARSE_TOKENS for n in lengths):
            out["image2lora_residual_highres"] = self.residual(images, highres=True)
        return out
