"""``qi generate`` flags come from the pipeline's declared parameters: every parameter is a flag with its type,
default and description; errors name flags; bad values and missing inputs fail before anything loads."""

from __future__ import annotations

import pytest
from PIL import Image

import qi_core
from qi_core.cli import build_parser, main
from qi_core.composer import describe
from qi_plugins.doors.flags import HANDLED_ELSEWHERE, flag


def help_text(pipeline: str) -> str:
    sub = next(a for a in build_parser(["generate", "--pipeline", pipeline])._actions if a.dest == "command")
    return sub.choices["generate"].format_help()


@pytest.mark.parametrize("recipe", qi_core.pipelines(), ids=lambda r: r.name)
def test_every_declared_parameter_is_a_flag(recipe):
    text = help_text(recipe.name)
    for spec in describe(recipe)["parameters"]:
        if spec["name"] in HANDLED_ELSEWHERE or spec["kind"] in ("callable", "entries"):
            continue
        assert flag(spec["name"]) in text, f"{recipe.name}: no {flag(spec['name'])} in generate --help"


def test_help_shows_types_defaults_and_descriptions():
    text = help_text("qwen-image-edit")
    assert "--edit-image FILE [FILE ...]" in text
    assert "--zero-cond-t, --no-zero-cond-t" in text
    assert "--num-inference-steps NUM_INFERENCE_STEPS, --steps NUM_INFERENCE_STEPS" in text
    assert "resize each edit image to about 1024² pixels (default: True)" in " ".join(text.split())
    assert "--edit-image" not in help_text("qwen-image")  # another pipeline, other flags


class Recorder:
    """Stands in for ``qi.compose``: records the call, loads nothing."""

    def __init__(self):
        self.composed = 0
        self.calls = []

    def __call__(self, name, **kw):
        self.composed += 1
        rec = self

        class Pipe:
            model, device = "fake", "cpu"
            dtype = "torch.float32"
            size_multiple = 16

            def parameter_specs(self):
                return next(describe(r) for r in qi_core.pipelines() if r.name == name)["parameters"]

            def parameters(self):
                return {"negative_prompt": "", "seed": None, "num_inference_steps": 1, "cfg_scale": 1.0,
                        "height": 16, "width": 16}  # fmt: skip

            def __call__(self, **call):
                rec.calls.append(call)
                return Image.new("RGB", (16, 16))

        return Pipe()


@pytest.fixture
def fake_compose(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(qi_core, "compose", rec)
    return rec


def test_flags_become_call_parameters(fake_compose, tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "b.png")
    out = tmp_path / "o.png"
    base = ["generate", "x", "--pipeline", "qwen-image-edit", "--out", str(out), "--seed", "3"]
    assert main([*base, "--edit-image", str(tmp_path / "a.png"), "--no-edit-image-auto-resize", "--steps", "2",
                 "--sampler", "heun", "--cfg-scale", "2.5"]) == 0  # fmt: skip
    call = fake_compose.calls[-1]
    assert call["edit_image"] == str(tmp_path / "a.png")  # one file: one image, not a list of one
    assert call["edit_image_auto_resize"] is False and call["num_inference_steps"] == 2
    assert call["sampler"] == "heun" and call["cfg_scale"] == 2.5 and call["seed"] == 3
    assert "zero_cond_t" not in call  # left out: the recipe's default applies
    assert main([*base, "--edit-image", str(tmp_path / "a.png"), str(tmp_path / "b.png")]) == 0
    assert fake_compose.calls[-1]["edit_image"] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert out.exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["--cfg-scale", "nan"],
            "--cfg-scale must be a finite number, got nan — --cfg-scale: guidance scale",
        ),
        (["--steps", "0"], "--num-inference-steps must be greater than or equal to 1, got 0"),
        (["--pipeline", "qwen-image-edit"], "--edit-image is required by pipeline 'qwen-image-edit'"),
        (["--pipeline", "qwen-image-layered"], "--layer-input-image is required by pipeline"),
    ],
)
def test_errors_name_flags_and_come_before_loading(fake_compose, capsys, tmp_path, args, says):
    assert main(["generate", "x", "--out", str(tmp_path / "o.png"), *args]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
    assert fake_compose.composed == 0 and not (tmp_path / "o.png").exists()


def test_random_seed_is_printed(fake_compose, capsys, tmp_path):
    assert main(["generate", "x", "--out", str(tmp_path / "o.png")]) == 0
    printed = capsys.readouterr().out
    seed = int(printed.split("seed ")[1].split()[0])
    assert fake_compose.calls[-1]["seed"] == seed
