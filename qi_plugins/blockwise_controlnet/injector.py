"""The ``blockwise-controlnet`` injector: control images → VAE latents (once per call) → a block hook that adds
``Σ scale · block_b(img[:, :N_target], cond)`` to the target tokens after every DiT block, in each input's window.

Everything reaches the denoiser through ``DenoiseInput.block_hooks``; the DiT knows nothing about ControlNets.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from qi_core.errors import InvalidInputError
from qi_core.images import image_to_tensor, load_image
from qi_core.params import CallParams, Entries, param
from qi_core.protocols import Injector
from qi_plugins.blockwise_controlnet.inputs import ControlNetInput, active, as_controlnet_inputs
from qi_plugins.blockwise_controlnet.training import COLUMNS, columns_to_inputs

ROLE = "blockwise_controlnet"  # the component slot holding the loaded ControlNets


class ControlResidual:
    """``hook(b, img, txt)``: add the residuals of the active ControlNet inputs to the first ``n_target`` tokens."""

    def __init__(self, terms: list[tuple[Any, torch.Tensor, float]], n_target: int, inputs: tuple[int, ...],
                 *, project: bool = False):  # fmt: skip
        self.terms = terms  # (ControlNet, projected conditioning (B, N, D), scale) per active input
        self.n_target = n_target
        self.inputs = inputs  # indices into blockwise_controlnet_inputs that are active at this step
        # True: terms hold control latents (B, C, h, w), projected by img_in inside the denoiser's forward, so a
        # ControlNet being trained gets gradients in img_in too (training encodes its samples without gradients)
        self.project = project
        self._projected: list[torch.Tensor] = []

    def __call__(self, index: int, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        x = img[:, : self.n_target]
        if self.project and (index == 0 or not self._projected):  # once per forward: block 0 starts one
            self._projected = [net.project(cond) for net, cond, _ in self.terms]
        conds = self._projected if self.project else [cond for _, cond, _ in self.terms]
        res: torch.Tensor | float = 0.0
        for (net, _, scale), cond in zip(
            self.terms, conds, strict=True
        ):  # summed first, then added (DiffSynth)
            res = res + net.block(index, x, cond) * scale
        if img.shape[1] == self.n_target:
            return x + res
        return torch.cat([x + res, img[:, self.n_target :]], dim=1)


class BlockwiseControlNetInjector(Injector):
    name = "blockwise-controlnet"

    class Params(CallParams):
        blockwise_controlnet_inputs: Entries = param(
            None, "control inputs: ControlNetInput(image=, scale=, start=, end=, controlnet_id=, inpaint_mask=) "
            "or dicts with those fields", kind="entries",
            shorthand=("controlnet", ("controlnet_id", "image", "scale")))  # fmt: skip

    # qi train: the seed's blockwise_controlnet_* metadata columns → one ControlNetInput
    column_adapters = {COLUMNS: columns_to_inputs}

    def validate(self, pipe, state) -> None:
        inputs = as_controlnet_inputs(state.params["blockwise_controlnet_inputs"])
        if not inputs:
            return
        nets = pipe.components.get(ROLE)
        if nets is None or len(nets) == 0:
            raise InvalidInputError(
                "blockwise_controlnet_inputs were given but this pipeline has no ControlNet loaded; compose a "
                "blockwise ControlNet recipe, e.g. qi.compose('qwen-image-blockwise-controlnet-canny', "
                "components={'blockwise_controlnet': ['canny.safetensors', ...]})"
            )
        images, masks = [], []
        for k, c in enumerate(inputs):
            where = f"blockwise_controlnet_inputs[{k}]"
            if c.controlnet_id >= len(nets):
                raise InvalidInputError(
                    f"{where}.controlnet_id={c.controlnet_id}, but {len(nets)} ControlNet(s) are loaded "
                    f"(ids 0..{len(nets) - 1}, in the order of components['blockwise_controlnet']); "
                    "load more ControlNets or pick an existing id"
                )
            extra = nets[c.controlnet_id].config.additional_in_dim
            if extra and c.inpaint_mask is None:
                raise InvalidInputError(
                    f"{where}: ControlNet {c.controlnet_id} is an inpaint ControlNet "
                    f"(additional_in_dim={extra}) and needs inpaint_mask (white = region to redraw)"
                )
            if not extra and c.inpaint_mask is not None:
                raise InvalidInputError(
                    f"{where}: inpaint_mask was given but ControlNet {c.controlnet_id} is not an inpaint "
                    "ControlNet (additional_in_dim=0); drop inpaint_mask or use the inpaint ControlNet's id"
                )
            images.append(load_image(c.image, f"{where}.image"))
            masks.append(
                None if c.inpaint_mask is None else load_image(c.inpaint_mask, f"{where}.inpaint_mask")
            )
        state.data[self.name] = {"inputs": inputs, "images": images, "masks": masks}

    def prepare(self, pipe, state) -> None:
        d = state.data.get(self.name)
        if d is None:
            return
        nets, dit = pipe.components[ROLE], pipe.components.get("dit")
        _check_against_dit(nets, {c.controlnet_id for c in d["inputs"]}, dit)
        size = (state.params["width"], state.params["height"])
        conds = []
        with pipe.using("vae") as vae:
            for k, (image, mask) in enumerate(zip(d["images"], d["masks"], strict=True)):
                conds.append(conditioning(vae, image, mask, size, state))
                pipe.trace(f"controlnet_conditioning_{k}", conds[-1])
        d["conds"] = conds

    def denoise_input(self, pipe, state, side, step, inp) -> None:
        d = state.data.get(self.name)
        if d is None:
            return
        n = len(state.sigmas)
        ids = tuple(k for k, c in enumerate(d["inputs"]) if active(c, step, n))
        if not ids:
            return
        if "nets" not in d:
            # the ControlNets are in use from the first active step to the end of denoising
            d["stack"] = stack = ExitStack()
            nets = stack.enter_context(pipe.using(ROLE))
            d["nets"] = nets
            # a ControlNet being trained projects in the denoiser's forward (see ControlResidual.project)
            d["trained"] = any(p.requires_grad for p in nets.parameters())
            if not d["trained"]:
                d["projected"] = [
                    nets[c.controlnet_id].project(x) for c, x in zip(d["inputs"], d["conds"], strict=True)
                ]
        p = int(pipe.size_multiple // pipe.components["vae"].scale_factor)
        n_target = inp.target_frames * (inp.latents.shape[-2] // p) * (inp.latents.shape[-1] // p)
        terms = []
        for k in ids:
            c, cond = d["inputs"][k], d["conds" if d["trained"] else "projected"][k]
            tokens = cond.shape[-2] * cond.shape[-1] // 4 if d["trained"] else cond.shape[1]
            if tokens != n_target:
                raise InvalidInputError(
                    f"blockwise_controlnet_inputs[{k}] gives {tokens} conditioning tokens for "
                    f"{n_target} target tokens; ControlNets work on single-frame targets"
                )
            terms.append((d["nets"][c.controlnet_id], cond, float(c.scale)))
        inp.block_hooks.append(ControlResidual(terms, n_target, ids, project=d["trained"]))

    def velocity(self, pipe, state, step, velocity, latents) -> torch.Tensor:
        if step == len(state.sigmas) - 1:
            self._release(state)
        return velocity

    def finish(self, pipe, state) -> None:
        self._release(state)

    def _release(self, state) -> None:
        d = state.data.get(self.name)
        if d is not None and d.get("stack") is not None:
            d.pop("stack").close()


def _check_against_dit(nets, ids: set[int], dit) -> None:
    config = getattr(dit, "config", None)
    blocks = getattr(dit, "transformer_blocks", None)
    dim = getattr(config, "inner_dim", None)
    for i in sorted(ids):
        c = nets[i].config
        if dim is not None and c.dim != dim:
            raise InvalidInputError(
                f"ControlNet {i} has dim {c.dim} but the DiT's inner dim is {dim}; use a ControlNet trained for "
                "this DiT"
            )
        if blocks is not None and c.num_layers < len(blocks):
            raise InvalidInputError(
                f"ControlNet {i} has {c.num_layers} control blocks but the DiT has {len(blocks)} blocks; "
                "it needs one control block per DiT block"
            )


def conditioning(
    vae, image: Image.Image, mask: Image.Image | None, size: tuple[int, int], state
) -> torch.Tensor:
    """VAE latents of one control image (resized to the output size); with an inpaint mask, the masked pixels are
    blacked out first and ``1 - mask`` (nearest-resized to the latent grid) is appended as a 17th channel."""
    image = image.convert("RGB")
    if image.size != size:  # DiffSynth expects the caller to resize; its examples use PIL's default (bicubic)
        image = image.resize(size)
    if mask is not None:
        image = masked_image(image, mask)
    x = image_to_tensor(image, state.dtype).to(state.device)
    latents = vae.encode(x, **state.vae_kwargs())
    if mask is None:
        return latents
    m = (image_to_tensor(mask.convert("RGB"), state.dtype).to(state.device) + 1) / 2
    m = F.interpolate(m.mean(dim=1, keepdim=True), size=latents.shape[-2:], mode="nearest")
    return torch.cat([latents, 1 - m], dim=1)


def masked_image(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Black out the pixels where the mask (resized to the image, bicubic; mapped to [-1, 1], mean over RGB) is > 0."""
    m = image_to_tensor(mask.convert("RGB").resize(image.size), torch.float32).mean(dim=(0, 1)).numpy()
    arr = np.array(image)
    arr[m > 0] = 0
    return Image.fromarray(arr)


__all__ = [
    "BlockwiseControlNetInjector",
    "ControlNetInput",
    "ControlResidual",
    "conditioning",
    "masked_image",
]
