"""The built-in tiny model: official layout readable by diffusers; our DiT and VAE agree with it there too."""

from __future__ import annotations

import hashlib

import pytest
import torch

import qi_core as qi
from qi_plugins.qwen_image.loading import load_dit
from qi_plugins.qwen_image.tiny import make_tiny_model

diffusers = pytest.importorskip("diffusers")


def digest(folder):
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_deterministic(tiny_model, tmp_path):
    again = make_tiny_model(tmp_path / "again")
    assert digest(again) == digest(tiny_model)
    assert sorted(p.name for p in tiny_model.iterdir()) == [
        "model_index.json", "processor", "scheduler", "text_encoder", "tokenizer", "transformer", "vae",
    ]  # fmt: skip


def test_diffusers_loads_it_and_our_dit_agrees(tiny_model):
    ref = diffusers.QwenImageTransformer2DModel.from_pretrained(tiny_model / "transformer").eval()
    ours = load_dit(tiny_model / "transformer").eval()
    from qi_core.protocols import DenoiseInput, TextSegment

    x, txt = torch.randn(1, 16, 6, 10), torch.randn(1, 5, 64)
    with torch.no_grad():
        got = ours(DenoiseInput(latents=x, timestep=torch.tensor([500.0]), text=[TextSegment(txt)]))
        want = ref(hidden_states=ours.patchify(x), encoder_hidden_states=txt, timestep=torch.tensor([0.5]),
                   img_shapes=[[(1, 3, 5)]], return_dict=False)[0]  # fmt: skip
    assert (ours.patchify(got) - want).abs().max() <= 1e-5


def test_output_depends_on_prompt_and_seed(tiny_model):
    pipe = qi.compose("qwen-image", model=tiny_model, progress=False)
    call = dict(
        height=64, width=64, num_inference_steps=3, output_type="latent", progress_bar_cmd=lambda x: x
    )
    a = pipe("a red fox", seed=0, **call)
    b = pipe("a blue whale", seed=0, **call)
    c = pipe("a red fox", seed=1, **call)
    assert torch.equal(a, pipe("a red fox", seed=0, **call))
    scale = a.abs().max()
    assert (a - b).abs().max() > 0.01 * scale and (a - c).abs().max() > 0.1 * scale
