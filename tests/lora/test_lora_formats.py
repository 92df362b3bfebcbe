"""The four LoRA layouts: detection, reading, writing, round trips, ``qi lora convert``, and format errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import GOLDEN
from lora_cases import layout, random_lora
from safetensors.torch import load_file, save_file

from qi_core.cli import main
from qi_core.errors import InvalidInputError, MissingComponentError, WeightMismatchError
from qi_plugins.lora import FORMATS, LoRAFormatError, convert_file, detect_format, read_lora, to_format
from qi_plugins.qwen_image.dit import QwenImageDiT
from qi_plugins.qwen_image.tiny import TINY_DIT

with torch.device("meta"):
    META_DIT = QwenImageDiT(TINY_DIT)


@pytest.fixture(scope="module")
def lora():
    """A random LoRA on every Linear of the tiny DiT (top-level ones included), half of it with alpha."""
    lo = random_lora(META_DIT, rank=4, seed=3)
    # bf16 tensors on a few modules: dtypes must survive conversion untouched
    for name in list(lo)[:3]:
        a, b, alpha = lo[name]
        lo[name] = (a.bfloat16(), b.bfloat16(), alpha)
    return lo


@pytest.mark.parametrize("fmt", ["diffsynth", "peft", "kohya", "comfyui", "comfyui-ab"])
def test_detect_and_read_every_layout(lora, fmt):
    sd = layout(lora, fmt)
    assert detect_format(sd) == fmt.removesuffix("-ab")
    got = read_lora(sd)
    assert sorted(got) == sorted(lora)
    for name, (a, b, alpha) in lora.items():
        w = got[name]
        assert torch.equal(w.up, b) and w.up.dtype == b.dtype
        if fmt == "peft":  # alpha was baked into A by the layout
            assert w.alpha is None
            assert torch.equal(w.down, a if alpha is None else a * (float(alpha) / a.shape[0]))
        else:
            assert torch.equal(w.down, a)
            assert (w.alpha is None) == (alpha is None) and (alpha is None or torch.equal(w.alpha, alpha))


def test_golden_files_are_detected():
    assert detect_format(load_file(GOLDEN / "models/extra/lora_diffsynth.safetensors")) == "diffsynth"
    alpha = read_lora(GOLDEN / "models/extra/lora_alpha.safetensors")
    assert detect_format(load_file(GOLDEN / "models/extra/lora_alpha.safetensors")) == "comfyui"
    assert {w.scale for w in alpha.values()} == {0.5}  # alpha 2, rank 4
    assert {"img_in", "proj_out", "transformer_blocks.0.img_mlp.net.0.proj"} <= set(alpha)


def test_kohya_names_split_back_into_module_names(lora):
    kohya = layout(lora, "kohya")
    assert "lora_unet_time_text_embed_timestep_embedder_linear_1.lora_down.weight" in kohya
    assert "lora_unet_transformer_blocks_1_img_mlp_net_0_proj.lora_up.weight" in kohya
    names = set(read_lora(kohya))
    assert {"time_text_embed.timestep_embedder.linear_1", "norm_out.linear", "transformer_blocks.0.attn.to_out.0",
            "transformer_blocks.1.attn.add_q_proj", "transformer_blocks.1.img_mlp.net.0.proj"} <= names  # fmt: skip


ALPHA_LAYOUTS = ("diffsynth", "kohya", "comfyui")  # layouts with a place for alpha


@pytest.mark.parametrize("src,via", list(itertools.permutations(FORMATS, 2)))
def test_round_trip_is_identical(lora, src, via):
    """layout → every other layout → back: the same keys and bit-identical tensors (dtypes included)."""
    no_alpha = {n: (a, b, None) for n, (a, b, _) in lora.items()}
    cases = [no_alpha]
    if src in ALPHA_LAYOUTS and via in ALPHA_LAYOUTS:
        cases.append(lora)  # alpha travels as a key between these
    for lo in cases:
        original = layout(lo, src)
        back = to_format(to_format(original, via), src)
        assert back.keys() == original.keys()
        for k, v in original.items():
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_peft_bakes_alpha_into_the_product(lora):
    peft = read_lora(to_format(layout(lora, "kohya"), "peft"))
    for name, w in read_lora(layout(lora, "kohya")).items():
        assert peft[name].alpha is None
        torch.testing.assert_close(peft[name].delta(), w.delta(), atol=1e-6, rtol=1e-6)


def test_writers_emit_the_canonical_keys(lora):
    name = "transformer_blocks.0.attn.to_out.0"
    keys = {f: set(to_format(layout(lora, "diffsynth"), f)) for f in FORMATS}
    assert f"{name}.lora_A.default.weight" in keys["diffsynth"]
    assert f"transformer.{name}.lora_B.weight" in keys["peft"]
    assert "lora_unet_transformer_blocks_0_attn_to_out_0.lora_up.weight" in keys["kohya"]
    assert f"diffusion_model.{name}.lora_down.weight" in keys["comfyui"]
    assert not any(k.endswith(".alpha") for k in keys["peft"])


def test_convert_file_and_cli(lora, tmp_path, capsys):
    src = tmp_path / "in.safetensors"
    save_file(layout(lora, "kohya"), src)
    out = convert_file(src, tmp_path / "sub" / "out.safetensors", "comfyui")
    assert detect_format(load_file(out)) == "comfyui"
    assert [p.name for p in out.parent.iterdir()] == ["out.safetensors"]  # no temp file left behind
    assert main(["lora", "convert", str(out), str(tmp_path / "ds.safetensors"), "--to", "diffsynth"]) == 0
    assert "comfyui → diffsynth" in capsys.readouterr().out
    back = load_file(tmp_path / "ds.safetensors")
    assert back.keys() == layout(lora, "diffsynth").keys()
    assert main(["lora", "info", str(src)]) == 0
    assert "layout: kohya" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse refuses an unknown layout
        main(["lora", "convert", str(src), str(tmp_path / "x.safetensors"), "--to", "onnx"])


def test_convert_errors(lora, tmp_path, capsys):
    src = tmp_path / "in.safetensors"
    save_file(layout(lora, "diffsynth"), src)
    with pytest.raises(InvalidInputError, match="unknown LoRA format 'comfy'; choose one of diffsynth, peft"):
        convert_file(src, tmp_path / "o.safetensors", "comfy")
    with pytest.raises(InvalidInputError, match=r"must end in \.safetensors"):
        convert_file(src, tmp_path / "o.pt", "peft")
    with pytest.raises(InvalidInputError, match="same file"):
        convert_file(src, src, "peft")
    with pytest.raises(MissingComponentError, match="does not exist"):
        convert_file(tmp_path / "missing.safetensors", tmp_path / "o.safetensors", "peft")
    (tmp_path / "x.ckpt").write_bytes(b"not a safetensors")
    with pytest.raises(LoRAFormatError, match="safetensors format only"):
        read_lora(tmp_path / "x.ckpt")
    # the CLI turns typed errors into a message and exit status 2
    assert main(["lora", "convert", str(tmp_path / "none.safetensors"), str(tmp_path / "o.safetensors"),
                 "--to", "kohya"]) == 2  # fmt: skip
    assert "does not exist" in capsys.readouterr().err


def test_unknown_format_is_a_typed_error():
    full = {"transformer_blocks.0.attn.to_q.weight": torch.zeros(4, 4), "img_in.bias": torch.zeros(4)}
    with pytest.raises(
        LoRAFormatError, match=r"not a LoRA: none of its 2 keys .*transformer_blocks\.0\.attn"
    ):
        read_lora(full)
    with pytest.raises(LoRAFormatError):
        detect_format({})
    mixed = {"a.lora_A.weight": torch.zeros(2, 4), "a.lora_B.weight": torch.zeros(4, 2),
             "a.dora_scale": torch.zeros(1, 4), "b.lokr_w1": torch.zeros(2)}  # fmt: skip
    with pytest.raises(
        LoRAFormatError, match=r"2 key\(s\) are not LoRA weights: 'a.dora_scale', 'b.lokr_w1'"
    ):
        read_lora(mixed)
    with pytest.raises(InvalidInputError, match="a LoRA is a .safetensors path or a state dict"):
        read_lora(42)


def test_structural_errors_name_the_module():
    a, b = torch.zeros(4, 8), torch.zeros(16, 4)
    with pytest.raises(WeightMismatchError, match=r"'blk.to_q' has no lora_B/lora_up weight"):
        read_lora({"blk.to_q.lora_A.weight": a})
    with pytest.raises(WeightMismatchError, match=r"'blk.to_q': rank mismatch, down \(4, 8\) has rank 4 but up "
                       r"\(16, 3\) has rank 3"):  # fmt: skip
        read_lora({"blk.to_q.lora_A.weight": a, "blk.to_q.lora_B.weight": torch.zeros(16, 3)})
    with pytest.raises(WeightMismatchError, match="must be 2-D"):
        read_lora(
            {"c.lora_down.weight": torch.zeros(4, 8, 3, 3), "c.lora_up.weight": torch.zeros(8, 4, 1, 1)}
        )
    with pytest.raises(WeightMismatchError, match="appears twice"):
        read_lora({"x.lora_A.weight": a, "x.lora_down.weight": a, "x.lora_B.weight": b})
