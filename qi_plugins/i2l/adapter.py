"""``ImageToLoRA``: an adapter that turns images into a LoRA and applies it (through the LoRA plugin).

    pipe = qi.compose("qwen-image", adapters=[ImageToLoRA(images, models=["style"], encoder=enc)])

``remove`` takes the LoRA off again. The LoRA itself is kept as ``.lora`` (a state dict) for saving.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from qi_core.errors import InvalidInputError
from qi_core.protocols import Adapter


class ImageToLoRA(Adapter):
    """``images`` (with an :class:`~qi_plugins.i2l.encoders.I2LEncoder`) or precomputed ``embeddings``
    (``{"image2lora_x": (n, 1, E), "image2lora_residual": ..., "image2lora_residual_highres": ...}``);
    ``models``: :class:`~qi_plugins.i2l.model.Image2LoRA` instances, files, or ``style``/``coarse``/``fine``;
    ``bias``: a LoRA (file, name ``"bias"`` or state dict) merged after the images; ``scale``/``fuse`` as
    :class:`qi_plugins.lora.adapter.LoRA`."""

    name = "i2l"

    def __init__(self, images: Sequence[Any] | None = None, *, embeddings: dict[str, Any] | None = None,
                 models: Sequence[Any] = ("style",), encoder: Any = None, bias: Any = None, scale: float = 1.0,
                 fuse: bool = True):  # fmt: skip
        if (images is None) == (embeddings is None):
            raise InvalidInputError(
                "ImageToLoRA needs images (with encoder=) or embeddings=, not both or neither"
            )
        if images is not None and encoder is None:
            raise InvalidInputError(
                "ImageToLoRA(images) needs encoder=I2LEncoder.load(siglip2, dinov3[, ...])"
            )
        self.images, self.embeddings, self.models = images, embeddings, list(models)
        self.encoder, self.bias, self.scale, self.fuse = encoder, bias, scale, fuse
        self.lora: dict[str, torch.Tensor] | None = None
        self._applied: Any = None

    def compute(self, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The merged LoRA of the images (computed once)."""
        if self.lora is not None:
            return self.lora
        from safetensors.torch import load_file

        from qi_plugins.i2l.cli import hub_file
        from qi_plugins.i2l.model import Image2LoRA, decode, load_i2l, merge_loras

        models = [m if isinstance(m, Image2LoRA) else load_i2l(hub_file(str(m)), device=device, dtype=dtype)
                  for m in self.models]  # fmt: skip
        if self.embeddings is not None:
            inputs = dict(self.embeddings)
        else:
            inputs = self.encoder.inputs(self.images, models)
        if inputs.get("image2lora_x") is None:
            raise InvalidInputError("embeddings need 'image2lora_x' (n, 1, E)")
        get = lambda k: None if inputs.get(k) is None else inputs[k].to(device, dtype)  # noqa: E731
        with torch.no_grad():
            lora = decode(
                models, get("image2lora_x"), get("image2lora_residual"), get("image2lora_residual_highres")
            )
            if self.bias is not None:
                bias = self.bias if isinstance(self.bias, dict) else load_file(str(hub_file(str(self.bias))))
                lora = merge_loras([lora, {k: v.to(device, dtype) for k, v in bias.items()}])
        self.lora = lora
        return lora

    def apply(self, pipe: Any) -> None:
        from qi_plugins.lora.adapter import LoRA

        if self._applied is not None:
            raise InvalidInputError("this ImageToLoRA is already applied; remove(pipe) it first")
        lora = LoRA(self.compute(), scale=self.scale, fuse=self.fuse, name="i2l")
        lora.apply(pipe)
        self._applied = lora

    def remove(self, pipe: Any) -> None:
        if self._applied is None:
            return
        self._applied.remove(pipe)
        self._applied = None
        if self in getattr(pipe, "adapters", []):
            pipe.adapters.remove(self)
