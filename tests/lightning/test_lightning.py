"""Lightning: its schedule (golden ``scheduler`` rows), the ``lightning`` adapter and its recipes."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import GOLDEN_MODEL, golden_case
from safetensors.torch import save_file

import qi_core as qi
from qi_core import plugin_host
from qi_core.errors import InvalidInputError, PluginError
from qi_core.recipe import Component, Recipe
from qi_plugins.lightning import BorrowedComponents
from qi_plugins.lightning.parts import LightningAdapter, lightning_lora

CASE, T, _ = golden_case("scheduler")
ROWS = [r for r in CASE["rows"] if r["template"] == "Qwen-Image-Lightning"]
TOL = {g: t["recommended_atol"] for g, t in CASE["tolerances"].items()}


@pytest.mark.parametrize("row", ROWS, ids=[r["table"] for r in ROWS])
def test_lightning_rows(row):
    sigmas, timesteps = qi.get_scheduler("qwen-image-lightning").schedule(
        row["num_inference_steps"], height=row["height"], width=row["width"],
        denoising_strength=row["denoising_strength"], exponential_shift_mu=row["exponential_shift_mu"],
    )  # fmt: skip
    assert sigmas.dtype == timesteps.dtype == torch.float32
    torch.testing.assert_close(sigmas, T[row["table"] + "_sigmas"], atol=TOL["sigmas_and_weights"], rtol=0)
    torch.testing.assert_close(timesteps, T[row["table"] + "_timesteps"], atol=TOL["timesteps"], rtol=0)


def test_lightning_schedule_ignores_resolution_and_never_stretches():
    s = qi.get_scheduler("qwen-image-lightning")
    a, _ = s.schedule(4, height=64, width=64)
    b, _ = s.schedule(4, height=2048, width=2048)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, torch.tensor([1.0, 0.9, 0.75, 0.5]))  # σ' = 3σ / (1 + 2σ), μ = ln 3
    assert math.isclose(s.fixed_mu, math.log(3)) and s.shift_terminal is None


def tiny_lora(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random lightx2v-style LoRA (diffusion_model. + down/up + alpha) for the tiny DiT's attention."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for b in range(2):
        for m in ("to_q", "to_k", "img_mod.1"):
            stem = f"diffusion_model.transformer_blocks.{b}.{'attn.' if m.startswith('to') else ''}{m}"
            out = 384 if m == "img_mod.1" else 64
            sd[f"{stem}.lora_down.weight"] = torch.randn(4, 64, generator=g) * 0.1
            sd[f"{stem}.lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.1
            sd[f"{stem}.alpha"] = torch.tensor(4.0)
    return sd


@pytest.fixture(scope="module")
def pipe():
    return qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False)


def test_adapter_switches_schedule_defaults_and_weights(pipe):
    base_sched, base_defaults = pipe.scheduler, dict(pipe.defaults)
    base_w = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    adapter = LightningAdapter(lora=tiny_lora(), steps=4)
    adapter.apply(pipe)
    try:
        assert pipe.scheduler.name == "qwen-image-lightning"
        assert pipe.defaults["num_inference_steps"] == 4 and pipe.defaults["cfg_scale"] == 1.0
        seen = {}
        pipe.tracer = lambda k, v: seen.__setitem__(k, v)
        pipe("a cat", height=32, width=32, seed=1, output_type="latent", progress_bar_cmd=lambda x: x)
        torch.testing.assert_close(seen["sigmas"], torch.tensor([1.0, 0.9, 0.75, 0.5]))
        assert "noise_pred_nega_step_0" not in seen  # cfg 1: no negative pass
        assert len([k for k in seen if k.startswith("latents_step_")]) == 4
        w = pipe.dit.transformer_blocks[0].attn.to_q.weight
        assert not torch.equal(w, base_w["transformer_blocks.0.attn.to_q.weight"])
    finally:
        pipe.tracer = None
        adapter.remove(pipe)
    assert pipe.scheduler is base_sched and pipe.defaults == base_defaults
    assert all(torch.equal(v, pipe.dit.state_dict()[k]) for k, v in base_w.items())


def test_adapter_by_name_fetches_the_hub_lora(tmp_path, monkeypatch):
    calls = []

    def fake(model_id, local_dir, patterns):
        calls.append((model_id, patterns))
        if model_id == "lightx2v/Qwen-Image-Lightning":
            local_dir.mkdir(parents=True, exist_ok=True)
            save_file(tiny_lora(), local_dir / patterns[0])

    monkeypatch.setenv("QI_MODEL_DIR", str(tmp_path))
    monkeypatch.setattr(plugin_host.host().registry.get("source", "modelscope"), "obj", fake)
    p = qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False, adapters=["lightning"])
    assert calls == [("lightx2v/Qwen-Image-Lightning", ["Qwen-Image-Lightning-8steps-V1.0.safetensors"])]
    assert [a.name for a in p.adapters] == ["lightning"] and p.defaults["num_inference_steps"] == 8
    # the recipe: same weights, schedule and defaults; the file is not fetched again
    r = qi.compose("qwen-image-lightning", model=GOLDEN_MODEL, progress=False)
    assert len(calls) == 1 and r.scheduler.name == "qwen-image-lightning"
    assert r.defaults["num_inference_steps"] == 8 and r.defaults["cfg_scale"] == 1.0
    call = dict(
        prompt="a fox", height=32, width=32, seed=2, output_type="latent", progress_bar_cmd=lambda x: x
    )
    assert torch.equal(p(**call), r(**call))


def test_lora_choice_per_pipeline_and_step_errors(pipe):
    assert lightning_lora("qwen-image")[1] == "Qwen-Image-Lightning-{steps}steps-V1.0.safetensors"
    assert lightning_lora("qwen-image-lightning")[0] == "lightx2v/Qwen-Image-Lightning"
    model_id, file, steps = lightning_lora("qwen-image-edit-2511-lightning")
    assert (
        model_id == "lightx2v/Qwen-Image-Edit-2511-Lightning"
        and steps == 4
        and "4steps" in file.format(steps=4)
    )
    assert lightning_lora("qwen-image-edit-2509")[1].startswith("Qwen-Image-Edit-Lightning")
    assert lightning_lora("qwen-image-eligen")[1].startswith("Qwen-Image-Lightning")
    with pytest.raises(InvalidInputError, match="exist for 4 or 8 steps, not 6"):
        LightningAdapter(steps=6).apply(pipe)
    with pytest.raises(InvalidInputError, match="steps must be a positive integer"):
        LightningAdapter(steps=0)
    assert pipe.scheduler.name == "qwen-image" and not pipe.adapters  # nothing changed


def test_recipes_are_registered_by_name():
    r = plugin_host.host().registry.get("pipeline", "qwen-image-edit-2511-lightning").load()
    assert r.scheduler == "qwen-image-lightning" and r.adapters == ("lightning",)
    assert r.injectors == ("input-image", "edit-image")
    assert r.defaults == {
        "num_inference_steps": 4,
        "cfg_scale": 1.0,
        "zero_cond_t": True,
        "edit_image_form": "list",
    }
    assert isinstance(r.components, BorrowedComponents) and r.components.recipe == "qwen-image-edit-2511"


def test_borrowed_components_follow_the_named_recipe():
    plugin_host.reset()
    try:
        borrowed = BorrowedComponents("borrow-me")
        with pytest.raises(PluginError, match="'borrow-me', which is not registered"):
            list(borrowed)
        comps = {"dit": Component(part="qwen-image-dit", subfolder="transformer", kind="denoiser"),
                 "processor": Component(part="some-processor", subfolder="processor")}  # fmt: skip
        qi.register("pipeline", "borrow-me", Recipe(name="borrow-me", description="d", components=comps,
                                                     scheduler="qwen-image"))  # fmt: skip
        assert (
            dict(borrowed) == comps and len(borrowed) == 2 and borrowed["processor"].subfolder == "processor"
        )
    finally:
        plugin_host.reset()
