"""A LoRA written by ``qi i2l`` loads with the LoRA loader and changes the tiny golden pipeline's output.

The i2L model here is a random tiny one sized for the tiny DiT (width 64, 2 blocks); the released models target
the 3072-wide DiT only. Needs the LoRA plugin (``qi_plugins.lora.adapter``); without it this test fails on the
import, on purpose.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import GOLDEN_MODEL
from safetensors.torch import save_file

import qi_core as qi
from qi_plugins.i2l.model import I2LConfig, Image2LoRA, save_lora

TINY = I2LConfig(num_blocks=2, use_residual=True, compress_dim=4, rank=2, residual_length=3, residual_mid_dim=4,
                 residual_dim=64, embed_dim=16, dim=64)  # fmt: skip


def tiny_i2l(folder) -> str:
    g = torch.Generator().manual_seed(5)
    model = Image2LoRA(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = folder / "tiny_i2l.safetensors"
    save_lora(model.state_dict(), path)
    (folder / "tiny_i2l.json").write_text(json.dumps({"init_args": TINY.__dict__}))
    return str(path)


def test_i2l_lora_loads_and_changes_the_output(tmp_path):
    from qi_core.cli import main
    from qi_plugins.lora.adapter import LoRA  # the LoRA plugin must exist: fail loudly otherwise

    g = torch.Generator().manual_seed(6)
    emb = {
        "image2lora_x": torch.randn(2, 1, 16, generator=g),
        "image2lora_residual": torch.randn(2, 1, 192, generator=g),
    }
    save_file(emb, str(tmp_path / "emb.safetensors"))
    out = tmp_path / "lora.safetensors"
    argv = ["i2l", "--embeddings", str(tmp_path / "emb.safetensors"), "--i2l", tiny_i2l(tmp_path), "--out", str(out),
            "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    assert main(argv) == 0

    pipe = qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False)
    args = dict(prompt="a red fox", seed=1, height=32, width=32, num_inference_steps=2, cfg_scale=1.0,
                output_type="np", progress_bar_cmd=lambda x: x)  # fmt: skip
    before = pipe(**args)
    w0 = pipe.dit.transformer_blocks[1].attn.to_q.weight.detach().clone()
    lora = LoRA(source=str(out), scale=1.0)
    lora.apply(pipe)
    try:
        after = pipe(**args)
        # the update is the mean over the two images of B_k A_k (DiffSynth layout: A (r, in), B (out, r))
        from safetensors.torch import load_file

        sd = load_file(str(out))
        a = sd["transformer_blocks.1.attn.to_q.lora_A.default.weight"]
        b = sd["transformer_blocks.1.attn.to_q.lora_B.default.weight"]
        assert a.shape == (4, 64) and b.shape == (64, 4)  # two images x rank 2
        w1 = pipe.dit.transformer_blocks[1].attn.to_q.weight
        torch.testing.assert_close(w1, w0 + b @ a, rtol=1e-5, atol=1e-5)
    finally:
        lora.remove(pipe)
    assert np.abs(after - before).max() > 1e-2
    np.testing.assert_array_equal(pipe(**args), before)  # removed cleanly


def test_image_to_lora_adapter_applies_and_removes(tmp_path):
    from qi_plugins.i2l import ImageToLoRA
    from qi_plugins.i2l.model import load_i2l

    g = torch.Generator().manual_seed(7)
    emb = {
        "image2lora_x": torch.randn(1, 1, 16, generator=g),
        "image2lora_residual": torch.randn(1, 1, 192, generator=g),
    }
    model = load_i2l(tiny_i2l(tmp_path))
    adapter = ImageToLoRA(embeddings=emb, models=[model], scale=0.5)
    pipe = qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False)
    w0 = pipe.dit.transformer_blocks[0].txt_mod[1].weight.detach().clone()
    adapter.apply(pipe)
    key = "transformer_blocks.0.txt_mod.1.lora_{}.default.weight"
    a, b = adapter.lora[key.format("A")], adapter.lora[key.format("B")]
    torch.testing.assert_close(pipe.dit.transformer_blocks[0].txt_mod[1].weight, w0 + 0.5 * b @ a)
    adapter.remove(pipe)
    assert torch.equal(pipe.dit.transformer_blocks[0].txt_mod[1].weight, w0)


def test_image_to_lora_needs_inputs():
    from qi_core.errors import InvalidInputError
    from qi_plugins.i2l import ImageToLoRA

    with pytest.raises(InvalidInputError, match="needs images"):
        ImageToLoRA()
    with pytest.raises(InvalidInputError, match="needs encoder="):
        ImageToLoRA(["a.png"])
