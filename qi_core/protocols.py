"""Runtime protocols of the parts plugins register, and the data the generic loop hands them.

Sequence layout seen by a denoiser (one CFG side)::

    [ text segment 0 | … | text segment n-1 | target image tokens | extra image segment 0 | … ]

Text segments come from :attr:`DenoiseInput.text` (the global prompt is the last one; regional-prompt
injectors put their segments before it). Image segments are the target latents, then :attr:`DenoiseInput.images` in order (context
image, edit images, layer input …). Every image segment gets its own RoPE frame (its index in that list,
target = 0, unless the segment says otherwise) and its own modulation index (0 = the step's timestep; other
indices select :attr:`DenoiseInput.extra_timesteps`). Only the target tokens are returned.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from qi_core.params import CallParams, undeclared

if TYPE_CHECKING:
    import torch

    from qi_core.conditioning import Conditioning
    from qi_core.loading import Loaded
    from qi_core.pipeline import Pipeline, RunState


@dataclass
class TextSegment:
    """One run of text tokens."""

    emb: torch.Tensor  # (B, L, D_txt) encoder hidden states
    mask: torch.Tensor | None = None  # (B, L) 1 = real token, 0 = padding; None = all real
    rope_offset: int | None = None  # first RoPE text position; None = after the largest image grid


@dataclass
class ImageSegment:
    """Extra image tokens appended after the target (edit image, context image, layer input …)."""

    latents: torch.Tensor  # (B, C, h, w) normalised latents, patchified by the denoiser
    frame: int | None = None  # RoPE frame index; None = position in the image list (target = 0)
    modulation: int = 0  # 0 = modulate with the step timestep; k>0 = with extra_timesteps[k-1]
    rope_from_target: bool = False  # sample the target's spatial RoPE grid (low-res edit images)


BlockHook = Callable[[int, "torch.Tensor", "torch.Tensor"], "torch.Tensor"]
"""``hook(block_index, img, txt) -> img`` called after each denoiser block; img is (B, N_img, D)."""


@dataclass
class DenoiseInput:
    """Everything one denoiser call sees (one CFG side, one step)."""

    latents: torch.Tensor  # (B*F, C, h, w) target latents; F = target_frames
    timestep: torch.Tensor  # (B,) timesteps in [0, 1000]
    text: list[TextSegment]  # global prompt last
    images: list[ImageSegment] = field(default_factory=list)
    extra_timesteps: list[float] = field(default_factory=list)  # timesteps for modulation indices 1..
    attention_mask: torch.Tensor | None = None  # additive (B, 1, S, S) over the joint sequence, or None
    block_hooks: list[BlockHook] = field(default_factory=list)
    target_frames: int = 1  # frames of the target folded into the batch axis
    extras: dict[str, Any] = field(default_factory=dict)  # variant-specific inputs keyed by injector name


@runtime_checkable
class Denoiser(Protocol):
    """Required: ``__call__(inp)``. Optional: ``forward_many(inputs, *, stack=False) -> list`` (several
    independent inputs — the CFG sides — layer by layer, so each layer runs, and moves, once per step; each
    result must equal its own ``__call__``; with ``stack``, a batch's inputs, stacked along B where they can
    be), ``patch_size``, and whatever a memory policy's ``prepare`` looks for (the memory plugin:
    the timestep-only state, ``modulation_layers`` …)."""

    def __call__(self, inp: DenoiseInput) -> torch.Tensor:
        """Return the velocity of the target latents, shaped like ``inp.latents``."""


@runtime_checkable
class TextEncoder(Protocol):
    """Prompt → text tokens (``qi_register_encoders``, role ``text_encoder``)."""

    def encode_prompt(self, prompt: str, *, images: Sequence[Any] | None = None, template: str | None = None,
                      drop: int | None = None, max_tokens: int | None = None,
                      processor: Any = None) -> TextSegment:  # fmt: skip
        """Encode one prompt (optionally with images for vision-language templates).

        ``template``: a format string around the prompt; ``drop``: leading template tokens removed from the
        result (None: the default template's); ``max_tokens``: prompt tokens kept after them (None: the
        encoder's limit); ``processor``: the vision-language processor for this call (None: the encoder's own).
        Injectors pass these through :meth:`Injector.prompt_inputs`.
        """


@runtime_checkable
class Autoencoder(Protocol):
    """Image ↔ normalised latents (``qi_register_encoders``, role ``vae``)."""

    latent_channels: int  # z, the channels of a latent
    scale_factor: int  # pixels per latent along each side (8)
    image_channels: int  # channels of the images it encodes and decodes: 3 (RGB) or 4 (RGBA)

    def encode(
        self, image: torch.Tensor, *, tiled: bool = False, tile_size: Any = 128, tile_stride: Any = 64
    ):
        """(B, C, H, W) in [-1, 1] → normalised latents (B, z, H/8, W/8)."""

    def decode(self, z: torch.Tensor, *, tiled: bool = False, tile_size: Any = 128, tile_stride: Any = 64):
        """Normalised latents → (B, C, H, W), not clamped."""


class Injector:
    """Base class of conditioning injectors. Override what you need; every method has a no-op default.

    The generic loop calls, in order: ``validate`` → ``prepare`` → ``prompt_inputs`` (per CFG side) →
    ``initial_latents`` → per step and side ``denoise_input`` → per step ``velocity`` → ``finish``.
    """

    name: str = ""
    #: The call parameters it consumes, declared (type, default, constraints, description, kind); see
    #: :mod:`qi_core.params`. ``params`` is derived from it: {name: default}.
    Params: type[CallParams] = CallParams
    params: dict[str, Any] = {}
    #: Training: decoders of metadata columns holding files, ``{column: loader(path, size) -> value}``
    #: (:mod:`qi_core.sizing`; default RGB sized like the target). Read per run from the pipeline's injectors.
    file_loaders: dict[str, Callable[..., Any]] = {}
    #: Training: ``{columns: adapter({column: value}) -> {call parameter: value}}`` for ``--extra_inputs``
    #: columns that are not call parameters themselves (:func:`qi_plugins.sft.encoding.adapt_columns`).
    column_adapters: dict[tuple[str, ...], Callable[..., Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Params" in cls.__dict__:
            cls.params = {k: f.default for k, f in cls.Params.model_fields.items()}
        elif "params" in cls.__dict__:  # an undeclared {name: default} dict: any value, no description
            cls.Params = undeclared(f"{cls.__name__}Params", cls.params)

    def validate(self, pipe: Pipeline, state: RunState) -> None:
        """Check the call parameters; raise :class:`qi_core.errors.InvalidInputError`."""

    def prepare(self, pipe: Pipeline, state: RunState) -> None:
        """Once per call, before prompts are encoded: encode images, build masks; store on ``state.data``."""

    def prompt_inputs(self, pipe: Pipeline, state: RunState, side: str) -> dict[str, Any]:
        """Extra keyword arguments for ``TextEncoder.encode_prompt`` (``images``, ``template``)."""
        return {}

    def initial_latents(self, pipe: Pipeline, state: RunState, noise: torch.Tensor) -> torch.Tensor | None:
        """Return the latents entering step 0 instead of the noise (img2img), or None."""
        return None

    def denoise_input(self, pipe: Pipeline, state: RunState, side: str, step: int, inp: DenoiseInput) -> None:
        """Add tokens, masks, block hooks or extras to ``inp`` for one denoiser call."""

    def velocity(
        self, pipe: Pipeline, state: RunState, step: int, velocity: torch.Tensor, latents: torch.Tensor
    ) -> torch.Tensor:
        """Adjust the guided velocity before the Euler step (inpaint blending)."""
        return velocity

    def finish(self, pipe: Pipeline, state: RunState) -> None:
        """After decoding."""


class Adapter:
    """Base class of adapters: ``apply`` changes a built pipeline; ``remove`` undoes it."""

    name: str = ""

    def apply(self, pipe: Pipeline) -> None:
        raise NotImplementedError(f"adapter {self.name!r} does not implement apply()")

    def remove(self, pipe: Pipeline) -> None:
        raise NotImplementedError(f"adapter {self.name!r} cannot be removed")


class MemoryPolicy(Protocol):
    """Where one component's weights live. Required: ``attach`` and ``use``. Optional:

    * ``load(build, files, *, device, dtype, what)`` — read one module itself (e.g. leave layers on disk);
      the composer hands factories a ``load`` that asks it (:class:`qi_core.loading.PolicyLoader`). Returns
      an object whose ``module`` is the built module, handed back to ``attach`` in ``Loaded.reads``; None =
      the default loader reads everything.
    * ``prepare(model, inputs, *, timesteps)`` — called inside ``use`` at the denoiser's first evaluation of
      a call with its inputs (one per guidance side) and every timestep of the schedule, e.g. to compute what
      depends on the timestep alone for every step at once; what it sets up ends with the ``use``.
    """

    name: str

    def attach(self, loaded: Loaded, *, device: Any, dtype: Any) -> Any:
        """Place a freshly loaded component (``loaded.component``, with what ``load`` read in
        ``loaded.reads``); return it (possibly wrapped)."""

    def use(self, model: Any) -> AbstractContextManager[Any]:
        """Context manager around one use of ``model`` on the compute device."""


@runtime_checkable
class Guider(Protocol):
    """How the per-side predictions of one step combine (``qi_register_guiders``)."""

    def sides(self, params: Mapping[str, Any]) -> tuple[str, ...]:
        """The denoiser passes each step needs: ``("positive", "negative")`` or ``("positive",)``."""

    def combine(self, preds: Mapping[str, torch.Tensor], *, params: Mapping[str, Any], step: int,
                sigma: float) -> torch.Tensor:  # fmt: skip
        """The guided velocity from ``{side: prediction}``."""


@runtime_checkable
class Sampler(Protocol):
    """How the flow ODE is integrated (``qi_register_samplers``)."""

    def sample(self, velocity: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor], latents: torch.Tensor,
               sigmas: torch.Tensor, *, state: Any) -> torch.Tensor:  # fmt: skip
        """Integrate from ``sigmas[0]`` to ``sigmas[-1]`` (``num_inference_steps + 1`` entries)."""


@runtime_checkable
class StepRunner(Protocol):
    """How one step's inputs become predictions (``qi_register_step_runners``)."""

    def run(self, denoiser: Any, inputs: Mapping[Hashable, DenoiseInput], *, state: Any, step: int,
            sigma: torch.Tensor) -> dict[Hashable, torch.Tensor]:  # fmt: skip
        """One prediction per input, under its label, shaped like its latents. Labels are any hashable: a
        call's guidance sides (``"positive"``, ``"negative"``); in a batch (``state.items``, one state per
        item), ``(item index, side)`` for every item."""


