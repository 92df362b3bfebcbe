"""``qi.compose(NAME, model="tiny")`` works for every registered pipeline: its tiny model, with the LoRAs,
ControlNets and other repositories the recipe names, is built locally and deterministically, loads offline and
runs one small step on the inputs the pipeline declares."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tiny_helpers
from PIL import Image

import qi_core as qi
from qi_core.composer import TINY, TINY_HUB
from qi_core.errors import MissingComponentError

# the shared fixtures: one build and one composition per pipeline for both test modules
offline = tiny_helpers.offline
tiny_cache_dir = tiny_helpers.tiny_cache_dir
tiny_pipeline = tiny_helpers.tiny_pipeline
pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: a second thread only waits
NAMES = [r.name for r in qi.pipelines()]
SIZE = 64  # the smallest size every pipeline takes comfortably (multiples of 16)
# Parameters that would blow a 64-px call up to real sizes: edit images are resized to ~1024² by default.
FAST = {"edit_image_auto_resize": False}
# What one conditioning entry needs besides its image (the inpaint ControlNet also reads a mask).
ENTRY_EXTRAS = {"qwen-image-blockwise-controlnet-inpaint": ("inpaint_mask",)}


def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def mask() -> Image.Image:
    m = np.zeros((SIZE, SIZE), dtype=np.uint8)
    m[:, : SIZE // 2] = 255  # left half: the region to redraw
    return Image.fromarray(m)


SYNTH = {"image": image, "mask": mask, "images": lambda: [image()], "masks": lambda: [mask()]}


def inputs(pipe) -> dict:
    """The call's inputs from the pipeline's declarations: every required one, and structured conditioning
    (kind ``entries``, e.g. ControlNet inputs) so the component that reads it runs too."""
    out = {}
    for spec in pipe.parameter_specs():
        name, kind = spec["name"], spec["kind"]
        if name in FAST:
            out[name] = FAST[name]
        if not (spec["required"] or kind == "entries"):
            continue
        if kind == "entries":
            entry = {"image": image(), **{k: mask() for k in ENTRY_EXTRAS.get(pipe.name, ())}}
            out[name] = [entry]
        else:
            out[name] = SYNTH[kind]()
    return out


@pytest.mark.parametrize("name", NAMES)
def test_tiny_model_runs_one_step(name, tiny_pipeline, tiny_cache_dir):
    pipe = tiny_pipeline(name)
    assert pipe.model == TINY
    assert (tiny_cache_dir / "tiny" / name / "model_index.json").is_file()
    out = pipe(prompt="a red cube", height=SIZE, width=SIZE, num_inference_steps=1, seed=0, output_type="np",
               progress_bar_cmd=lambda x: x, **inputs(pipe))  # fmt: skip
    frames = out if isinstance(out, list) else [out]  # layered pipelines return the composite and each layer
    for frame in frames:
        assert frame.shape[:2] == (SIZE, SIZE) and frame.shape[2] in (3, 4), frame.shape
        assert np.isfinite(frame).all()


def test_every_pipeline_has_a_tiny_model():
    assert [r.name for r in qi.pipelines() if r.tiny is None] == []


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_tiny_build_is_deterministic(offline, tiny_cache_dir, tmp_path):
    """Built twice, the same bytes (here the recipe with the most extra repositories: a DiT, a VAE and a LoRA)."""
    from qi_core.composer import tiny_model
    from qi_core.plugin_host import host
    from qi_core.registry import Entry

    recipe = host().registry.get("pipeline", "qwen-image-layered-control").load()
    cached = tiny_model(recipe)
    build = Entry("pipeline", recipe.name, recipe.tiny, "").load()
    fresh = build(tmp_path / "again", seed=0)
    assert (cached / TINY_HUB).is_dir()
    assert _digest(fresh) == _digest(cached)


def test_a_hub_id_the_tiny_model_lacks_is_an_error_not_a_download(tiny_pipeline):
    tiny_pipeline("qwen-image")  # built (its tiny model serves no LoRA repositories)
    with pytest.raises(MissingComponentError, match="local hub"):
        qi.compose("qwen-image", model="tiny", adapters=["lightning"], progress=False)
