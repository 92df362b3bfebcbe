"""The generic flow-matching loop. It knows parts by role, never a variant by name.

One call: check parameters → injectors ``validate``/``prepare`` → noise → initial latents → prompts (per
guidance side) → the sampler integrates the velocity, where each evaluation builds one
:class:`~qi_core.protocols.DenoiseInput` per side that injectors extend, the step runner turns them into
predictions, the guider combines them and injectors' ``velocity`` adjusts the result → decode.

The guider, sampler, step runner and attention backend are registered parts chosen by name
(``qi.compose(..., guidance=, sampler=)``, and per call ``guidance=`` / ``sampler=``).
"""

from __future__ import annotations

import difflib
import random
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BeforeValidator
from tqdm.auto import tqdm

from qi_core.errors import InvalidInputError, MissingComponentError
from qi_core.images import tensor_to_image
from qi_core.params import CallParams, Opaque, check_required, param, specs, validate
from qi_core.protocols import DenoiseInput, Injector, TextSegment


def _prompts(value: Any) -> Any:
    if isinstance(value, (list, tuple)) and not (value and all(isinstance(v, str) for v in value)):
        raise ValueError("a string or a non-empty list of strings")
    return value


#: One prompt, or a list of them (a batch).
Prompts = Annotated[str | list[str], BeforeValidator(_prompts)]


class LoopParams(CallParams):
    """Call parameters of the generic loop (DiffSynth-Studio's names, meanings and defaults)."""

    prompt: Prompts = param("", "what the image shows; a list of prompts makes a batch (a list out)")
    negative_prompt: Prompts = param("", "what it should not show (the negative side of guidance); a list: "
                                     "one per prompt")  # fmt: skip
    num_images_per_prompt: int = param(1, "images per prompt; image j uses seed + j", ge=1)
    cfg_scale: float = param(4.0, "guidance scale; 1 skips the negative pass", ge=0)
    height: int = param(1328, "image height in pixels, a multiple of 16", gt=0)
    width: int = param(1328, "image width in pixels, a multiple of 16", gt=0)
    seed: int | None = param(None, "random seed (None: a random one, recorded)", ge=0, le=2**64 - 1)
    rand_device: str = param("cpu", "device the initial noise is drawn on (cpu matches DiffSynth everywhere)")
    num_inference_steps: int = param(30, "denoising steps", ge=1)
    denoising_strength: float = param(1.0, "how much of input_image to redraw (1: all)", ge=0, le=1)
    exponential_shift_mu: float | None = param(None, "schedule shift μ (None: from the image size)")
    tiled: bool = param(False, "encode and decode the VAE in tiles (less memory)")
    tile_size: int | tuple[int, int] = param(128, "VAE tile size in latent pixels")
    tile_stride: int | tuple[int, int] = param(64, "VAE tile stride in latent pixels")
    progress_bar_cmd: Opaque = param(tqdm, "progress bar around the steps (lambda x: x silences it)",
                                     kind="callable")  # fmt: skip
    output_type: Literal["pil", "np", "latent"] = param("pil", "pil image, float array (H, W, C) or latents")
    guidance: str | Opaque | None = param(None, "guider by name (cfg, cfg-renorm; None: the pipeline's)")
    sampler: str | Opaque | None = param(None, "sampler by name (euler, heun; None: the pipeline's)")


#: The loop's parameters with their defaults.
BASE_PARAMS: dict[str, Any] = {k: f.default for k, f in LoopParams.model_fields.items()}
SIDES = ("positive", "negative")
#: Part kind → the registered name a pipeline uses when none is chosen.
DEFAULT_PARTS = {"guider": "cfg", "sampler": "euler", "step_runner": "batched"}
#: Loop part → component role, as in the official repository layout; a recipe may map them elsewhere.
ROLES = {"denoiser": "dit", "text_encoder": "text_encoder", "autoencoder": "vae"}


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
    sides: tuple[str, ...] = SIDES  # the passes the guider asked for ("positive", "negative")
    sigma: torch.Tensor | None = None  # the sigma the velocity is being evaluated at (0-d)
    tracer: Callable[[str, torch.Tensor], None] | None = field(default=None, repr=False)
    items: list[RunState] = field(default_factory=list)  # a batch: one state per item (this one runs them)

    @property
    def cfg(self) -> bool:
        """Whether the call runs a negative pass."""
        return "negative" in self.sides

    def progress(self, steps: Iterable[int]) -> Iterable[int]:
        """The sampler's step loop through the call's progress bar (``progress_bar_cmd``)."""
        return self.params["progress_bar_cmd"](steps)

    def step_done(self, i: int, latents: torch.Tensor) -> None:
        """Samplers call this after step ``i`` with the latents it produced."""
        self.latents = latents
        if self.tracer is not None:
            self.tracer(f"latents_step_{i}", latents)

    def vae_kwargs(self) -> dict[str, Any]:
        return {k: self.params[k] for k in ("tiled", "tile_size", "tile_stride")}


