"""``qi generate`` (the doors plugin) on the tiny models: every pipeline runs from flags alone, ``--from``
re-runs a written image bit for bit, ``--lora FILE:SCALE`` equals the Python API, entries flags, the size of
an input image, prompt files and output names."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny_helpers
from PIL import Image

import qi_core as qi
from qi_core.cli import main
from qi_core.images import image_settings
from qi_plugins.doors.flags import _entry_parser
from qi_plugins.doors.generate import calls_of
from qi_plugins.doors.outputs import output_paths

offline = tiny_helpers.offline
tiny_cache_dir = tiny_helpers.tiny_cache_dir
tiny_pipeline = tiny_helpers.tiny_pipeline
pytestmark = pytest.mark.usefixtures("single_thread")
NAMES = [r.name for r in qi.pipelines()]
SIZE = ["--height", "64", "--width", "64"]
MASKED = {"qwen-image-blockwise-controlnet-inpaint"}  # its control entry also carries an inpaint mask


def picture(path, size=64, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return str(path)


def a_mask(path, size=64):
    m = np.zeros((size, size), dtype=np.uint8)
    m[:, : size // 2] = 255
    Image.fromarray(m).save(path)
    return str(path)


def input_flags(pipe, folder) -> list[str]:
    """Flags for the pipeline's required inputs and its structured conditioning, from its declarations."""
    argv = []
    for spec in pipe.parameter_specs():
        name, kind = spec["name"], spec["kind"]
        flag = "--" + name.replace("_", "-")
        if name == "edit_image_auto_resize":
            argv.append("--no-edit-image-auto-resize")  # keep the tiny images tiny
        if kind == "entries":
            entry = {"image": picture(folder / f"{name}.png")}
            if pipe.name in MASKED:
                entry["inpaint_mask"] = a_mask(folder / "entry_mask.png")
            argv += [flag, json.dumps(entry)]
        elif spec["required"]:
            make = a_mask if kind in ("mask", "masks") else picture
            argv += [flag, make(folder / f"{name}.png")]
    return argv


@pytest.fixture
def shared(tiny_pipeline, monkeypatch):
    """``qi.compose`` answering with the session's tiny pipelines (composed once for all tiny-model tests)."""
    for name in NAMES:
        tiny_pipeline(name)  # composed before qi.compose is replaced
    monkeypatch.setattr(qi, "compose", lambda name, **kw: tiny_pipeline(name))
    return tiny_pipeline


@pytest.mark.parametrize("name", NAMES)
def test_every_pipeline_generates_from_flags(name, shared, tmp_path):
    out = tmp_path / "o.png"
    argv = ["generate", "a red fox", "--pipeline", name, "--model", "tiny", "--steps", "1", *SIZE, "--seed", "3",
            "--out", str(out), *input_flags(shared(name), tmp_path)]  # fmt: skip
    assert main(argv) == 0
    settings = image_settings(out)
    assert settings["pipeline"] == name and settings["seed"] == 3 and settings["num_inference_steps"] == 1
    assert Image.open(out).size == (64, 64) or name.startswith("qwen-image-layered")


@pytest.mark.parametrize(
    "name", ["qwen-image", "qwen-image-edit", "qwen-image-blockwise-controlnet-canny"], ids=str
)
def test_from_reruns_bit_for_bit(name, shared, tmp_path, capsys):
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    argv = ["generate", "a red fox", "--pipeline", name, "--steps", "2", *SIZE, "--cfg-scale", "2",
            "--negative-prompt", "blur", "--out", str(first), *input_flags(shared(name), tmp_path)]  # fmt: skip
    assert main(argv) == 0
    seed = int(capsys.readouterr().out.split("seed ", 1)[1].split()[0])  # no --seed: a random one, printed
    assert main(["generate", "--from", str(first), "--out", str(again)]) == 0
    assert first.read_bytes() == again.read_bytes()
    record = image_settings(again)
    assert record["seed"] == seed and record["negative_prompt"] == "blur"
    assert bool(record["inputs_sha256"]) == (name != "qwen-image")  # the input files, by hash


def test_from_refuses_a_changed_input(shared, tmp_path, capsys):
    src = picture(tmp_path / "in.png")
    out = tmp_path / "o.png"
    assert main(["generate", "x", "--steps", "1", "--input-image", src, "--strength", "0.5", "--seed", "1",
                 "--out", str(out)]) == 0  # fmt: skip
    picture(src, seed=1)
    assert main(["generate", "--from", str(out), "--out", str(tmp_path / "p.png")]) == 2
    assert f"input file {src!r} changed since the run" in capsys.readouterr().err


def test_size_follows_the_input_image(shared, tmp_path, capsys):
    src = str(tmp_path / "in.png")
    Image.new("RGB", (80, 48), (200, 10, 10)).save(src)
    out = tmp_path / "o.png"
    argv = ["generate", "x", "--steps", "1", "--input-image", src, "--strength", "0.6", "--seed", "1", "--out",
            str(out)]  # fmt: skip
    assert main(argv) == 0
    assert Image.open(out).size == (80, 48)
    assert main([*argv, "--height", "64", "--width", "64"]) == 2  # img2img keeps the input's size
    assert "resize the image or pass --width 80, --height 48" in capsys.readouterr().err
    edit = ["generate", "x", "--pipeline", "qwen-image-edit", "--steps", "1", "--edit-image", src, "--seed", "1",
            "--no-edit-image-auto-resize", "--out", str(out)]  # fmt: skip
    assert main(edit) == 0 and Image.open(out).size == (80, 48)
    assert main([*edit, "--height", "64", "--width", "32"]) == 0  # given: kept
    assert Image.open(out).size == (32, 64)


