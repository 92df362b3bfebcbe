"""Recipes: a named composition of registered parts. Light: no torch here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Component:
    """One model slot of a recipe."""

    part: str  # registered encoder/denoiser name that loads it
    subfolder: str | None  # folder inside the model repository (official layout); None = not loaded from it
    kind: str = "encoder"  # registry kind of ``part``: "encoder" or "denoiser"
    required: bool = True  # a missing folder is an error (else the slot stays empty)
    model: str | None = None  # hub id or folder it comes from, when not the pipeline's model (an extra model)
    pattern: str | None = None  # files to fetch from ``model`` (glob, e.g. "model.safetensors")


@dataclass(frozen=True)
class Recipe:
    """A named pipeline: which parts to load from which folders, with which defaults."""

    name: str  # what users pass to qi.compose
    description: str  # one line for `qi pipelines`
    components: Mapping[str, Component]  # role -> component ("text_encoder", "dit", "vae", …)
    scheduler: str  # registered scheduler name
    injectors: tuple[str, ...] = ()  # registered injector names, in call order
    adapters: tuple[str, ...] = ()  # adapters always applied (after loading)
    defaults: Mapping[str, Any] = field(default_factory=dict)  # call-parameter defaults
    model: str | None = None  # default model: ModelScope / Hugging Face id or folder
    model_ids: tuple[str, ...] = ()  # hub ids whose weights this recipe serves
    tiny: str | None = None  # "module:function(out_dir, seed=0)" writing a tiny random model (model="tiny")
    guidance: str = "cfg"  # registered guider used unless compose/the call picks another
    sampler: str = "euler"  # registered sampler used unless compose/the call picks another
    required: tuple[str, ...] = ()  # call parameters a call must give (e.g. the image an edit model edits)
