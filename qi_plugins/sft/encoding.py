"""Encoding training samples: :func:`encode_sample` runs a sample through the stages an inference call runs
(:meth:`Pipeline.condition`: injectors ``validate`` → schedule → ``prepare`` → prompts, on the positive side only,
``cfg_scale = 1`` as the seed trains), the autoencoder on the target image, then every injector's
``denoise_input``, and keeps the result as a :class:`~qi_core.conditioning.Conditioning`. An injector declares the
call parameter, and ``--extra_inputs`` passes the metadata column of that name (or one its ``column_adapters``
turn into call parameters). Split training caches one sample a file (:func:`save_conditioning`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from qi_core.atomic import save_safetensors
from qi_core.conditioning import Conditioning
from qi_core.errors import InvalidInputError, ModelLoadError
from qi_core.images import image_to_tensor
from qi_core.params import is_json, json_params
from qi_core.protocols import ImageSegment, TextSegment

FORMAT = "qi-conditioning/1"  # the header of a cached sample (save_conditioning)


def save_conditioning(self: Conditioning, path: str | os.PathLike) -> Path:
    """One sample as a safetensors file (tensors + a JSON header), written atomically."""
    if self.batch_size != 1:
        raise InvalidInputError(f"cache files hold one sample, this conditioning has {self.batch_size}")
    if self.block_hooks:
        raise InvalidInputError(
            f"{self.where[0] if self.where else 'sample'}: an injector adds block hooks (computed during the "
            "denoiser's forward), which cannot be cached; train this pipeline in one stage (--task sft)"
        )
    tensors = {"latents": self.latents}
    for i, s in enumerate(self.text):
        tensors[f"text.{i}.emb"] = s.emb
        if s.mask is not None:
            tensors[f"text.{i}.mask"] = s.mask
    for j, s in enumerate(self.images):
        tensors[f"images.{j}.latents"] = s.latents
    if self.attention_mask is not None:
        tensors["attention_mask"] = self.attention_mask
    plain = {}
    for k, v in self.extras.items():
        if isinstance(v, torch.Tensor):
            tensors[f"extras.{k}"] = v
        elif is_json(v):
            plain[k] = v
        else:
            raise InvalidInputError(
                f"extras[{k!r}] ({type(v).__name__}) cannot be cached; train in one stage"
            )
    header = {
        "format": FORMAT,
        "text": [{"rope_offset": s.rope_offset, "mask": s.mask is not None} for s in self.text],
        "images": [
            {"frame": s.frame, "modulation": s.modulation, "rope_from_target": s.rope_from_target}
            for s in self.images
        ],  # fmt: skip
        "extra_timesteps": list(self.extra_timesteps),
        "target_frames": self.target_frames,
        "extras": plain,
        "params": self.params[0] if self.params else {},
        "where": self.where[0] if self.where else "",
    }
    return save_safetensors(tensors, path, metadata={"qi": json.dumps(header)})


def load_conditioning(path: str | os.PathLike) -> Conditioning:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("qi", "{}"))
        if meta.get("format") != FORMAT:
            raise ModelLoadError(f"{path} is not a qi training cache file ({FORMAT})")
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    text = [TextSegment(t[f"text.{i}.emb"], t.get(f"text.{i}.mask"), s["rope_offset"])
            for i, s in enumerate(meta["text"])]  # fmt: skip
    images = [ImageSegment(t[f"images.{j}.latents"], s["frame"], s["modulation"], s["rope_from_target"])
              for j, s in enumerate(meta["images"])]  # fmt: skip
    extras = dict(meta["extras"])
    extras.update({k.removeprefix("extras."): v for k, v in t.items() if k.startswith("extras.")})
    return Conditioning(latents=t["latents"], text=text, images=images, extra_timesteps=meta["extra_timesteps"],
               attention_mask=t.get("attention_mask"), extras=extras, target_frames=meta["target_frames"],
               params=[meta["params"]], where=[meta["where"]])  # fmt: skip


# -- what injectors declare for training, read per run ---------------------------------------------------------
def injector_declarations(pipe: Any, attr: str) -> dict[Any, Any]:
    """The ``file_loaders`` or ``column_adapters`` the injectors of ``pipe`` declare, merged in injector order;
    each value must be callable."""
    out: dict[Any, Any] = {}
    for inj in pipe.injectors:
        for key, fn in (getattr(inj, attr, None) or {}).items():
            if not callable(fn):
                raise InvalidInputError(
                    f"injector {inj.name!r}: {attr}[{key!r}] must be callable, got {type(fn).__name__}"
                )
            out[key] = fn
    return out


def adapt_columns(pipe: Any, params: dict[str, Any], extra_inputs: tuple[str, ...]) -> dict[str, Any]:
    """``params`` with the ``--extra_inputs`` columns an injector's ``column_adapters`` take replaced by the call
    parameters the adapter returns (given the present columns only)."""
    out = dict(params)
    for columns, adapter in injector_declarations(pipe, "column_adapters").items():
        given = {c: out.pop(c) for c in columns if c in extra_inputs and c in out}
        if given:
            out.update(adapter(given))
    return out


# -- encoding -------------------------------------------------------------------------------------------------
def encode_sample(pipe: Any, sample: dict[str, Any], *, extra_inputs: tuple[str, ...] = (),
                  overrides: dict[str, Any] | None = None, image_key: str = "image",
                  prompt_key: str = "prompt") -> Conditioning:  # fmt: skip
    """Run the frozen stages of ``pipe`` on one sample (a metadata row with loaded images)."""
    where = str(sample.get("_where", "sample"))
    image = sample.get(image_key)
    if image is None:
        raise InvalidInputError(f"{where}: no {image_key!r} (the training target image)")
    frames = image if isinstance(image, list) else [image]
    width, height = frames[0].size
    if any(f.size != (width, height) for f in frames):
        raise InvalidInputError(
            f"{where}: the {image_key!r} frames differ in size: {[f.size for f in frames]}"
        )
    params: dict[str, Any] = {"prompt": sample.get(prompt_key) or "", "negative_prompt": "", "cfg_scale": 1.0,
                              "height": height, "width": width, "seed": 0}  # fmt: skip
    for key in extra_inputs:
        if key not in sample:
            raise InvalidInputError(f"{where}: --extra_inputs names {key!r}, which this row does not have")
        params[key] = sample[key]
    accepted = pipe.parameters()
    params.update({k: v for k, v in (overrides or {}).items() if k in accepted})
    try:
        params = adapt_columns(pipe, params, extra_inputs)
        state = pipe.new_state(params)
    except InvalidInputError as e:
        raise InvalidInputError(f"{where}: {e}") from None
    with torch.no_grad():
        try:  # the inference stages, in their order; a plugin's check of a row's values names the row
            pipe.condition(state)
        except InvalidInputError as e:
            e.args = (f"{where}: {e}", *e.args[1:])
            raise
        x0 = encode_images(pipe, frames, state.dtype)
        if state.target_frames not in (1, len(frames)):
            raise InvalidInputError(
                f"{where}: the pipeline expects {state.target_frames} target frames, the row has {len(frames)}"
            )
        state.target_frames = len(frames)
        t0 = torch.zeros(1, device=x0.device, dtype=x0.dtype)
        inp = pipe.denoise_inputs(state, x0, 0, t0)["positive"]
        for inj in pipe.injectors:
            inj.finish(pipe, state)
    kept = json_params(state.params)
    return Conditioning(latents=x0, text=inp.text, images=inp.images, extra_timesteps=inp.extra_timesteps,
                        attention_mask=inp.attention_mask, block_hooks=inp.block_hooks, extras=inp.extras,
                        target_frames=len(frames), params=[kept], where=[where])  # fmt: skip


def encode_images(pipe: Any, frames: list[Any], dtype: torch.dtype) -> torch.Tensor:
    """Target frames (PIL) → normalised latents (F, C, h, w) with the pipeline's autoencoder."""
    with pipe.using(pipe.roles["autoencoder"]) as vae:
        mode = "RGBA" if getattr(vae, "image_channels", 3) == 4 else "RGB"
        x = torch.cat([image_to_tensor(f.convert(mode), dtype) for f in frames]).to(pipe.device)
        x0 = vae.encode(x)
    pipe.trace("input_latents", x0)
    return x0
