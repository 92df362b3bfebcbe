"""img2img and inpainting as one injector: ``input_image`` + ``denoising_strength``, ``inpaint_mask``."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from qi_core.errors import InvalidInputError
from qi_core.images import gaussian_blur, image_to_tensor, load_image
from qi_core.params import CallParams, ImageInput, param
from qi_core.protocols import Injector


class InputImage(Injector):
    name = "input-image"

    class Params(CallParams):
        input_image: ImageInput = param(None, "image to start from (img2img); its size must be the output size",
                                   kind="image")  # fmt: skip
        inpaint_mask: ImageInput = param(
            None, "white = the part of input_image to redraw (inpainting)", kind="mask"
        )
        inpaint_blur_size: int | None = param(None, "radius of the Gaussian blur softening the mask", ge=0)
        inpaint_blur_sigma: float | None = param(None, "sigma of the Gaussian blur softening the mask", ge=0)

    def validate(self, pipe, state) -> None:
        p = state.params
        if p["inpaint_mask"] is not None and p["input_image"] is None:
            raise InvalidInputError(
                "inpaint_mask needs input_image: the mask says which part of it to redraw"
            )
        if p["input_image"] is None:
            return
        image = load_image(p["input_image"], "input_image")
        if image.size != (p["width"], p["height"]):
            raise InvalidInputError(
                f"input_image is {image.size[0]}x{image.size[1]} (WxH) but the call asks for "
                f"{p['width']}x{p['height']}; resize the image or pass width={image.size[0]}, height={image.size[1]}"
            )
        state.data[self.name] = {"image": image}
        if p["inpaint_mask"] is not None:
            mask = load_image(p["inpaint_mask"], "inpaint_mask")
            if mask.size != image.size:
                raise InvalidInputError(
                    f"inpaint_mask is {mask.size[0]}x{mask.size[1]} (WxH) but input_image is {image.size[0]}x"
                    f"{image.size[1]}; the mask marks pixels of the input image, so give it the same size"
                )
            state.data[self.name]["mask"] = mask
        for k in ("inpaint_blur_size", "inpaint_blur_sigma"):
            if p[k] is not None and (not isinstance(p[k], (int, float)) or p[k] < 0):
                raise InvalidInputError(f"{k} must be a non-negative number, got {p[k]!r}")

    def prepare(self, pipe, state) -> None:
        d = state.data.get(self.name)
        if d is None:
            return
        channels = pipe.components["vae"].image_channels
        image = d["image"].convert("RGBA" if channels == 4 else "RGB")
        x = image_to_tensor(image, state.dtype).to(state.device)
        with pipe.using("vae") as vae:
            d["latents"] = vae.encode(x, **state.vae_kwargs())
        pipe.trace("input_latents", d["latents"])
        if "mask" in d:
            d["mask_latent"] = self.latent_mask(d["mask"], d["latents"].shape[-2:], state).to(state.device)
            pipe.trace("inpaint_mask", d["mask_latent"])

    @staticmethod
    def latent_mask(mask: Image.Image, hw: Any, state) -> torch.Tensor:
        """Bicubic resize to the latent size, [0, 1], mean over RGB → (1, 1, h, w); optional Gaussian blur."""
        h, w = int(hw[0]), int(hw[1])
        arr = np.asarray(mask.convert("RGB").resize((w, h)), dtype=np.float32)
        m = (torch.from_numpy(arr.copy()) * (1 / 255)).mean(dim=-1)[None, None]
        size, sigma = state.params["inpaint_blur_size"], state.params["inpaint_blur_sigma"]
        if size is not None and sigma is not None:
            m = gaussian_blur(m, 2 * int(size) + 1, sigma)
        return m.to(state.dtype)

    def initial_latents(self, pipe, state, noise) -> torch.Tensor | None:
        d = state.data.get(self.name)
        if d is None:
            return None
        sigma = state.sigmas[0].to(noise.device, noise.dtype)
        return (1 - sigma) * d["latents"] + sigma * noise

    def velocity(self, pipe, state, step, velocity, latents) -> torch.Tensor:
        d = state.data.get(self.name)
        if d is None or "mask_latent" not in d:
            return velocity
        m = d["mask_latent"]
        # the velocity that lands on the input image's latents, at the sigma being evaluated
        expected = (latents - d["latents"]) / state.sigma.to(latents.device, latents.dtype)
        return expected * (1 - m) + velocity * m
