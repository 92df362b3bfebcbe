"""The built-in tiny model: official layout readable by diffusers; our DiT and VAE agree with it there too."""

from __future__ import annotations

import hashlib

import pytest
import torch
from tolerance import TINY_DIT_TERMS, check_vs_reference

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
    out = []
    for dtype in (torch.float32, torch.float64):  # float64: the maths; float32 within its error bound of it
        ours, ref = ours.to(dtype), ref.to(dtype)
        with torch.no_grad():
            t = torch.tensor([500.0], dtype=dtype)
            got = ours(DenoiseInput(latents=x.to(dtype), timestep=t, text=[TextSegment(txt.to(dtype))]))
            want = ref(hidden_states=ours.patchify(x.to(dtype)), encoder_hidden_states=txt.to(dtype),
                       timestep=t / 1000, img_shapes=[[(1, 3, 5)]], return_dict=False)[0]  # fmt: skip
        out += [ours.patchify(got), want]
    check_vs_reference(*out, terms=TINY_DIT_TERMS)


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
