"""``qi generate`` outputs: the format from the suffix, the settings that reproduce the run in the file, a
closing line with time and memory, ``qi --version``."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from PIL import Image

import qi_core
from qi_core.cli import main
from qi_core.composer import describe


class FakePipe:
    model, dtype, device = "fake", torch.float32, torch.device("cpu")
    size_multiple = 16

    def parameter_specs(self):
        return next(describe(r) for r in qi_core.pipelines() if r.name == "qwen-image")["parameters"]

    def __init__(self, calls):
        self.calls = calls

    def parameters(self):
        return {"negative_prompt": "", "seed": None, "num_inference_steps": 3, "cfg_scale": 4.0, "height": 16,
                "width": 16, "progress_bar_cmd": print}  # fmt: skip

    def __call__(self, **call):
        self.calls.append(call)
        return Image.new("RGB", (16, 16), (200, 30, 30))


@pytest.fixture
def calls(monkeypatch):
    seen: list[dict] = []
    monkeypatch.setattr(qi_core, "compose", lambda name, **kw: FakePipe(seen))
    return seen


def read_settings(path) -> dict:
    with Image.open(path) as im:
        if im.format == "PNG":
            return json.loads(im.info["parameters"])
        return json.loads(im.getexif()[0x010E])


@pytest.mark.parametrize(
    ("suffix", "fmt"), [(".png", "PNG"), (".jpg", "JPEG"), (".jpeg", "JPEG"), (".webp", "WEBP")]
)
def test_format_follows_the_suffix_and_carries_the_settings(calls, tmp_path, suffix, fmt):
    src = tmp_path / "in.png"
    Image.new("RGB", (16, 16)).save(src)
    out = tmp_path / f"o{suffix}"
    argv = [
        "generate",
        "a fox",
        "--out",
        str(out),
        "--seed",
        "7",
        "--input-image",
        str(src),
        "--strength",
        "0.5",
    ]
    assert main([*argv, "--memory", "none", "--sampler", "heun"]) == 0
    with Image.open(out) as im:
        assert im.format == fmt
    got = read_settings(out)
    assert got["prompt"] == "a fox" and got["seed"] == 7 and got["denoising_strength"] == 0.5
    assert got["sampler"] == "heun" and got["num_inference_steps"] == 3 and got["cfg_scale"] == 4.0
    assert got["pipeline"] == "qwen-image" and got["dtype"] == "float32" and got["device"] == "cpu"
    assert got["memory"] == "none" and got["qi_version"] == qi_core.__version__
    assert got["inputs_sha256"] == {str(src): hashlib.sha256(src.read_bytes()).hexdigest()}
    assert "progress_bar_cmd" not in got  # a Python callable has no place in the record


def test_closing_line_reports_time_and_memory(calls, tmp_path, capsys):
    assert main(["generate", "x", "--out", str(tmp_path / "o.png"), "--seed", "1"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert " s in all, " in last and " s/step, peak RSS " in last and last.endswith(" GiB")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--out", "o.gif"], "must end in .png or .jpg or .jpeg or .webp"),
        (["--quality", "0"], "--quality must be 1-100"),
    ],
)
def test_bad_output_options_fail_before_loading(calls, tmp_path, monkeypatch, capsys, args, says):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "x", "--out", "o.png", *args]) == 2
    assert says in capsys.readouterr().err and not calls


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"qi {qi_core.__version__}"