AttentionBackend = Callable[
    ["torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor | None"], "torch.Tensor"
]
"""``backend(q, k, v, mask) -> out`` over (B, H, S, D) tensors (``qi_register_attention``)."""


class TrainingTask(Protocol):
    """A training loss (``qi_register_training_tasks``): the trainer loads rows, has the task encode them,
    batches the results and steps the optimizer on ``loss``."""

    name: str
    required_columns: tuple[str, ...]  # metadata columns every row needs a value in, e.g. ("image", "prompt")

    def configure(self, args: Any) -> None:
        """Read the run's training arguments (e.g. timestep boundaries) before the first sample."""

    def encode(self, pipe: Pipeline, sample: dict[str, Any], **kw: Any) -> Conditioning:
        """One row (files loaded, ``"_where"`` naming it) → its conditioning; usually
        the training plugin's ``encode_sample`` (``kw``: ``extra_inputs``, ``overrides``)."""

    def loss(self, pipe: Pipeline, batch: Conditioning, generator: Any) -> torch.Tensor:
        """The loss of one batch (a 0-d tensor); ``generator``: one ``torch.Generator`` per sample."""


def component_module(component: Any) -> Any:
    """The ``torch.nn.Module`` behind a pipeline component (wrappers such as the text encoder keep theirs in
    ``.model`` or ``.module``), or None."""
    from torch import nn

    if isinstance(component, nn.Module):
        return component
    for attr in ("module", "model"):
        inner = getattr(component, attr, None)
        if isinstance(inner, nn.Module):
            return inner
    return None
