"""The ``layered`` injector: ``layer_num`` + 1 target frames, the RGBA ``layer_input_image``, an optional
``context_image`` (Layered-Control-V2's brush mask).

Per call (DiffSynth-Studio semantics):

* the generic loop draws noise ``(layer_num + 1, 16, H/8, W/8)`` and decodes every frame (frame 0 = the
  composite, then one frame per layer) — the pipeline returns a list of RGBA images;
* ``layer_input_image`` is VAE-encoded at its own size (no resizing; sides must be multiples of 16) and
  appended last with RoPE frame −1;
* ``context_image`` is converted to RGBA, resized to ``(width, height)`` (bicubic), VAE-encoded and appended
  before the layer input, at the next RoPE frame. When the pipeline also has the in-context plugin's
  ``context-image`` injector, that injector owns ``context_image`` and this one leaves it alone.
"""

from __future__ import annotations

from PIL import Image

from qi_core.errors import InvalidInputError
from qi_core.images import image_to_tensor, load_image
from qi_core.params import CallParams, ImageInput, param
from qi_core.protocols import ImageSegment, Injector
from qi_plugins.layered.training import load_rgba

CONTEXT_INJECTOR = "context-image"  # the in-context plugin's injector; owns context_image when present


class LayeredInjector(Injector):
    name = "layered"

    class Params(CallParams):
        layer_num: int | None = param(None, "number of RGBA layers to decompose into", ge=0)
        layer_input_image: ImageInput = param(None, "the RGB(A) image to split into layers", kind="image")
        context_image: ImageInput = param(None, "control image for Layered-Control", kind="image")

    # qi train: the target frames (composite, then layers) and the input keep their alpha channel
    file_loaders = {"image": load_rgba, "layer_input_image": load_rgba}

    def validate(self, pipe, state) -> None:
        p = state.params
        n = p["layer_num"]
        if n is None or isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidInputError(
                f"layer_num must be an integer ≥ 0 (the number of layers to produce besides the composite), "
                f"got {n!r}"
            )
        if p["layer_input_image"] is None:
            raise InvalidInputError(
                f"pipeline {pipe.name!r} decomposes an image: pass layer_input_image (an RGBA image whose "
                "sides are multiples of 16, normally of size width x height)"
            )
        image = load_image(p["layer_input_image"], "layer_input_image")
        m = pipe.size_multiple
        w, h = image.size
        if w % m or h % m:
            raise InvalidInputError(
                f"layer_input_image is {w}x{h} (WxH); both sides must be multiples of {m} — resize it, e.g. to "
                f"{max(m, w // m * m)}x{max(m, h // m * m)}, or to the output size {p['width']}x{p['height']}"
            )
        d = {"layer_input": image}
        if p["context_image"] is not None and pipe.injector(CONTEXT_INJECTOR) is None:
            d["context"] = load_image(p["context_image"], "context_image")
        state.data[self.name] = d

    def prepare(self, pipe, state) -> None:
        d = state.data[self.name]
        state.target_frames = state.params["layer_num"] + 1
        state.frames_as_list = True  # one image per frame, a list even for layer_num=0 (as DiffSynth)
        mode = "RGBA" if pipe.components["vae"].image_channels == 4 else "RGB"
        images = {"layer_input": d["layer_input"].convert(mode)}
        if "context" in d:
            size = (state.params["width"], state.params["height"])
            images["context"] = d["context"].convert(mode).resize(size, Image.BICUBIC)
        with pipe.using("vae") as vae:
            for key, image in images.items():
                x = image_to_tensor(image, state.dtype).to(state.device)
                d[key + "_latents"] = vae.encode(x, **state.vae_kwargs())
                pipe.trace(key + "_latents", d[key + "_latents"])

    def denoise_input(self, pipe, state, side, step, inp) -> None:
        d = state.data[self.name]
        frames = state.params["layer_num"] + 1
        if inp.target_frames != frames:  # training: the frames come from the row's image list
            raise InvalidInputError(
                f"layer_num={frames - 1} means {frames} target frames (the composite, then {frames - 1} layers), "
                f"but the training row's image list has {inp.target_frames}; give the composite first, then "
                "one file per layer, and set layer_num to the number of layers"
            )
        if "context_latents" in d:
            inp.images.append(ImageSegment(d["context_latents"]))
        inp.images.append(ImageSegment(d["layer_input_latents"], frame=-1))
        inp.extras[self.name] = {"addition_t_cond": 0}
