"""``qi.compose``: build a pipeline from a registered recipe by name."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qi_core.errors import InvalidInputError
from qi_core.plugin_host import host


def default_dtype(device: str) -> Any:
    import torch

    return torch.float32 if str(device).startswith("cpu") else torch.bfloat16


def compose(name: str, model: str | os.PathLike | None = None, *, device: str = "cpu", torch_dtype: Any = None,
            adapters: list[Any] | tuple[Any, ...] = (), memory: str | Any = "none",
            components: dict[str, Any] | None = None, downloader: Any = None, progress: bool = True,
            roles: Any = None, guidance: str | Any = None, sampler: str | Any = None,
            step_runner: str | Any = "batched", attention: str | Any = None, **options: Any) -> Any:  # fmt: skip
    """Build the pipeline ``name`` (see ``qi pipelines``) with weights from ``model``.

    ``model``: a folder in the official layout, or a hub id (ModelScope by default; ``hf:ORG/NAME`` for
    Hugging Face). Defaults to the recipe's own model id. ``adapters``: registered adapter names or
    :class:`~qi_core.protocols.Adapter` instances, applied in order. ``memory``: a memory policy or preset
    name for every component, or ``{role: name}`` per component (roles not named stay resident), or policy
    objects.
    ``components``: per-role weights overriding the recipe (a folder, a file, a list of files, or an object
    whose ``resolve()`` returns its files, fetching them itself), e.g. ``{"dit": "my_finetune.safetensors"}``.
    ``downloader``: ``fetch(model_id, local_dir, patterns)`` replacing the source for the hub ids it resolves.
    ``roles``: load only these component roles (the others stay absent), e.g. ``{"dit"}`` for the second
    stage of split training; None loads every role.
    ``guidance``, ``sampler``, ``step_runner``: registered loop parts by name, ``{"name": NAME, **options}``
    (``step_runner={"name": "first-block-cache", "threshold": 0.1}``) or objects; the first two
    default to the recipe's and can be changed per call. ``attention``: a registered attention backend given
    to every component with ``set_attention`` (None keeps the denoiser's own, torch's SDPA).
    ``**options``: options registered by plugins (``qi plugins`` lists them), applied in order once the pipeline is built, e.g.
    ``cache="fbcache"``, ``compile=True``, ``parallel={"cfg": 2}``.
    """
    import torch

    from qi_core.devices import check_device
    from qi_core.loading import component_folder, component_source, load_component, resolve_model_root
    from qi_core.pipeline import Pipeline, apply_options, build_part, check_option

    reg = host().registry
    recipe = reg.get("pipeline", name).load()
    device = check_device(device)
    # parts by name are checked before any weight loads
    parts = {kind: build_part(kind, spec)
             for kind, spec in (("guider", guidance or recipe.guidance), ("sampler", sampler or recipe.sampler),
                                ("step_runner", step_runner))}  # fmt: skip
    for key, value in options.items():  # known and checked before any weight loads
        check_option(key, value)
    backend = reg.get("attention", attention).load() if isinstance(attention, str) else attention
    dtype = torch_dtype or default_dtype(device)
    if not isinstance(dtype, torch.dtype):
        raise InvalidInputError(f"torch_dtype must be a torch.dtype such as torch.bfloat16, got {dtype!r}")
    source = model if model is not None else recipe.model
    if source is None:
        raise InvalidInputError(f"pipeline {name!r} has no default model; pass model='folder or hub id'")
    hub = None  # the tiny model's extra repositories are served from its folder, never fetched
    if _is_tiny(source):
        root = tiny_model(recipe)
        hub = root / TINY_HUB
    else:
        subfolders = [
            c.subfolder for r, c in recipe.components.items() if c.subfolder and (roles is None or r in roles)
        ]
        root = resolve_model_root(source, [*subfolders, "tokenizer", "scheduler"], downloader=downloader)

    policies = memory_policies(memory, list(recipe.components))
    overrides = dict(components or {})  # read before ``components`` is reused for the loaded parts below
    components: dict[str, Any] = {}
    only = None if roles is None else set(roles)
    roles = list(recipe.components.items())
    bar = _bar(len(roles), f"loading {name}", progress)
    unknown = [r for r in (*overrides, *(only or ())) if r not in recipe.components]
    if unknown:
        raise InvalidInputError(
            f"pipeline {name!r} has no component {unknown[0]!r}; its components are {', '.join(recipe.components)}"
        )
    for role, comp in roles:
        if only is not None and role not in only:
            bar.update(1)
            continue
        if role in overrides:
            folder = component_source(overrides[role])
        elif comp.model is not None:
            pats = [comp.pattern] if comp.pattern else None
            folder = resolve_model_root(
                comp.model, [comp.subfolder or ""], downloader=downloader, patterns=pats, hub=hub
            )
            folder = folder / comp.subfolder if comp.subfolder else folder
        elif comp.subfolder is not None and not (Path(root) / comp.subfolder).is_dir() and not comp.required:
            bar.update(1)
            continue
        else:
            folder = component_folder(Path(root), comp.subfolder) if comp.subfolder else Path(root)
        factory = reg.get(comp.kind, comp.part).load()
        # the policy reads the weights when the factory takes ``load`` and gets back what it read at attach
        loaded = load_component(
            factory, policies[role], root=Path(root), folder=folder, device=device, dtype=dtype
        )
        components[role] = policies[role].attach(loaded, device=device, dtype=dtype)
        bar.update(1)
    bar.close()

    scheduler = reg.get("scheduler", recipe.scheduler).load()()
    injectors = [reg.get("injector", n).load()() for n in recipe.injectors]
    if backend is not None:
        for comp in components.values():
            if hasattr(comp, "set_attention"):
                comp.set_attention(backend)
    pipe = Pipeline(name, components, scheduler, injectors, device=device, dtype=dtype,
                    defaults=dict(recipe.defaults), memory=policies, model=os.fspath(source),
                    required=recipe.required, roles=loop_roles(recipe), **parts)  # fmt: skip
    for a in (*recipe.adapters, *adapters):
        adapter = reg.get("adapter", a).load()() if isinstance(a, str) else a
        adapter.apply(pipe)
        pipe.adapters.append(adapter)
    apply_options(pipe, options)
    return pipe


def loop_roles(recipe: Any) -> dict[str, str]:
    """Which of the recipe's components is the loop's denoiser (its component of kind ``denoiser``)."""
    denoisers = [r for r, c in recipe.components.items() if c.kind == "denoiser"]
    return {"denoiser": denoisers[0]} if len(denoisers) == 1 else {}


def memory_policies(memory: Any, roles: list[str]) -> dict[str, Any]:
    """One policy object per component role. Factories are called as ``factory(role=role)``."""
    reg = host().registry

    def make(spec: Any, role: str) -> Any:
        if isinstance(spec, str):
            return reg.get("memory_policy", spec).load()(role=role)
        return spec

    if isinstance(memory, dict):
        unknown = [r for r in memory if r not in roles]
        if unknown:
            raise InvalidInputError(
                f"memory names component {unknown[0]!r}; components are {', '.join(roles)}"
            )
        return {r: make(memory.get(r, "none"), r) for r in roles}
    return {r: make(memory, r) for r in roles}


TINY = "tiny"
TINY_HUB = "hub"  # subfolder of a tiny model holding the extra repositories its recipe names, as ORG/NAME


def _is_tiny(model: Any) -> bool:
    return model == TINY and not Path(TINY).is_dir()


def model_hub(pipe: Any) -> Path | None:
    """The local hub serving the hub ids ``pipe``'s adapters name (``resolve_model_root(..., hub=)``): its tiny
    model's ``hub/`` when composed with ``model="tiny"``, else None (they are downloaded)."""
    if not _is_tiny(getattr(pipe, "model", None)):
        return None
    return tiny_model(host().registry.get("pipeline", pipe.name).load()) / TINY_HUB


