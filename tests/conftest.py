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


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Our own tiny random model (``qi make-tiny-model``), built once per session."""
    from qi_plugins.qwen_image.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen-image")
