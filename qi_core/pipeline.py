"""The generic flow-matching loop. It knows parts by role, never a variant by name.

One call: check parameters → injectors ``validate``/``prepare`` → noise → initial latents → prompts (per CFG
side) → for each step and side, a :class:`~qi_core.protocols.DenoiseInput` that injectors extend → guidance →
injectors' ``velocity`` → Euler step → decode.
"""

from __future__ import annotations

import difflib
import random
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from qi_core.errors import InvalidInputError
from qi_core.images import tensor_to_image
from qi_core.protocols import DenoiseInput, Injector, TextSegment

#: Call parameters of the generic loop, with their defaults (DiffSynth-Studio names and meaning).
BASE_PARAMS: dict[str, Any] = {
    "prompt": "",
    "negative_prompt": "",
    "cfg_scale": 4.0,
    "height": 1328,
    "width": 1328,
    "seed": None,
    "rand_device": "cpu",
    "num_inference_steps": 30,
    "denoising_strength": 1.0,
    "exponential_shift_mu": None,
    "tiled": False,
    "tile_size": 128,
    "tile_stride": 64,
    "progress_bar_cmd": tqdm,
    "output_type": "pil",
}
OUTPUT_TYPES = ("pil", "np", "latent")
SIDES = ("positive", "negative")


