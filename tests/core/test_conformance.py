"""Every registered pipeline, composed on its tiny model, is made of parts that keep the core's contracts: each
component follows the runtime protocol of its role, the schedule has both entry points, and every injector is
an ``Injector`` with a declared, described ``Params``."""

from __future__ import annotations

import pytest
import tiny_helpers
import torch

import qi_core as qi
from qi_core.params import CallParams
from qi_core.plugin_host import host
from qi_core.protocols import Autoencoder, Denoiser, Injector, TextEncoder

# the shared fixtures: one build and one composition per pipeline for both test modules
offline = tiny_helpers.offline
tiny_cache_dir = tiny_helpers.tiny_cache_dir
tiny_pipeline = tiny_helpers.tiny_pipeline
pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: a second thread only waits
NAMES = [r.name for r in qi.pipelines()]
# role (the registry's ``role=`` of an encoder, or the denoiser kind) → the protocol its component follows
PROTOCOLS = {"denoiser": Denoiser, "text_encoder": TextEncoder, "vae": Autoencoder}


def recipe(name: str):
    return host().registry.get("pipeline", name).load()


@pytest.mark.parametrize("name", NAMES)
def test_components_follow_their_protocols(name, tiny_pipeline):
    pipe, r = tiny_pipeline(name), recipe(name)
    assert set(pipe.components) == set(r.components)  # every slot built: the tiny model lacks nothing
    roles = set()
    for role, comp in r.components.items():
        entry = host().registry.get(comp.kind, comp.part)
        kind = "denoiser" if comp.kind == "denoiser" else entry.meta.get("role")
        roles.add(kind)
        protocol = PROTOCOLS.get(kind)
        if protocol is not None:
            assert isinstance(pipe.components[role], protocol), f"{role}: not a {protocol.__name__}"
        if kind == "lora":  # a LoRA the recipe ships: its files were served by the tiny model's hub
            assert pipe.components[role].files, f"{role}: no LoRA file"
    assert {"denoiser", "text_encoder", "vae"} <= roles


@pytest.mark.parametrize("name", NAMES)
def test_scheduler_and_adapters(name, tiny_pipeline):
    pipe, r = tiny_pipeline(name), recipe(name)
    sigmas, timesteps = pipe.scheduler.schedule(2, height=64, width=64)
    assert sigmas.shape == timesteps.shape == (2,) and sigmas.dtype == torch.float32
    sigmas, timesteps, weights = pipe.scheduler.training_schedule(10)
    assert sigmas.shape == timesteps.shape == weights.shape == (10,)
    assert len(pipe.adapters) == len(r.adapters)  # each applied (its LoRA found in the tiny model's hub)


@pytest.mark.parametrize("name", NAMES)
def test_injectors_declare_their_parameters(name, tiny_pipeline):
    pipe, r = tiny_pipeline(name), recipe(name)
    assert set(r.injectors) <= {i.name for i in pipe.injectors}  # adapters may add their own
    declared = set()
    for inj in pipe.injectors:
        assert isinstance(inj, Injector)
        assert isinstance(inj.Params, type) and issubclass(inj.Params, CallParams)
        for field, info in inj.Params.model_fields.items():
            assert info.description, f"{inj.name}: parameter {field!r} has no description"
        assert inj.params == {k: f.default for k, f in inj.Params.model_fields.items()}
        declared |= set(inj.Params.model_fields)
    assert set(r.required) <= declared  # what a call must give, an injector declares
