"""The qi command line: generate writes a PNG with its settings; make-tiny-model; pipelines."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import GOLDEN_MODEL
from PIL import Image

from qi_core.cli import main


def test_generate_writes_png_with_metadata(tmp_path, capsys):
    out = tmp_path / "sub" / "fox.png"
    rc = main(["generate", "a red fox", "--model", str(GOLDEN_MODEL), "--seed", "7", "--steps", "2",
               "--cfg-scale", "2.5", "--height", "48", "--width", "64", "--negative-prompt", "blurry",
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    with Image.open(out) as im:
        assert im.size == (64, 48) and im.mode == "RGB"
        meta = json.loads(im.text["parameters"])
    assert meta["prompt"] == "a red fox" and meta["seed"] == 7 and meta["num_inference_steps"] == 2
    assert (
        meta["cfg_scale"] == 2.5 and meta["pipeline"] == "qwen-image" and meta["model"] == str(GOLDEN_MODEL)
    )
    assert meta["negative_prompt"] == "blurry"
    assert [p.name for p in out.parent.iterdir()] == ["fox.png"]  # no temp files left


def test_generate_is_seed_deterministic(tmp_path):
    args = ["generate", "x", "--model", str(GOLDEN_MODEL), "--steps", "1", "--height", "32", "--width", "32"]
    for name in ("a", "b"):
        assert main([*args, "--seed", "1", "--out", str(tmp_path / f"{name}.png")]) == 0
    assert Image.open(tmp_path / "a.png").tobytes() == Image.open(tmp_path / "b.png").tobytes()


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    rc = main(
        ["generate", "x", "--model", str(GOLDEN_MODEL), "--height", "50", "--out", str(tmp_path / "o.png")]
    )
    assert rc == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("qi: error: height and width must be multiples of 16") and "48 or 64" in last
    assert not (tmp_path / "o.png").exists()


def test_pipelines_lists_recipes(capsys):
    assert main(["pipelines"]) == 0
    assert "qwen-image" in capsys.readouterr().out


def test_make_tiny_model_and_generate_with_the_builtin_tiny(tmp_path):
    env = {**os.environ, "QI_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "qi_core.cli", "generate", "a fox", "--model", "tiny", "--steps", "2",
                        "--height", "64", "--width", "64", "--seed", "0", "--out", str(tmp_path / "t.png")],
                       capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cache" / "tiny" / "qwen-image" / "model_index.json").exists()
    assert Image.open(tmp_path / "t.png").size == (64, 64)
    with pytest.raises(SystemExit):
        main(["make-tiny-model"])
    assert main(["make-tiny-model", str(tmp_path / "m")]) == 0
    assert main(["make-tiny-model", str(tmp_path / "m")]) == 2  # exists: refuse to overwrite silently
