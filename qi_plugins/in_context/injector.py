"""In-context control: the ``context_image`` resized to the output size, VAE-encoded and appended as extra image
tokens (an ``ImageSegment``, RoPE frame = its position, 1 when it is the only one), plus the prompt prefix the
In-Context-Control-Union LoRA was trained with (a separate injector, so the bare context injector adds none).
"""

from __future__ import annotations

from qi_core.errors import InvalidInputError
from qi_core.images import image_to_tensor, load_image
from qi_core.params import CallParams, ImageInput, param
from qi_core.protocols import ImageSegment, Injector

PROMPT_PREFIX = "Context_Control. "  # DiffSynth-Studio's In-Context-Control-Union example and training data


class ContextImage(Injector):
    name = "context-image"

    class Params(CallParams):
        context_image: ImageInput = param(None, "control image (canny, depth, pose, …) the output follows",
                                     kind="image")  # fmt: skip

    def validate(self, pipe, state) -> None:
        if state.params["context_image"] is not None:
            state.data[self.name] = {"image": load_image(state.params["context_image"], "context_image")}

    def prepare(self, pipe, state) -> None:
        d = state.data.get(self.name)
        if d is None:
            return
        vae = pipe.components["vae"]
        mode = "RGBA" if getattr(vae, "image_channels", 3) == 4 else "RGB"
        size = (state.params["width"], state.params["height"])
        image = d["image"].convert(mode)
        image = image.resize(size) if image.size != size else image  # PIL default filter, as DiffSynth
        with pipe.using("vae") as enc:
            enc = enc or vae
            d["latents"] = enc.encode(
                image_to_tensor(image, state.dtype).to(state.device), **state.vae_kwargs()
            )
        pipe.trace("context_latents", d["latents"])

    def denoise_input(self, pipe, state, side, step, inp) -> None:
        d = state.data.get(self.name)
        if d is not None:
            # DiffSynth's order is target, context, edit images, layer input: the context goes first
            inp.images.insert(0, ImageSegment(latents=d["latents"]))


class ContextControlPrefix(Injector):
    """Prefixes the prompt with ``Context_Control. `` (once: a prompt that already starts with it is kept)."""

    name = "context-control-prefix"

    def validate(self, pipe, state) -> None:
        prompt = state.params["prompt"]
        if not isinstance(prompt, str):
            raise InvalidInputError(f"prompt must be a string, got {type(prompt).__name__}")

    def prepare(self, pipe, state) -> None:
        prompt = state.params["prompt"]
        if not prompt.startswith(PROMPT_PREFIX):
            state.params["prompt"] = PROMPT_PREFIX + prompt
