"""Distill plugin: Distill-LoRA (adapter + recipe) and Distill-Full (its own DiT weights), 15 steps, cfg 1."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import GOLDEN_MODEL
from safetensors.torch import save_file

import qi_core as qi
from qi_core import plugin_host
from qi_core.errors import WeightMismatchError
from qi_plugins.distill.parts import DistillLoRA, dit_weights

CALL = dict(
    prompt="a tea pot", height=32, width=32, seed=4, output_type="latent", progress_bar_cmd=lambda x: x
)


def distill_lora(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random LoRA in DiffSynth's own layout (as DiffSynth-Studio/Qwen-Image-Distill-LoRA ships)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for b in range(2):
        for m in ("attn.to_v", "attn.add_v_proj", "img_mlp.net.2"):
            d_in = 256 if m.endswith("net.2") else 64
            sd[f"transformer_blocks.{b}.{m}.lora_A.default.weight"] = torch.randn(4, d_in, generator=g) * 0.1
            sd[f"transformer_blocks.{b}.{m}.lora_B.default.weight"] = torch.randn(64, 4, generator=g) * 0.1
    return sd


def test_distill_lora_recipe_and_adapter(tmp_path, monkeypatch):
    calls = []

    def fake(model_id, local_dir, patterns):
        calls.append((model_id, patterns))
        local_dir.mkdir(parents=True, exist_ok=True)
        save_file(distill_lora(), local_dir / patterns[0])

    monkeypatch.setenv("QI_MODEL_DIR", str(tmp_path))
    monkeypatch.setattr(plugin_host.host().registry.get("source", "modelscope"), "obj", fake)
    pipe = qi.compose("qwen-image-distill-lora", model=GOLDEN_MODEL, progress=False)
    assert calls == [("DiffSynth-Studio/Qwen-Image-Distill-LoRA", ["model.safetensors"])]
    assert pipe.scheduler.name == "qwen-image"  # Distill-LoRA keeps the Qwen-Image schedule
    assert pipe.defaults["num_inference_steps"] == 15 and pipe.defaults["cfg_scale"] == 1.0
    seen = {}
    pipe.tracer = lambda k, v: seen.__setitem__(k, v)
    out = pipe(**CALL)
    assert (
        len([k for k in seen if k.startswith("latents_step_")]) == 15 and "noise_pred_nega_step_0" not in seen
    )

    # the same through the adapter on the base pipeline, with the LoRA given locally
    base = qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False)
    without = base(**CALL, num_inference_steps=15, cfg_scale=1.0)
    adapter = DistillLoRA(lora=distill_lora())
    adapter.apply(base)
    assert torch.equal(base(**CALL), out)
    adapter.remove(base)
    assert torch.equal(base(**CALL, num_inference_steps=15, cfg_scale=1.0), without)
    assert base.defaults["num_inference_steps"] == 30


def test_distill_full_loads_its_own_dit(tmp_path):
    """The DiT comes from its own repository (here: a copy of the tiny golden DiT given per role)."""
    dit_dir = tmp_path / "distill-full"
    shutil.copytree(GOLDEN_MODEL / "transformer", dit_dir)
    pipe = qi.compose(
        "qwen-image-distill-full", model=GOLDEN_MODEL, progress=False, components={"dit": dit_dir}
    )
    assert pipe.defaults["num_inference_steps"] == 15 and pipe.defaults["cfg_scale"] == 1.0
    base = qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False)
    assert torch.equal(pipe(**CALL), base(**CALL, num_inference_steps=15, cfg_scale=1.0))

    recipe = qi.pipelines()
    full = next(r for r in recipe if r.name == "qwen-image-distill-full")
    assert full.components["dit"].model == "DiffSynth-Studio/Qwen-Image-Distill-Full"
    assert (
        full.components["dit"].pattern == "diffusion_pytorch_model*"
        and full.components["dit"].subfolder is None
    )


def test_weight_only_dit_folder_assumes_the_official_config(tmp_path):
    (tmp_path / "w").mkdir()
    shutil.copy(GOLDEN_MODEL / "transformer" / "diffusion_pytorch_model.safetensors", tmp_path / "w")
    with pytest.raises(
        WeightMismatchError, match=r"missing 1856 key.*expected shape \(3072,\), found \(64,\)"
    ):
        dit_weights(
            tmp_path, tmp_path / "w", "cpu", torch.float32
        )  # no config.json: the 20 B Qwen-Image config
    shutil.copy(GOLDEN_MODEL / "transformer" / "config.json", tmp_path / "w")
    assert dit_weights(tmp_path, tmp_path / "w", "cpu", torch.float32).config.num_layers == 2