def timestep_at(scheduler: Any, sigmas: torch.Tensor, timesteps: torch.Tensor, i: int,
                sigma: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The timestep (1,) for step ``i`` evaluated at ``sigma``: the schedule's own at ``sigmas[i]`` (bit for
    bit), else the scheduler's ``timestep(sigma)`` (rectified flow, when it has none: 1000·σ)."""
    if float(sigma) == float(sigmas[i]):
        return timesteps[i : i + 1]
    convert = getattr(scheduler, "timestep", None)
    return convert(sigma.reshape(1)) if convert is not None else sigma.reshape(1) * 1000


def build_part(kind: str, spec: Any) -> Any:
    """A loop part: ``spec`` itself, the registered ``kind`` of that name built with no arguments, or
    ``{"name": NAME, **options}`` built with those options (``{"name": "first-block-cache", "threshold": 0.1}``)."""
    if not isinstance(spec, (str, dict)):
        return spec
    from qi_core.plugin_host import host

    options = dict(spec) if isinstance(spec, dict) else {"name": spec}
    if not isinstance(options.get("name"), str):
        raise InvalidInputError(f"a {kind} given as a dict needs its registered 'name', got {spec!r}")
    return host().registry.get(kind, options.pop("name")).load()(**options)


def apply_options(pipe: Any, options: dict[str, Any], *, call: bool = False) -> list[Callable[[], Any]]:
    """Apply registered options (``qi_register_options``) in order; their undos, latest first. ``call``: options
    given to a pipeline call, where only ``per_call`` ones are allowed. If one fails, those applied are undone."""
    from qi_core.plugin_host import host

    undos: list[Callable[[], Any]] = []
    try:
        for key, value in options.items():
            entry = host().registry.get("option", key)
            if call and not entry.meta.get("per_call"):
                raise InvalidInputError(
                    f"{key} is set when the pipeline is built: qi.compose(..., {key}=...)"
                )
            undo = entry.load()(pipe, value)
            if undo is not None:
                undos.insert(0, undo)
    except BaseException:
        undo_all(undos)
        raise
    return undos


def check_option(name: str, value: Any) -> None:
    """Refuse a bad value of the registered option ``name`` (or alias) with its ``check``, before any use."""
    from qi_core.plugin_host import host
    from qi_core.registry import Entry

    entry = host().registry.get("option", name)
    if entry.meta.get("check") is not None:  # a callable or "module:attribute"
        Entry("option", name, entry.meta["check"], entry.plugin).load()(value)


def undo_all(undos: list[Callable[[], Any]]) -> None:
    for undo in undos:
        undo()


