from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
GOLDEN_MODEL = GOLDEN / "models" / "qwen_image"

torch.set_num_threads(2)


def golden_case(name: str) -> tuple[dict, dict[str, torch.Tensor], Path]:
    from safetensors.torch import load_file

    folder = GOLDEN / "cases" / name
    case = json.loads((folder / "case.json").read_text())
    tensors = load_file(folder / "tensors.safetensors") if (folder / "tensors.safetensors").exists() else {}
    return case, tensors, folder


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("single_thread")``): tiny
    tensors gain nothing from more, and a second thread stalls on a busy shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def with_fixture_plugins(monkeypatch):
    """A fresh plugin host that also finds the fixture plugins of ``tests/fixtures/plugins`` (entry points)."""
    from qi_core import plugin_host

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "fixtures" / "plugins"))
    plugin_host.reset()
    yield
    plugin_host.reset()


@pytest.fixture
def fresh_host():
    """A plugin host built anew for the test (and again after it): registrations made in the test vanish."""
    from qi_core import plugin_host

    plugin_host.reset()
    yield
    plugin_host.reset()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Our own tiny random model (``qi make-tiny-model``), built once per session."""
    from qi_plugins.qwen_image.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen-image")


def golden_call(case: dict, folder: Path) -> dict:
    """The case's DiffSynth call arguments with every ``{"$image": file}`` opened as a PIL image (nested too)."""
    from PIL import Image

    def value(v):
        if isinstance(v, dict) and "$image" in v:
            with Image.open(folder / v["$image"]) as im:
                return im.copy()
        if isinstance(v, dict):
            return {k: value(x) for k, x in v.items()}
        if isinstance(v, list):
            return [value(x) for x in v]
        return v

    return {k: value(v) for k, v in case["call"].items()}


def tolerance_group(name: str) -> str:
    """The golden README's tolerance group of a recorded tensor."""
    if "prompt_emb" in name:
        return "text_embedding"
    if name.startswith(("fused_weight.", "lora.", "lora_image_")):
        return "weights"
    if name == "image_float" or name.startswith("vae_decode"):
        return "image_float"
    if name == "sigmas":
        return "sigmas_and_weights"
    if name == "timesteps":
        return "timesteps"
    return "latents"