@dataclass
class RunState:
    """What one call carries between the stages. Injectors keep their own data in ``data[name]``."""

    params: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    sigmas: torch.Tensor | None = None  # (N,) float32
    timesteps: torch.Tensor | None = None  # (N,) float32
    noise: torch.Tensor | None = None  # (F, C, h, w)
    latents: torch.Tensor | None = None
    target_frames: int = 1  # frames of the target (an injector may set more in prepare)
    frames_as_list: bool = False  # return a list of images even for one frame
    prompts: dict[str, list[TextSegment]] = field(default_factory=dict)  # side → text segments
    data: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:  # state.height etc. read the call parameters
        try:
            return self.__dict__["params"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def cfg(self) -> bool:
        return float(self.params["cfg_scale"]) != 1.0

    def vae_kwargs(self) -> dict[str, Any]:
        return {k: self.params[k] for k in ("tiled", "tile_size", "tile_stride")}


class Pipeline:
    """A composed pipeline: loaded components by role, a schedule, injectors, a memory policy."""

    def __init__(self, name: str, components: dict[str, Any], scheduler: Any, injectors: Iterable[Injector],
                 *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 defaults: dict[str, Any] | None = None, memory: dict[str, Any] | None = None,
                 model: str | None = None):  # fmt: skip
        self.name = name
        self.components = dict(components)
        self.scheduler = scheduler
        self.injectors: list[Injector] = list(injectors)
        self.device, self.dtype = torch.device(device), dtype
        self.defaults = dict(defaults or {})
        self.memory = memory
        self.model = model
        self.adapters: list[Any] = []
        self.tracer: Callable[[str, torch.Tensor], None] | None = None  # sees every intermediate tensor
        self.batch_cfg = True  # run the CFG sides through each denoiser layer together

    # -- parts -----------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:  # pipe.dit, pipe.vae, pipe.text_encoder
        components = self.__dict__.get("components", {})
        if name in components:
            return components[name]
        raise AttributeError(f"pipeline has no attribute or component {name!r}")

    def using(self, role: str):
        """Context manager around one use of a component (the memory policy moves weights here)."""
        model = self.components.get(role)
        policy = (self.memory or {}).get(role)
        if policy is None or model is None:
            return nullcontext(model)
        return policy.use(model)

    @property
    def size_multiple(self) -> int:
        vae, dit = self.components.get("vae"), self.components.get("dit")
        return int(getattr(vae, "scale_factor", 8)) * int(getattr(dit, "patch_size", 2))

    def parameters(self) -> dict[str, Any]:
        """Every call parameter this pipeline accepts, with its default."""
        params = dict(BASE_PARAMS)
        for inj in self.injectors:
            params.update(inj.params)
        params.update(self.defaults)
        return params

    def injector(self, name: str) -> Injector | None:
        return next((i for i in self.injectors if i.name == name), None)

    def add_injector(self, injector: Injector) -> None:
        if self.injector(injector.name) is None:
            self.injectors.append(injector)

    def trace(self, name: str, value: torch.Tensor) -> None:
        if self.tracer is not None:
            self.tracer(name, value)

    # -- call ------------------------------------------------------------------------------------------
    def __call__(self, prompt: str | None = None, **kwargs: Any) -> Any:
        if prompt is not None:
            kwargs["prompt"] = prompt
        state = self.new_state(kwargs)
        with torch.inference_mode():
            return self._run(state)

    def new_state(self, kwargs: dict[str, Any]) -> RunState:
        """A run state for these call parameters: unknown names refused, defaults filled, sizes checked."""
        accepted = self.parameters()
        unknown = [k for k in kwargs if k not in accepted]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(k, list(accepted), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise InvalidInputError(
                f"pipeline {self.name!r} does not accept {k!r}.{hint} Accepted: {', '.join(sorted(accepted))}"
            )
        params = {**accepted, **kwargs}
        self._check_core(params)
        if params["seed"] is None:
            params["seed"] = random.randrange(2**31)
        return RunState(params=params, device=self.device, dtype=self.dtype)

    def _check_core(self, p: dict[str, Any]) -> None:
        m = self.size_multiple
        for side in ("height", "width"):
            v = p[side]
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise InvalidInputError(f"{side} must be a positive integer, got {v!r}")
        h, w = p["height"], p["width"]
        if h % m or w % m:
            hs = sorted({max(m, h // m * m), -(-h // m) * m})
            ws = sorted({max(m, w // m * m), -(-w // m) * m})
            raise InvalidInputError(
                f"height and width must be multiples of {m}, got {h}x{w} (HxW); nearest valid heights: "
                f"{' or '.join(map(str, hs))}, widths: {' or '.join(map(str, ws))}"
            )
        steps = p["num_inference_steps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise InvalidInputError(f"num_inference_steps must be an integer ≥ 1, got {steps!r}")
        s = p["denoising_strength"]
        if not isinstance(s, (int, float)) or not 0.0 <= float(s) <= 1.0:
            raise InvalidInputError(f"denoising_strength must be in [0, 1], got {s!r}")
        if p["output_type"] not in OUTPUT_TYPES:
            raise InvalidInputError(f"output_type must be one of {OUTPUT_TYPES}, got {p['output_type']!r}")
        if not isinstance(p["cfg_scale"], (int, float)):
            raise InvalidInputError(f"cfg_scale must be a number, got {p['cfg_scale']!r}")

    def _run(self, state: RunState) -> Any:
        p = state.params
        for inj in self.injectors:
            inj.validate(self, state)
        state.sigmas, state.timesteps = self.scheduler.schedule(
            p["num_inference_steps"], height=p["height"], width=p["width"],
            denoising_strength=float(p["denoising_strength"]), exponential_shift_mu=p["exponential_shift_mu"],
        )  # fmt: skip
        self.trace("sigmas", state.sigmas)
        self.trace("timesteps", state.timesteps)
        for inj in self.injectors:
            inj.prepare(self, state)

        state.noise = self.noise(state)
        self.trace("noise", state.noise)
        latents = None
        for inj in self.injectors:
            got = inj.initial_latents(self, state, state.noise)
            if got is not None:
                latents = got
        if latents is None:
            if float(p["denoising_strength"]) < 1.0:
                raise InvalidInputError(
                    f"denoising_strength={p['denoising_strength']} < 1 needs a starting image (input_image); "
                    "without one, use denoising_strength=1.0"
                )
            latents = state.noise
        state.latents = latents
        self.trace("latents_init", latents)

        self.encode_prompts(state)
        latents = self.denoise(state)
        self.trace("final_latents", latents)
        out = self.decode(state, latents)
        for inj in self.injectors:
            inj.finish(self, state)
        return out

    def noise(self, state: RunState) -> torch.Tensor:
        """Seeded Gaussian noise, drawn on ``rand_device`` in the pipeline dtype (DiffSynth-compatible)."""
        p, vae = state.params, self.components["vae"]
        f = vae.scale_factor
        shape = (state.target_frames, vae.latent_channels, p["height"] // f, p["width"] // f)
        gen = torch.Generator(p["rand_device"]).manual_seed(int(p["seed"]))
        noise = torch.randn(shape, generator=gen, device=p["rand_device"], dtype=self.dtype)
        return noise.to(self.device)

    def encode_prompts(self, state: RunState) -> None:
        sides = SIDES if state.cfg else SIDES[:1]
        with self.using("text_encoder") as te:
            te = te or self.components["text_encoder"]
            for side in sides:
                extra: dict[str, Any] = {}
                for inj in self.injectors:
                    extra.update(inj.prompt_inputs(self, state, side))
                text = state.params["prompt" if side == "positive" else "negative_prompt"]
                seg = te.encode_prompt(text, **extra)
                seg.emb = seg.emb.to(self.device, self.dtype)
                state.prompts[side] = [seg]
                self.trace("prompt_emb" if side == "positive" else "negative_prompt_emb", seg.emb)

    def denoise(self, state: RunState) -> torch.Tensor:
        with self.using("dit") as dit:
            dit = dit or self.components["dit"]
            try:
                return self._loop(state, dit)
            finally:
                if getattr(dit, "step_cache", None) is not None:
                    dit.step_cache = None
                    self.memory["dit"].skip_parameters(set())

    def _fill_step_cache(self, dit: Any, inputs: list[DenoiseInput], timesteps: torch.Tensor) -> None:
        """When the memory policy asks for it (``wants_step_cache``) and the denoiser can precompute its
        per-timestep state (``fill_step_cache``), do it once per call; the weights only that state needs then
        stay put."""
        policy = (self.memory or {}).get("dit")
        if getattr(policy, "wants_step_cache", False) and hasattr(dit, "fill_step_cache"):
            dit.fill_step_cache(inputs, timesteps.to(self.device, self.dtype))
            policy.skip_parameters(dit.step_cache_parameters())

    def _loop(self, state: RunState, dit: Any) -> torch.Tensor:
        p = state.params
        latents, sigmas, timesteps = state.latents, state.sigmas, state.timesteps
        n = len(sigmas)
        sides = SIDES if state.cfg else SIDES[:1]
        for i in p["progress_bar_cmd"](range(n)):
            inputs = {}
            for side in sides:
                inp = DenoiseInput(
                    latents=latents,
                    timestep=timesteps[i : i + 1].to(device=self.device, dtype=self.dtype),
                    text=list(state.prompts[side]),
                    target_frames=state.target_frames,
                )
                for inj in self.injectors:
                    inj.denoise_input(self, state, side, i, inp)
                inputs[side] = inp
            if i == 0:
                self._fill_step_cache(dit, list(inputs.values()), timesteps)
            preds = self.predict(dit, inputs)
            for side in sides:
                self.trace(f"noise_pred_{side[:4]}_step_{i}", preds[side])
            v = preds["positive"]
            if state.cfg:
                v = preds["negative"] + p["cfg_scale"] * (preds["positive"] - preds["negative"])
            self.trace(f"noise_pred_step_{i}", v)
            for inj in self.injectors:
                v = inj.velocity(self, state, i, v, latents)
            sigma_next = sigmas[i + 1] if i + 1 < n else torch.zeros_like(sigmas[i])
            latents = latents + v * (sigma_next - sigmas[i]).to(latents.device, latents.dtype)
            state.latents = latents
            self.trace(f"latents_step_{i}", latents)
        return latents

    def predict(self, dit: Any, inputs: dict[str, DenoiseInput]) -> dict[str, torch.Tensor]:
        """The CFG sides together (``forward_many``: each layer runs once for both, so a streamed layer moves
        once per step) when the denoiser supports it and ``batch_cfg`` is on; else one call per side."""
        many = getattr(dit, "forward_many", None)
        if self.batch_cfg and len(inputs) > 1 and many is not None:
            return dict(zip(inputs, many(list(inputs.values())), strict=True))
        return {side: dit(inp) for side, inp in inputs.items()}

    def decode(self, state: RunState, latents: torch.Tensor) -> Any:
        kind = state.params["output_type"]
        if kind == "latent":
            return latents
        with self.using("vae") as vae:
            vae = vae or self.components["vae"]
            image = vae.decode(latents, **state.vae_kwargs())
        self.trace("image_float", image)
        if kind == "np":
            arrays = [x.permute(1, 2, 0).float().cpu().numpy().astype(np.float32) for x in image]
            return arrays[0] if state.target_frames == 1 and not state.frames_as_list else arrays
        if state.target_frames == 1 and not state.frames_as_list:
            return tensor_to_image(image.mean(dim=0))
        return [tensor_to_image(x) for x in image]
