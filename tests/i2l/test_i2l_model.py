"""The image-to-LoRA model: the golden DiffSynth run (merged LoRA of two images and image 0's own LoRA),
through the API and through ``qi i2l --embeddings``; the seed's rank-concatenating merge; checks."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import GOLDEN, golden_case
from safetensors.torch import load_file, save_file

from qi_core.errors import InvalidInputError, ModelLoadError
from qi_plugins.i2l.model import I2LConfig, Image2LoRA, decode, infer_config, load_i2l, merge_loras

WEIGHTS = GOLDEN / "models" / "extra" / "i2l.safetensors"


@pytest.fixture(scope="module")
def case():
    case, tensors, _ = golden_case("i2l")
    return case, tensors, case["tolerances"]["weights"]["recommended_atol"]


@pytest.fixture(scope="module")
def model():
    return load_i2l(WEIGHTS)


def compare(lora: dict, tensors: dict, prefix: str, tol: float) -> float:
    want = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    assert set(lora) == set(want) and len(want) == 24  # 12 modules x (A, B) of block 0
    worst = 0.0
    for k, ref in want.items():
        assert lora[k].shape == ref.shape, k
        worst = max(worst, (lora[k] - ref).abs().max().item())
    assert worst <= tol, worst
    return worst


def test_golden_i2l(case, model):
    c, t, tol = case
    assert model.config == I2LConfig(**c["model_init_args"])
    compare(model.merged(t["image2lora_x"], t["image2lora_residual"]), t, "lora.", tol)
    compare(model(t["image2lora_x"][0], t["image2lora_residual"][0]), t, "lora_image_0.", tol)


def test_golden_i2l_through_the_cli(case, tmp_path, capsys):
    from qi_core.cli import main

    _, t, tol = case
    emb = tmp_path / "emb.safetensors"
    save_file({k: t[k].contiguous() for k in ("image2lora_x", "image2lora_residual")}, str(emb))
    out = tmp_path / "lora" / "i2l.safetensors"
    argv = ["i2l", "--embeddings", str(emb), "--i2l", str(WEIGHTS), "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().out and not list(out.parent.glob(".*"))  # atomic: no leftovers
    compare(load_file(str(out)), t, "lora.", tol)


def test_merging_two_images_concatenates_their_ranks(case, model):
    _, t, _ = case
    x, res = t["image2lora_x"], t["image2lora_residual"]
    merged = model.merged(x, res)
    single = [model(x[k], res[k]) for k in range(2)]
    r = model.config.rank
    for key in (k for k in merged if ".lora_A." in k):
        kb = key.replace(".lora_A.", ".lora_B.")
        assert merged[key].shape[0] == merged[kb].shape[1] == 2 * r
        for k in range(2):  # rows/columns [k·r, (k+1)·r) are image k's own LoRA, A scaled by 1/n
            torch.testing.assert_close(merged[key][k * r : (k + 1) * r], single[k][key] / 2, rtol=0, atol=0)
            torch.testing.assert_close(merged[kb][:, k * r : (k + 1) * r], single[k][kb], rtol=0, atol=0)
    # ... so the merged update is the mean of the per-image updates
    key = "transformer_blocks.0.attn.to_q.lora_A.default.weight"
    kb = key.replace("lora_A", "lora_B")
    mean = sum(s[kb].double() @ s[key].double() for s in single) / 2
    torch.testing.assert_close(merged[kb].double() @ merged[key].double(), mean)


def test_config_is_inferred_from_the_weights(case):
    sd = load_file(str(WEIGHTS))
    assert infer_config(sd) == I2LConfig(**case[0]["model_init_args"])
    style = Image2LoRA(
        I2LConfig(num_blocks=2, use_residual=False, compress_dim=3, rank=2, embed_dim=8, dim=16)
    )
    assert infer_config(style.state_dict(), dim=16) == style.config


def test_bias_lora_merges_with_alpha_one(model, case):
    _, t, _ = case
    lora = model(t["image2lora_x"][0], t["image2lora_residual"][0])
    both = merge_loras([lora, lora])
    key = "transformer_blocks.0.txt_mod.1.lora_A.default.weight"
    assert torch.equal(both[key], torch.cat([lora[key], lora[key]]))


def test_bad_inputs_and_checkpoints_fail_clearly(model, case, tmp_path):
    _, t, _ = case
    with pytest.raises(InvalidInputError, match="expects 5632"):
        model(torch.zeros(1, 100), t["image2lora_residual"][0])
    with pytest.raises(InvalidInputError, match="needs the Qwen-VL residual"):
        model(t["image2lora_x"][0])
    with pytest.raises(InvalidInputError, match=r"\(n, 1, 10752\)"):
        decode([model], t["image2lora_x"], torch.zeros(2, 1, 71 * 3584))
    with pytest.raises(InvalidInputError, match="same keys"):
        merge_loras([{"a.lora_A.w": torch.zeros(1, 2), "a.lora_B.w": torch.zeros(2, 1)}, {}])
    with pytest.raises(ModelLoadError, match="not an i2L checkpoint"):
        save_file({"x": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
        load_i2l(tmp_path / "bad.safetensors")
    sd = load_file(str(WEIGHTS))
    sd.pop("blocks.3.proj_residual.proj_out.weight")
    save_file(sd, str(tmp_path / "cut.safetensors"))
    (tmp_path / "cut.json").write_text(json.dumps({"init_args": case[0]["model_init_args"]}))
    with pytest.raises(ModelLoadError, match="missing 1 key"):
        load_i2l(tmp_path / "cut.safetensors")


def test_cli_needs_images_or_embeddings(tmp_path, capsys):
    from qi_core.cli import main

    assert main(["i2l", "--out", str(tmp_path / "x.safetensors"), "--i2l", str(WEIGHTS)]) == 2
    assert "give image files or --embeddings" in capsys.readouterr().err
    assert main(["i2l", "a.png", "--out", str(tmp_path / "x.safetensors"), "--i2l", "nope"]) == 2
    assert "neither a file nor one of style, coarse, fine" in capsys.readouterr().err