class Pipeline:
    """A composed pipeline: loaded components by role, a schedule, injectors, a memory policy."""

    def __init__(self, name: str, components: dict[str, Any], scheduler: Any, injectors: Iterable[Injector],
                 *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 defaults: dict[str, Any] | None = None, memory: dict[str, Any] | None = None,
                 model: str | None = None, guider: Any = None, sampler: Any = None,
                 step_runner: Any = None, required: Iterable[str] = (), roles: dict[str, str] | None = None):  # fmt: skip
        self.name = name
        self.components = dict(components)
        self.scheduler = scheduler
        self.injectors: list[Injector] = list(injectors)
        self.device, self.dtype = torch.device(device), dtype
        self.defaults = dict(defaults or {})
        self.memory = memory
        self.model = model
        self.adapters: list[Any] = []
        self.required = tuple(required)  # call parameters a call must give (the recipe's)
        # which component plays which part in the loop (the recipe's roles: its denoiser is the component of
        # kind "denoiser"); the official layout's names unless the recipe says otherwise
        self.roles = {**ROLES, **(roles or {})}
        # sees every intermediate tensor of a single call (of a batch: each item's before and after denoising)
        self.tracer: Callable[[str, torch.Tensor], None] | None = None
        # registered parts of the loop (objects, or names resolved on first use)
        self.guider = guider if guider is not None else DEFAULT_PARTS["guider"]
        self.sampler = sampler if sampler is not None else DEFAULT_PARTS["sampler"]
        self.step_runner = step_runner if step_runner is not None else DEFAULT_PARTS["step_runner"]

    # -- parts -----------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:  # pipe.dit, pipe.vae, pipe.text_encoder
        components = self.__dict__.get("components", {})
        if name in components:
            return components[name]
        raise AttributeError(f"pipeline has no attribute or component {name!r}")

    def using(self, role: str):
        """Context manager around one use of a component, yielding it (its memory policy moves the weights)."""
        model = self.components.get(role)
        if model is None:
            have = ", ".join(self.components) or "none"
            raise MissingComponentError(
                f"pipeline {self.name!r} has no {role!r} component (loaded: {have}); compose it with that role"
            )
        policy = (self.memory or {}).get(role)
        return nullcontext(model) if policy is None else policy.use(model)

    @property
    def size_multiple(self) -> int:
        vae, dit = self.components.get(self.roles["autoencoder"]), self.components.get(self.roles["denoiser"])
        return int(getattr(vae, "scale_factor", 8)) * int(getattr(dit, "patch_size", 2))

    def declarations(self) -> list[type[CallParams]]:
        """The parameter declarations of the loop and of every injector, in call order."""
        return [LoopParams, *(inj.Params for inj in self.injectors)]

    def parameters(self) -> dict[str, Any]:
        """Every call parameter this pipeline accepts, with its default."""
        params = dict(BASE_PARAMS)
        for inj in self.injectors:
            params.update(inj.params)
        params.update(self.defaults)
        return params

    def parameter_specs(self) -> list[dict[str, Any]]:
        """``[{name, type (JSON schema), default, description, required, kind}]`` of every call parameter."""
        return specs(self.declarations(), self.defaults, self.required)

    def part(self, kind: str, spec: Any) -> Any:
        return build_part(kind, spec)

    @property
    def batch_cfg(self) -> bool:
        """Whether the step runner sends the sides through each denoiser layer together."""
        return bool(getattr(self._runner(), "batch", False))

    @batch_cfg.setter
    def batch_cfg(self, on: bool) -> None:
        self._runner().batch = bool(on)

    def _runner(self) -> Any:
        self.step_runner = self.part("step_runner", self.step_runner)
        return self.step_runner

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
        undos = apply_options(self, self._options(kwargs), call=True)
        try:
            state = self.new_state(kwargs)
            check_required(self.name, self.required, state.params, self.declarations())
            with torch.inference_mode():
                return self._run_batch(state) if state.items else self._run(state)
        finally:
            undo_all(undos)

    def _options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Take the keywords that are registered options (not call parameters) out of ``kwargs``."""
        from qi_core.plugin_host import host

        reg, accepted = host().registry, self.parameters()
        names = {n for e in reg.entries("option") for n in (e.name, *e.aliases)} - set(accepted)
        return {k: kwargs.pop(k) for k in list(kwargs) if k in names}

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
        params = validate(self.declarations(), {**accepted, **kwargs})
        self._check_core(params)
        if params["seed"] is None:
            params["seed"] = random.randrange(2**31)
        guider = self.part("guider", params["guidance"] if params["guidance"] is not None else self.guider)
        sampler = self.part("sampler", params["sampler"] if params["sampler"] is not None else self.sampler)
        sides, items = tuple(guider.sides(params)), self._items(params)
        new = lambda p, tracer: RunState(p, self.device, self.dtype, sides=sides, tracer=tracer)  # noqa: E731
        state = new(params, None if items else self.trace)
        state.items = [new(p, self.trace) for p in items]
        for s in (state, *state.items):
            s.data["guider"], s.data["sampler"] = guider, sampler
        return state

    @staticmethod
    def _items(p: dict[str, Any]) -> list[dict[str, Any]]:
        """A batch's items' parameters (prompt-major; image j of a prompt uses seed + j), or [] for a single
        call: one prompt string, one image (a negative_prompt list of one becomes its string)."""
        prompts = [p["prompt"]] if isinstance(p["prompt"], str) else list(p["prompt"])
        negs, n = p["negative_prompt"], p["num_images_per_prompt"]
        negs = [negs] * len(prompts) if isinstance(negs, str) else list(negs)
        if len(negs) != len(prompts):
            e = InvalidInputError(f"negative_prompt is a list of {len(negs)} for {len(prompts)} prompt(s); "
                                  "give one per prompt, or one string for all")  # fmt: skip
            e.param = "negative_prompt"
            raise e
        if p["seed"] + n - 1 > 2**64 - 1:
            e = InvalidInputError(f"seed + num_images_per_prompt - 1 must be at most 2**64 - 1, got seed "
                                  f"{p['seed']}")  # fmt: skip
            e.param = "seed"
            raise e
        if isinstance(p["prompt"], str) and n == 1:
            p["negative_prompt"] = negs[0]
            return []
        return [{**p, "prompt": a, "negative_prompt": b, "seed": p["seed"] + j, "num_images_per_prompt": 1}
                for a, b in zip(prompts, negs, strict=True) for j in range(n)]  # fmt: skip

    def _check_core(self, p: dict[str, Any]) -> None:
        """What the declarations cannot say: the size multiple depends on the loaded models."""
        m = self.size_multiple
        h, w = p["height"], p["width"]
        if h % m or w % m:
            hs = sorted({max(m, h // m * m), -(-h // m) * m})
            ws = sorted({max(m, w // m * m), -(-w // m) * m})
            raise InvalidInputError(
                f"height and width must be multiples of {m}, got {h}x{w} (HxW); nearest valid heights: "
                f"{' or '.join(map(str, hs))}, widths: {' or '.join(map(str, ws))}"
            )

    def condition(self, state: RunState) -> None:
        """The stages every use of the pipeline shares, in one order (inference, and training's encoding of a
        sample): injectors validate → schedule → injectors prepare → prompts for each guidance side."""
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
        self.encode_prompts(state)

    def _run(self, state: RunState) -> Any:
        self._start(state)
        latents = self.denoise(state)
        self.trace("final_latents", latents)
        return self._end(state, latents)

    def _run_batch(self, batch: RunState) -> list[Any]:
        """Each item started and decoded as alone; denoised together: one sampler over the stacked latents."""
        for s in batch.items:
            self._start(s)
        batch.sigmas, batch.timesteps = batch.items[0].sigmas, batch.items[0].timesteps
        batch.latents = torch.cat([s.latents for s in batch.items])
        latents = self.denoise(batch).split([s.latents.shape[0] for s in batch.items])
        return [self._end(s, x) for s, x in zip(batch.items, latents, strict=True)]

    def _start(self, state: RunState) -> None:
        """Conditioning, noise and the latents entering step 0 (``state.latents``)."""
        p = state.params
        self.condition(state)
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

    def _end(self, state: RunState, latents: torch.Tensor) -> Any:
        out = self.decode(state, latents)
        for inj in self.injectors:
            inj.finish(self, state)
        return out

    def noise(self, state: RunState) -> torch.Tensor:
        """Seeded Gaussian noise, drawn on ``rand_device`` in the pipeline dtype (DiffSynth-compatible)."""
        p, vae = state.params, self.components[self.roles["autoencoder"]]
        f = vae.scale_factor
        shape = (state.target_frames, vae.latent_channels, p["height"] // f, p["width"] // f)
        gen = torch.Generator(p["rand_device"]).manual_seed(int(p["seed"]))
        noise = torch.randn(shape, generator=gen, device=p["rand_device"], dtype=self.dtype)
        return noise.to(self.device)

    def encode_prompts(self, state: RunState) -> None:
        sides = state.sides
        with self.using(self.roles["text_encoder"]) as te:
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
        """Integrate from ``state.latents`` with the call's sampler; returns the final latents."""
        sigmas = state.sigmas
        full = torch.cat([sigmas, sigmas.new_zeros(1)])  # the step after the last goes to σ = 0
        with self.using(self.roles["denoiser"]) as dit:

            def velocity(latents: torch.Tensor, i: int, sigma: torch.Tensor) -> torch.Tensor:
                return self.velocity(state, dit, latents, i, sigma)

            return state.data["sampler"].sample(velocity, state.latents, full, state=state)

    def denoise_inputs(self, state: RunState, latents: torch.Tensor, i: int,
                       timestep: torch.Tensor) -> dict[str, DenoiseInput]:  # fmt: skip
        """One :class:`DenoiseInput` per guidance side for step ``i``, extended by every injector."""
        inputs = {}
        for side in state.sides:
            inp = DenoiseInput(latents=latents, timestep=timestep, text=list(state.prompts[side]),
                               target_frames=state.target_frames)  # fmt: skip
            for inj in self.injectors:
                inj.denoise_input(self, state, side, i, inp)
            inputs[side] = inp
        return inputs

    def timestep(self, state: RunState, i: int, sigma: torch.Tensor) -> torch.Tensor:
        """The denoiser's timestep (1,) of step ``i`` at ``sigma`` (see :func:`timestep_at`)."""
        t = timestep_at(self.scheduler, state.sigmas, state.timesteps, i, sigma)
        return t.to(device=self.device, dtype=self.dtype)

    def velocity(self, state: RunState, dit: Any, latents: torch.Tensor, i: int,
                 sigma: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The guided velocity of step ``i`` at ``sigma``: inputs → step runner → guider → injectors. In a
        batch (stacked latents), every item's inputs, labelled ``(item, side)``, go to one step run."""
        state.sigma, items = sigma, state.items or [state]
        xs = latents.split([s.latents.shape[0] for s in items]) if state.items else [latents]
        label = (lambda k, side: (k, side)) if state.items else (lambda k, side: side)  # noqa: E731
        t, inputs = self.timestep(state, i, sigma), {}
        for k, (s, x) in enumerate(zip(items, xs, strict=True)):
            s.sigma = sigma
            inputs.update({label(k, side): inp for side, inp in self.denoise_inputs(s, x, i, t).items()})
        if "memory_prepared" not in state.data:  # the denoiser's first evaluation in this call
            state.data["memory_prepared"] = self._prepare_memory(dit, list(inputs.values()), state.timesteps)
        preds = self._runner().run(dit, inputs, state=state, step=i, sigma=sigma)
        trace = self.trace if not state.items else lambda *_: None  # the tracer follows single calls
        out = []
        for k, (s, x) in enumerate(zip(items, xs, strict=True)):
            mine = {side: preds[label(k, side)] for side in s.sides}
            for side in s.sides:
                trace(f"noise_pred_{side[:4]}_step_{i}", mine[side])
            v = s.data["guider"].combine(mine, params=s.params, step=i, sigma=float(sigma))
            trace(f"noise_pred_step_{i}", v)
            for inj in self.injectors:
                v = inj.velocity(self, s, i, v, x)
            out.append(v)
        return torch.cat(out) if state.items else out[0]

    def _prepare_memory(self, dit: Any, inputs: list[DenoiseInput], timesteps: torch.Tensor) -> bool:
        """Show the denoiser's memory policy the call before its first step (its optional ``prepare``: the
        first evaluation's inputs, one per side, and every timestep of the schedule), e.g. to compute what
        depends on the timestep alone for all steps at once. What it sets up ends with the ``using`` block.
        Returns whether the policy has the hook."""
        prepare = getattr((self.memory or {}).get(self.roles["denoiser"]), "prepare", None)
        if prepare is None:
            return False
        prepare(dit, inputs, timesteps=timesteps.to(self.device, self.dtype))
        return True

    def decode(self, state: RunState, latents: torch.Tensor) -> Any:
        kind = state.params["output_type"]
        if kind == "latent":
            return latents
        with self.using(self.roles["autoencoder"]) as vae:
            image = vae.decode(latents, **state.vae_kwargs())
        self.trace("image_float", image)
        if kind == "np":
            arrays = [x.permute(1, 2, 0).float().cpu().numpy().astype(np.float32) for x in image]
            return arrays[0] if state.target_frames == 1 and not state.frames_as_list else arrays
        if state.target_frames == 1 and not state.frames_as_list:
            return tensor_to_image(image.mean(dim=0))
        return [tensor_to_image(x) for x in image]
