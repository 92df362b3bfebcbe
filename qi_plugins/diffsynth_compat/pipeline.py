"""``QwenImagePipeline``: DiffSynth-Studio's front door over a ``qi.compose`` pipeline.

DiffSynth has one pipeline whose behaviour follows the loaded weights and the call arguments; qi composes a
recipe. This class maps one onto the other: ``from_pretrained`` resolves the ``ModelConfig`` s, lets the
weights (their architecture, :mod:`~qi_plugins.diffsynth_compat.probe`), the given configs and the plugins'
model ids pick the recipe (:mod:`~qi_plugins.diffsynth_compat.resolve`), stages the files as an official model
root (:mod:`~qi_plugins.diffsynth_compat.staging`) and composes it; a call uses DiffSynth's defaults and, like
DiffSynth's all-units pipeline, accepts every parameter some installed injector serves.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

import qi_core as qi
from qi_core.composer import cache_dir
from qi_core.errors import InvalidInputError, PluginError
from qi_core.loading import Fetch
from qi_core.plugin_host import host
from qi_plugins.diffsynth_compat.config import _POSITIONAL, ModelConfig, default_tokenizer_config
from qi_plugins.diffsynth_compat.detect import detect_role
from qi_plugins.diffsynth_compat.helpers import as_lora_state_dict
from qi_plugins.diffsynth_compat.memory import policy_for, policy_name
from qi_plugins.diffsynth_compat.probe import PartProbe, taking
from qi_plugins.diffsynth_compat.resolve import Weights, assign_roles, choose_recipe, folder_hint
from qi_plugins.diffsynth_compat.staging import stage

_DEFAULT_TOKENIZER = object()  # sentinel: DiffSynth's default tokenizer_config
# attributes of the wrapper itself; everything else is the qi pipeline's
_OWN = ("pipe", "recipe", "_configs")


def as_model_config(value: Any) -> ModelConfig:
    """Ours, DiffSynth's own dataclass (anything with its fields), or a path string."""
    if isinstance(value, ModelConfig):
        return value
    if isinstance(value, (str, os.PathLike)):
        return ModelConfig(path=os.fspath(value))
    if hasattr(value, "model_id") and hasattr(value, "path"):
        fields = {k: getattr(value, k) for k in _POSITIONAL if getattr(value, k, None) is not None}
        return ModelConfig(**fields)
    raise InvalidInputError(
        f"expected a ModelConfig (path=... or model_id=..., origin_file_pattern=...), got {type(value).__name__}"
    )


def FlowMatchScheduler(template: str = "Qwen-Image") -> Any:  # noqa: N802 — DiffSynth's class name
    """DiffSynth's ``FlowMatchScheduler(template)``: the registered schedule of that name, lower-cased
    (``"Qwen-Image-Lightning"`` → ``qi.get_scheduler("qwen-image-lightning")``). Assign it to
    ``pipe.scheduler``."""
    return qi.get_scheduler(str(template).lower())


