"""The ``edit-image`` injector: Qwen-Image-Edit (one image), Edit-2509/2511 (a list), Lowres-Fix RoPE sampling.

Per call: each edit image is (optionally) resized to about 1024² pixels, VAE-encoded and appended to the DiT
sequence as its own image segment (RoPE frame = its position, target = 0); the text encoder sees the images
through the Qwen2.5-VL processor with the edit template (64-token system prefix dropped). A list uses the
"Picture N:" template and hands the VL encoder copies resized to about 384² pixels (DiffSynth-Studio, golden
README §5.5/§5.7). ``zero_cond_t`` (Edit-2511) modulates the edit tokens with the embedding of t = 0;
``edit_rope_interpolation`` (Lowres-Fix) samples their positions from the target's grid. Nothing is cached
across calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image

from qi_core.errors import InvalidInputError
from qi_core.images import image_to_tensor, load_image
from qi_core.params import CallParams, ImageList, param
from qi_core.protocols import ImageSegment, Injector
from qi_plugins.edit.training import check_metadata_form, load_edit_image
from qi_plugins.edit.vision import IMAGE_TOKEN

EDIT_SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n"
)
EDIT_DROP = 64  # tokens of the edit system prefix, removed from the embedding (official value)
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
ANSWER = "{}<|im_end|>\n<|im_start|>assistant\n"
VAE_AREA = 1024 * 1024  # edit_image_auto_resize target area (DiffSynth-Studio)
VL_AREA = 384 * 384  # area of each image of a list as the VL encoder sees it (DiffSynth-Studio, diffusers)


def edit_template(n_images: int | None) -> str:
    """The single-image template (``None``) or the "Picture 1: … Picture n:" template for a list."""
    if n_images is None:
        return EDIT_SYSTEM + VISION + ANSWER
    return EDIT_SYSTEM + "".join(f"Picture {i + 1}: {VISION}" for i in range(n_images)) + ANSWER


def area_size(width: int, height: int, area: int) -> tuple[int, int]:
    """(W, H) with about ``area`` pixels, the aspect kept, sides rounded to multiples of 32 (Python round)."""
    r = width / height
    w = math.sqrt(area * r)
    return round(w / 32) * 32, round(w / r / 32) * 32


@dataclass
class EditData:
    """What one call keeps between the stages."""

    multi: bool  # edit_image was a list: "Picture N:" template, latents traced as edit_latents_<k>
    images: list[Image.Image]  # as given (RGB, or RGBA when they carry transparency)
    vae_images: list[Image.Image] = field(default_factory=list)  # resized for the VAE
    vl_images: list[Image.Image] = field(default_factory=list)  # what the VL processor receives
    latents: list[torch.Tensor] = field(default_factory=list)  # (1, C, h, w) each


class TracedProcessor:
    """Wraps the VL processor so the pipeline tracer sees what the text encoder receives."""

    def __init__(self, processor: Any, pipe: Any, prefix: str):
        self.processor, self.pipe, self.prefix = processor, pipe, prefix

    def __call__(self, **kwargs: Any) -> dict[str, torch.Tensor]:
        enc = self.processor(**kwargs)
        for k, v in enc.items():
            self.pipe.trace(f"{self.prefix}{k}", v)
        return enc


class EditImage(Injector):
    name = "edit-image"

    class Params(CallParams):
        edit_image: ImageList = param(
            None, "image to edit, or a list of images (Edit-2509/2511)", kind="images"
        )
        edit_image_auto_resize: bool = param(True, "resize each edit image to about 1024² pixels")
        edit_rope_interpolation: bool = param(False, "place edit images on the target's position grid "
                                              "(Lowres-Fix)")  # fmt: skip
        zero_cond_t: bool = param(False, "modulate edit-image tokens with the t = 0 embedding (Edit-2511)")
        edit_image_form: Literal["single", "list"] | None = param(
            None, "the form training metadata must give edit_image in (set by the recipe)"
        )

    file_loaders = {"edit_image": load_edit_image}  # qi train: the column's files, marked as metadata

    def validate(self, pipe, state) -> None:
        p = state.params
        for k in ("edit_image_auto_resize", "edit_rope_interpolation", "zero_cond_t"):
            if not isinstance(p[k], bool):
                raise InvalidInputError(f"{k} must be True or False, got {p[k]!r}")
        value = p["edit_image"]
        if value is None:
            return
        multi = isinstance(value, (list, tuple))
        items = list(value) if multi else [value]
        if not items:
            raise InvalidInputError("edit_image is an empty list; pass one image, a list of images, or None")
        check_metadata_form(value, p["edit_image_form"], pipe.name)
        for k in ("prompt", "negative_prompt"):
            if IMAGE_TOKEN in str(p[k]):
                raise InvalidInputError(
                    f"{k} contains {IMAGE_TOKEN}; the edit template places one per edit image, "
                    f"do not write {IMAGE_TOKEN} in the prompt yourself"
                )
        images = []
        for i, v in enumerate(items):
            im = load_image(v, f"edit_image[{i}]" if multi else "edit_image")
            has_alpha = "A" in im.getbands() or im.info.get("transparency") is not None
            images.append(im.convert("RGBA" if has_alpha else "RGB"))
        if not p["edit_image_auto_resize"]:
            m = pipe.size_multiple
            for i, im in enumerate(images):
                if im.width % m or im.height % m:
                    what = f"edit_image[{i}]" if multi else "edit_image"
                    w, h = max(m, im.width // m * m), max(m, im.height // m * m)
                    raise InvalidInputError(
                        f"{what} is {im.width}x{im.height} (WxH); with edit_image_auto_resize=False its sides "
                        f"must be multiples of {m}. Resize it (e.g. to {w}x{h}) or pass edit_image_auto_resize=True"
                    )
        state.data[self.name] = EditData(multi=multi, images=images)

    def prepare(self, pipe, state) -> None:
        d: EditData | None = state.data.get(self.name)
        if d is None:
            return
        if state.params["edit_image_auto_resize"]:
            d.vae_images = [_resize(im, *area_size(*im.size, VAE_AREA)) for im in d.images]
        else:
            d.vae_images = list(d.images)
        # a list: the VL encoder sees ~384² copies of the VAE images; one image: the VAE image itself
        d.vl_images = (
            [_resize(im, *area_size(*im.size, VL_AREA)) for im in d.vae_images] if d.multi else d.vae_images
        )
        with pipe.using("vae") as vae:
            for k, im in enumerate(d.vae_images):
                x = image_to_tensor(im.convert("RGB"), state.dtype).to(state.device)
                d.latents.append(vae.encode(x, **state.vae_kwargs()))
                pipe.trace(f"edit_latents_{k}" if d.multi else "edit_latents", d.latents[-1])

    def prompt_inputs(self, pipe, state, side: str) -> dict[str, Any]:
        d: EditData | None = state.data.get(self.name)
        if d is None:
            return {}
        extra: dict[str, Any] = {
            "images": d.vl_images,
            "template": edit_template(len(d.vl_images) if d.multi else None),
            "drop": EDIT_DROP,
        }
        processor = pipe.components.get("processor")
        if processor is not None:  # else the text encoder's own processor (or its clear error)
            prefix = "prompt_" if side == "positive" else "negative_prompt_"
            extra["processor"] = TracedProcessor(processor, pipe, prefix)
        return extra

    def denoise_input(self, pipe, state, side: str, step: int, inp) -> None:
        d: EditData | None = state.data.get(self.name)
        if d is None:
            return
        p = state.params
        modulation = 0
        if p["zero_cond_t"]:
            inp.extra_timesteps.append(0.0)  # reference tokens see a clean (t = 0) modulation
            modulation = len(inp.extra_timesteps)
        target = tuple(inp.latents.shape[-2:])
        for lat in d.latents:
            sample = p["edit_rope_interpolation"] and tuple(lat.shape[-2:]) != target
            inp.images.append(ImageSegment(latents=lat, modulation=modulation, rope_from_target=sample))


def _resize(image: Image.Image, width: int, height: int) -> Image.Image:
    return image.resize((width, height), Image.Resampling.BICUBIC)