def cache_dir() -> Path:
    return Path(os.environ.get("QI_CACHE_DIR", Path.home() / ".cache" / "qi"))


def tiny_model(recipe: Any) -> Path:
    """The recipe's built-in tiny random model, built once into the cache (``model="tiny"``)."""
    from qi_core.registry import Entry

    if recipe.tiny is None:
        raise InvalidInputError(
            f"pipeline {recipe.name!r} has no built-in tiny model; pass a folder or hub id"
        )
    folder = cache_dir() / "tiny" / recipe.name
    if not (folder / "model_index.json").exists():
        build = Entry("pipeline", recipe.name, recipe.tiny, "").load()
        build(folder, seed=0, overwrite=True)
    return folder


def declarations(recipe: Any) -> list[Any]:
    """The call-parameter declarations of a recipe (the loop's, then its injectors'), without loading weights."""
    from qi_core.pipeline import LoopParams

    reg = host().registry
    out = [LoopParams]
    for name in recipe.injectors:
        factory = reg.get("injector", name).load()
        out.append(getattr(factory, "Params", None) or factory().Params)
    return out


def describe(recipe: Any) -> dict[str, Any]:
    """A recipe as ``qi pipelines --json`` lists it: name, description, plugin, default model, whether it has a
    built-in tiny model, and every call parameter (``qi_core.params.specs``)."""
    from qi_core.params import specs

    return {
        "name": recipe.name,
        "description": recipe.description,
        "plugin": host().registry.get("pipeline", recipe.name).plugin,
        "default_model": recipe.model,
        "tiny": recipe.tiny is not None,
        "guidance": recipe.guidance,
        "sampler": recipe.sampler,
        "parameters": specs(declarations(recipe), recipe.defaults, recipe.required),
    }


def check_call(name: str, values: dict[str, Any]) -> dict[str, Any]:
    """Validate call parameters for pipeline ``name`` before anything loads (the command line does this)."""
    from qi_core.params import check_required, validate

    recipe = host().registry.get("pipeline", name).load()
    models = declarations(recipe)
    checked = validate(models, {**dict(recipe.defaults), **values})
    check_required(name, recipe.required, checked, models)
    return checked


def get_scheduler(name: str) -> Any:
    """A registered schedule by name, e.g. ``qi.get_scheduler("qwen-image")``."""
    return host().registry.get("scheduler", name).load()()


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled or total <= 1, leave=False)
