"""Recipes of EliGen and In-Context-Control-Union: defaults from DiffSynth-Studio's examples, the LoRA as a recipe
component fused by the recipe's adapter (checked with a stand-in LoRA class, so these tests do not depend on the
lora plugin)."""

from __future__ import annotations

import sys
import types

import pytest
from conftest import GOLDEN, GOLDEN_MODEL

import qi_core as qi
from qi_plugins.eligen import NEGATIVE_PROMPT_ZH

LORA_FILE = GOLDEN / "models" / "extra" / "lora_diffsynth.safetensors"


def test_recipe_defaults():
    r = {x.name: x for x in qi.pipelines()}
    expected = {
        "qwen-image-eligen": ({"num_inference_steps": 30, "height": 1024, "width": 1024, "negative_prompt": ""},
                              "DiffSynth-Studio/Qwen-Image-EliGen"),
        "qwen-image-eligen-v2": ({"num_inference_steps": 40, "height": 1024, "width": 1024,
                                  "negative_prompt": NEGATIVE_PROMPT_ZH}, "DiffSynth-Studio/Qwen-Image-EliGen-V2"),
        "qwen-image-eligen-poster": ({"num_inference_steps": 40, "height": 784, "width": 1280,
                                      "negative_prompt": NEGATIVE_PROMPT_ZH},
                                     "DiffSynth-Studio/Qwen-Image-EliGen-Poster"),
        "qwen-image-in-context-control-union": ({"num_inference_steps": 30, "height": 1024, "width": 1024,
                                                 "negative_prompt": NEGATIVE_PROMPT_ZH},
                                                "DiffSynth-Studio/Qwen-Image-In-Context-Control-Union"),
    }  # fmt: skip
    for name, (defaults, lora) in expected.items():
        recipe = r[name]
        assert {k: recipe.defaults[k] for k in defaults} == defaults and recipe.defaults["cfg_scale"] == 4.0
        assert (
            recipe.components["lora"].model == lora
            and recipe.components["lora"].pattern == "model.safetensors"
        )
        assert len(recipe.adapters) == 1 and recipe.model == "Qwen/Qwen-Image"
    assert r["qwen-image-in-context-control-union"].injectors == (
        "input-image",
        "context-image",
        "context-control-prefix",
    )
    assert "eligen" in r["qwen-image-eligen-poster"].injectors


class FakeLoRA:
    """Stands in for ``qi_plugins.lora.adapter.LoRA``: records what the recipe adapter asks of it."""

    log: list = []

    def __init__(self, source, scale):
        self.source, self.scale = source, scale

    def apply(self, pipe):
        FakeLoRA.log.append(("apply", self.source, self.scale, pipe.name))

    def remove(self, pipe):
        FakeLoRA.log.append(("remove", self.source))


@pytest.fixture
def fake_lora(monkeypatch):
    module = types.ModuleType("qi_plugins.lora.adapter")
    module.LoRA = FakeLoRA
    monkeypatch.setitem(sys.modules, "qi_plugins.lora.adapter", module)
    FakeLoRA.log = []
    return FakeLoRA.log


@pytest.mark.parametrize("name", ["qwen-image-eligen-v2", "qwen-image-in-context-control-union"])
def test_recipe_fuses_its_lora_component(fake_lora, name):
    pipe = qi.compose(name, model=GOLDEN_MODEL, progress=False, components={"lora": str(LORA_FILE)})
    assert fake_lora == [("apply", LORA_FILE, 1.0, name)]
    (adapter,) = pipe.adapters
    adapter.remove(pipe)
    assert fake_lora[-1] == ("remove", LORA_FILE)


def test_empty_lora_component_means_no_lora(fake_lora):
    pipe = qi.compose("qwen-image-eligen", model=GOLDEN_MODEL, progress=False, components={"lora": []})
    assert fake_lora == [] and pipe.components["lora"].files == ()