def test_lora_flag_equals_the_python_api(offline, tmp_path):
    from qi_plugins.lora.adapter import load_lora
    from qi_plugins.lora.tiny import save_tiny_lora

    pipe = qi.compose("qwen-image", model="tiny", progress=False)
    lora = save_tiny_lora(tmp_path / "style.safetensors", pipe.dit, seed=5)
    out = tmp_path / "o.png"
    argv = ["generate", "a fox", "--model", "tiny", "--steps", "2", *SIZE, "--seed", "4", "--out", str(out)]
    assert main([*argv, "--lora", f"{lora}:0.7"]) == 0
    load_lora(pipe, lora, 0.7)
    want = pipe("a fox", num_inference_steps=2, height=64, width=64, seed=4, progress_bar_cmd=lambda x: x)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want))
    record = image_settings(out)
    assert record["loras"][0]["scale"] == 0.7 and len(record["loras"][0]["sha256"]) == 64
    assert main([*argv, "--lora", str(tmp_path / "missing.safetensors")]) == 2


def test_entries_flag_forms():
    parse = _entry_parser("blockwise_controlnet_inputs", ("controlnet_id", "image", "scale"))
    assert parse("0:canny.png:0.5") == {"controlnet_id": 0, "image": "canny.png", "scale": 0.5}
    assert parse("1:depth.png") == {"controlnet_id": 1, "image": "depth.png"}
    assert parse("image=a.png,scale=0.8,start=0.9") == {"image": "a.png", "scale": 0.8, "start": 0.9}
    assert parse('{"image": "a.png", "end": 0.2}') == {"image": "a.png", "end": 0.2}
    for bad in ("0:a.png:0.5:9", "image=a.png,scale", "{not json"):
        with pytest.raises(Exception, match="not"):
            parse(bad)


def test_controlnet_shorthand_reaches_the_call(shared, tmp_path):
    control = picture(tmp_path / "canny.png")
    out = tmp_path / "o.png"
    assert main(["generate", "x", "--pipeline", "qwen-image-blockwise-controlnet-canny", "--steps", "1", *SIZE,
                 "--seed", "2", "--controlnet", f"0:{control}:0.5", "--out", str(out)]) == 0  # fmt: skip
    pipe = shared("qwen-image-blockwise-controlnet-canny")
    want = pipe("x", num_inference_steps=1, height=64, width=64, seed=2, progress_bar_cmd=lambda x: x,
                blockwise_controlnet_inputs=[{"controlnet_id": 0, "image": control, "scale": 0.5}])  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want))


def test_prompt_files_group_rows_that_share_parameters(tmp_path):
    import argparse

    txt = tmp_path / "p.txt"
    txt.write_text("a fox\n\na cat\n")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a dog"}\n{"prompt": "a bird", "cfg_scale": 2}\n{"prompt": "a cow"}\n')
    args = argparse.Namespace(prompt=["a owl"], prompts=str(txt))
    assert calls_of(args, {"seed": 1}) == [{"seed": 1, "prompt": ["a owl", "a fox", "a cat"]}]
    args = argparse.Namespace(prompt=[], prompts=str(jsonl))
    assert calls_of(args, {"seed": 1}) == [
        {"seed": 1, "prompt": ["a dog", "a cow"]},
        {"seed": 1, "cfg_scale": 2, "prompt": "a bird"},
    ]


def test_output_names(tmp_path):
    items = [("a red fox", 7), ("a red fox", 8), ("cat", 7)]
    names = [p.name for p in output_paths(str(tmp_path / "{i}-{seed}-{prompt}.png"), items, (".png",))]
    assert names == ["0-7-a-red-fox.png", "1-8-a-red-fox.png", "2-7-cat.png"]
    assert [p.name for p in output_paths(str(tmp_path) + "/", items, (".png",))] == [
        "0000-7.png", "0001-8.png", "0002-7.png"]  # fmt: skip
    assert [p.name for p in output_paths(str(tmp_path / "o.webp"), items, (".webp",))][-1] == "o_2.webp"
    with pytest.raises(qi.errors.OutputPathError, match="same name to several images"):
        output_paths(str(tmp_path / "{prompt}.png"), items, (".png",))


def test_docs_show_the_generated_flags():
    from pathlib import Path

    from qi_plugins.doors.flags import docs_tables

    text = (Path(__file__).parents[2] / "docs" / "cli.md").read_text()
    shown = text.split("<!-- flags:begin -->\n", 1)[1].split("<!-- flags:end -->", 1)[0]
    assert shown == docs_tables(), "regenerate the table in docs/cli.md (see the command above it)"


def test_a_batch_writes_every_item_and_each_reruns_alone(shared, tmp_path):
    pattern = str(tmp_path / "{i}-{seed}.png")
    argv = ["generate", "a fox", "a much longer prompt about a cat in the snow", "-n", "2", "--steps", "2", *SIZE,
            "--seed", "5", "--cfg-scale", "3", "--out", pattern]  # fmt: skip
    assert main(argv) == 0
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["0-5.png", "1-6.png", "2-5.png", "3-6.png"]
    assert image_settings(tmp_path / "2-5.png")["prompt"].startswith("a much longer")
    for name in names:  # each item's record is the single call that reproduces it
        assert main(["generate", "--from", str(tmp_path / name), "--out", str(tmp_path / "again.png")]) == 0
        a, b = (np.asarray(Image.open(tmp_path / n)) for n in (name, "again.png"))
        assert np.array_equal(a, b), name
