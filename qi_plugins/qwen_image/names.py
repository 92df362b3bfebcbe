"""The registered names of the base plugin's parts, for the plugins that reuse them.

A variant's recipe names the base parts it loads (``Component(part=DIT, ...)``); importing the names from here
instead of repeating the strings keeps every recipe in step with what the base plugin registers. Plain
constants: importing this module costs nothing. A plugin using them declares ``QI_REQUIRES = ("qwen_image",)``.
"""

from __future__ import annotations

TEXT_ENCODER = "qwen2.5-vl"  # encoder, role "text_encoder": Qwen2.5-VL (prompt → TextSegment)
VAE = "qwen-image-vae"  # encoder, role "vae": the Qwen-Image autoencoder (RGB, or RGBA with input_channels 4)
DIT = "qwen-image-dit"  # denoiser: the Qwen-Image MMDiT
SCHEDULER = "qwen-image"  # scheduler: the "Qwen-Image" flow-matching sigma schedule
INPUT_IMAGE = "input-image"  # injector: img2img and inpainting (input_image, inpaint_mask)
RECIPE = "qwen-image"  # pipeline: Qwen-Image text-to-image