class QwenImagePipeline:
    """A composed qi pipeline behind DiffSynth-Studio's ``QwenImagePipeline`` interface.

    Components are attributes (``pipe.dit``, ``pipe.vae``, ``pipe.text_encoder``); ``pipe.pipe`` is the qi
    pipeline and ``pipe.recipe`` the name of the recipe the model ids selected.
    """

    def __init__(self, pipe: Any, recipe: str, configs: dict[str, ModelConfig] | None = None):
        object.__setattr__(self, "pipe", pipe)
        object.__setattr__(self, "recipe", recipe)
        object.__setattr__(self, "_configs", dict(configs or {}))

    # -- loading ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, torch_dtype: torch.dtype = torch.bfloat16, device: str | torch.device | None = None,
                        model_configs: Sequence[Any] = (), tokenizer_config: Any = _DEFAULT_TOKENIZER,
                        processor_config: Any = None, vram_limit: float | None = None, *,
                        recipe: str | None = None, downloader: Fetch | None = None,
                        progress: bool = False) -> QwenImagePipeline:  # fmt: skip
        """Load the models like DiffSynth-Studio does.

        ``model_configs``: one ``ModelConfig`` per model (DiT, text encoder, VAE, ControlNets in
        ``controlnet_id`` order …), by hub id or by ``path=`` alone: the weights say what they are, and an id no
        plugin declares (a community fine-tune) loads as its architecture. ``tokenizer_config`` defaults to
        ``Qwen/Qwen-Image:tokenizer/`` (``None``: the processor folder's tokenizer); ``processor_config``
        (``Qwen/Qwen-Image-Edit:processor/``) is needed by the edit models and picks a recipe that loads it.
        ``vram_limit`` (GiB) bounds the layers kept resident by the policies the ``*_device``/``*_dtype``
        fields select (see :mod:`~qi_plugins.diffsynth_compat.memory`). qi additions: ``recipe=`` forces a
        pipeline by name, ``downloader=`` replaces the hub client.
        """
        device = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        if not isinstance(torch_dtype, torch.dtype):
            raise InvalidInputError(
                f"torch_dtype must be a torch.dtype such as torch.bfloat16, got {torch_dtype!r}"
            )
        if isinstance(model_configs, (ModelConfig, str)):
            model_configs = [model_configs]
        configs = [as_model_config(c) for c in model_configs]
        if not configs:
            raise InvalidInputError(
                "model_configs is empty: pass one ModelConfig per model (DiT, text encoder, VAE)"
            )
        weights = []
        for i, c in enumerate(configs):
            files = c.files(downloader)
            hint = folder_hint(c.origin_file_pattern if c.model_id else None, files)
            w = Weights(files, c.model_id if c.path is None else None, hint, c.describe(), i)
            w.shapes  # noqa: B018 — reads every header now: a truncated file fails here, naming itself
            weights.append(w)

        if tokenizer_config is _DEFAULT_TOKENIZER:
            tokenizer_config = default_tokenizer_config()
        extra: dict[str, Path] = {}
        hints: list[str] = []
        for sub, cfg in (("tokenizer", tokenizer_config), ("processor", processor_config)):
            if cfg is not None:
                cfg = as_model_config(cfg)
                extra[sub] = cfg.folder(downloader)
                hints += [cfg.model_id] if cfg.model_id and cfg.path is None else []
        if "tokenizer" not in extra and "processor" in extra and _has_tokenizer(extra["processor"]):
            # tokenizer_config=None (DiffSynth's edit examples): the VL processor folder holds the same
            # Qwen2 tokenizer files, and the text encoder still needs them for prompts without images
            extra["tokenizer"] = extra["processor"]

        reg = host().registry
        if recipe is not None:
            chosen = reg.get("pipeline", recipe).load()
        else:
            ids = [w.model_id for w in weights if w.model_id]
            roles = {detect_role(w.shapes) for w in weights} - {None}
            probe = PartProbe()
            try:
                chosen = choose_recipe(ids, qi.pipelines(), hints, roles, extras=extra,
                                       taking=lambda pool: taking(pool, weights, probe))  # fmt: skip
            finally:
                probe.close()
        by_role = assign_roles(weights, chosen)
        root, overrides = stage(cache_dir() / "diffsynth_compat", chosen, by_role, extra)

        role_configs = {role: configs[ws[0].index] for role, ws in by_role.items()}
        memory: dict[str, Any] = {
            role: policy_for(cfg, role, device=device, vram_limit=vram_limit)
            for role, cfg in role_configs.items()
        }
        pipe = qi.compose(chosen.name, model=root, device=device, torch_dtype=torch_dtype, memory=memory,
                          components=overrides, downloader=downloader, progress=progress)  # fmt: skip
        pipe.defaults = {}  # DiffSynth has one set of call defaults whatever the weights (cfg 4, 1328², 30 steps)
        pipe.required = ()  # and requires no input but the prompt: an edit model without edit_image draws from text
        return cls(pipe, chosen.name, role_configs)

    # -- calling ---------------------------------------------------------------------------------------
    def __call__(self, prompt: str | None = None, **kwargs: Any) -> Any:
        """Generate with DiffSynth's parameters (and qi's ``output_type``: "pil", "np" or "latent")."""
        if prompt is not None:
            kwargs["prompt"] = prompt
        accepted = self.pipe.parameters()
        unknown = [k for k in kwargs if k not in accepted]
        for k in [k for k in unknown if kwargs[k] is None]:
            del kwargs[k]  # DiffSynth's "not used"; an injector for it need not exist
        unknown = [k for k in unknown if k in kwargs]
        if unknown:
            self.add_injectors_for(unknown)
            self._check_known(kwargs)
        original = self._round_size(kwargs)
        if original is None:
            return self.pipe(**kwargs)
        real = self.pipe.scheduler
        self.pipe.scheduler = _ScheduleAt(real, *original)
        try:
            return self.pipe(**kwargs)
        finally:
            self.pipe.scheduler = real

    def add_injectors_for(self, params: Iterable[str]) -> list[str]:
        """Add registered injectors that consume ``params`` (DiffSynth runs every unit; qi adds the injector
        on first use). Returns the names added; a parameter no injector serves is reported by the call."""
        todo = set(params)
        have = {i.name for i in self.pipe.injectors}
        pool = []
        for entry in host().registry.entries("injector"):
            if entry.name in have:
                continue
            inj = entry.load()()
            if set(inj.params) & todo:
                pool.append(inj)
        added = []
        while todo and pool:
            best = min(pool, key=lambda i: (-len(set(i.params) & todo), len(i.params), i.name))
            if not set(best.params) & todo:
                break
            self.pipe.add_injector(best)
            added.append(best.name)
            todo -= set(best.params)
            pool.remove(best)
        return added

    def _check_known(self, kwargs: dict[str, Any]) -> None:
        accepted = self.pipe.parameters()
        unknown = [k for k in kwargs if k not in accepted]
        if not unknown:
            return
        known = set(accepted)
        for entry in host().registry.entries("injector"):
            known |= set(entry.load()().params)
        close = difflib.get_close_matches(unknown[0], sorted(known), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise InvalidInputError(
            f"no installed plugin takes the parameter {unknown[0]!r}.{hint} Parameters of this pipeline and its "
            f"plugins: {', '.join(sorted(known))}"
        )

    def _round_size(self, kwargs: dict[str, Any]) -> tuple[int, int] | None:
        """DiffSynth rounds height/width up to the size multiple (printing a note) and sets the schedule from
        the size it was given. Returns that size when rounding happened."""
        m = self.pipe.size_multiple
        params = {**self.pipe.parameters(), **kwargs}
        h, w = params["height"], params["width"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w)):
            return None  # the pipeline reports the bad value
        if h % m == 0 and w % m == 0:
            return None
        for side, v in (("height", h), ("width", w)):
            if v % m:
                kwargs[side] = -(-v // m) * m
                print(f"{side} % {m} != 0. We round it up to {kwargs[side]}.")
        return h, w

    # -- LoRA ------------------------------------------------------------------------------------------
    def load_lora(self, module: Any, lora_config: Any = None, alpha: float = 1.0, hotload: bool | None = None,
                  state_dict: dict[str, Any] | None = None, verbose: int = 1) -> Any:  # fmt: skip
        """DiffSynth's ``pipe.load_lora(pipe.dit, path_or_ModelConfig, alpha=...)``: fused into the weights,
        or kept as separate branches with ``hotload=True`` (the default for models under a streaming memory
        policy, as in DiffSynth). Returns the qi LoRA adapter."""
        try:
            from qi_plugins.lora.adapter import LoRA
        except ImportError as e:
            raise PluginError(f"pipe.load_lora needs qi's lora plugin (qi_plugins.lora): {e}") from e
        role = self._role_of(module)
        if state_dict is not None:
            source: Any = as_lora_state_dict(state_dict)  # any layout the LoRA plugin reads (PEFT, kohya …)
        elif lora_config is None:
            raise InvalidInputError("load_lora needs a LoRA: a file path, a ModelConfig or state_dict=")
        else:
            files = as_model_config(lora_config).files()
            if len(files) == 1:
                source = str(files[0])
            else:
                from safetensors.torch import load_file

                source = {k: v for f in files for k, v in load_file(str(f)).items()}
        if hotload is None:
            hotload = (
                role in self._configs
                and policy_name(self._configs[role], device=str(self.pipe.device))[0] != "none"
            )
        adapter = LoRA(source, scale=alpha, fuse=not hotload, target=role)
        adapter.apply(self.pipe)
        self.pipe.adapters.append(adapter)
        if verbose >= 1 and hotload:
            print("LoRA hot-loaded as separate branches. You can use `pipe.clear_lora()` to clear them.")
        return adapter

    def clear_lora(self, verbose: int = 1) -> int:
        """Remove the hot-loaded (unfused) LoRAs, as DiffSynth's ``clear_lora``; fused ones stay."""
        from qi_plugins.lora.adapter import LoRA

        hot = [a for a in self.pipe.adapters if isinstance(a, LoRA) and not a.fuse]
        for a in hot:
            a.remove(self.pipe)  # also drops it from pipe.adapters
            if a in self.pipe.adapters:
                self.pipe.adapters.remove(a)
        if verbose >= 1:
            print(f"{len(hot)} LoRA(s) are cleared.")
        return len(hot)

    def _role_of(self, module: Any) -> str:
        components = self.pipe.components
        if isinstance(module, str) and module in components:
            return module
        for role, comp in components.items():
            if (
                comp is module
                or getattr(comp, "model", None) is module
                or getattr(comp, "module", None) is module
            ):
                return role
        raise InvalidInputError(
            f"load_lora: {type(module).__name__} is not a model of this pipeline; pass pipe.dit (components: "
            f"{', '.join(components)})"
        )

    # -- DiffSynth attributes --------------------------------------------------------------------------
    @property
    def torch_dtype(self) -> torch.dtype:
        return self.pipe.dtype

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    def __getattr__(self, name: str) -> Any:  # pipe.dit, pipe.scheduler, pipe.tracer …
        return getattr(object.__getattribute__(self, "pipe"), name)

    def __setattr__(self, name: str, value: Any) -> None:  # pipe.scheduler = FlowMatchScheduler(...)
        if name in _OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.pipe, name, value)

    def __repr__(self) -> str:
        return f"QwenImagePipeline(recipe={self.recipe!r}, components={list(self.pipe.components)})"


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json"))


class _ScheduleAt:
    """The pipeline's schedule, computed for the size the user asked for (before rounding up)."""

    def __init__(self, schedule: Any, height: int, width: int):
        self._schedule, self._size = schedule, (height, width)

    def schedule(self, num_inference_steps: int, **kw: Any) -> Any:
        kw["height"], kw["width"] = self._size
        return self._schedule.schedule(num_inference_steps, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._schedule, name)
