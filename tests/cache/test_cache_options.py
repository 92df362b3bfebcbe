"""The cache plugin's compose options: ``cache=`` (on compose, and per call) is exactly the step cache chosen as
``step_runner=``; ``compile=`` compiles the denoiser's repeated block (and warns, doing nothing, where inductor
has no C++ compiler); both are ``qi generate`` flags."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GOLDEN_MODEL
from PIL import Image

import qi_core as qi
from qi_core.errors import InvalidInputError
from qi_plugins.cache.compiling import compiled

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
import tiny_helpers  # noqa: E402

offline = tiny_helpers.offline
tiny_cache_dir = tiny_helpers.tiny_cache_dir
pytestmark = pytest.mark.usefixtures("single_thread")

CALL = dict(prompt="a red cube on a wooden table", negative_prompt="blurry", cfg_scale=4.0, height=64, width=64,
            seed=3, num_inference_steps=20, output_type="np", progress_bar_cmd=lambda x: x)  # fmt: skip
FB = {"name": "first-block-cache", "threshold": 0.6}  # skips steps of this 20-step run (test_step_cache)


@pytest.fixture(scope="module")
def pipe():
    return qi.compose("qwen-image", model=GOLDEN_MODEL, torch_dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def by_step_runner(pipe):
    """The output with the cache chosen as the step runner, and how many evaluations it skipped."""
    pipe.step_runner = dict(FB)
    out = pipe(**CALL)
    skipped = pipe.step_runner.last.skipped
    pipe.step_runner = "batched"
    return out, skipped


def test_cache_on_compose_is_the_step_runner(by_step_runner):
    expected, skipped = by_step_runner
    assert skipped > 0, "the threshold must skip steps for this comparison to mean anything"
    composed = qi.compose("qwen-image", model=GOLDEN_MODEL, torch_dtype=torch.float32, progress=False,
                          cache={"threshold": 0.6})  # fmt: skip
    assert np.array_equal(composed(**CALL), expected)
    assert composed.step_runner.last.skipped == skipped


def test_cache_per_call_applies_to_that_call_only(pipe, by_step_runner):
    expected, _ = by_step_runner
    assert np.array_equal(pipe(**CALL, cache=dict(FB)), expected)
    assert pipe.step_runner == "batched" or pipe.step_runner.name == "batched"
    plain = pipe(**CALL)
    assert not np.array_equal(plain, expected), "without the option the call runs every block"
    assert np.array_equal(pipe(**CALL, cache=False), plain)


@pytest.mark.parametrize(
    "value, message",
    [("bogus", "'bogus' is not a step cache"), (3, "cache must be True"), ({"name": "parallel"}, "not a step cache")],
)  # fmt: skip
def test_bad_cache_values_are_refused_before_loading(tmp_path, value, message):
    with pytest.raises(InvalidInputError, match=message):
        qi.compose("qwen-image", model=tmp_path / "missing", cache=value)


def test_cache_does_not_replace_another_runner(pipe):
    class Other:
        name = "parallel"

        def run(self, *a, **k):
            raise AssertionError("not reached")

    pipe.step_runner = Other()
    try:
        with pytest.raises(InvalidInputError, match="runs 'parallel'.*drop one of the two"):
            pipe(**CALL, cache=True)
        assert isinstance(pipe.step_runner, Other)
    finally:
        pipe.step_runner = "batched"


def test_compile_option_compiles_the_denoiser_blocks(offline):
    pipe = qi.compose("qwen-image", model="tiny", progress=False, compile={"backend": "aot_eager"})
    assert compiled(pipe)["backend"] == "aot_eager"
    with pytest.raises(InvalidInputError, match=r"qi.compose\(\.\.\., compile=\.\.\.\)"):
        pipe("x", compile=True)
    with pytest.raises(InvalidInputError, match="no setting 'bakend'"):
        qi.compose("qwen-image", model="tiny", progress=False, compile={"bakend": "eager"})


def test_compile_without_a_compiler_warns_and_does_nothing(offline, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match="needs a C\\+\\+ compiler"):
        pipe = qi.compose("qwen-image", model="tiny", progress=False, compile=True)
    assert compiled(pipe) is None


def test_cli_flags_are_the_options(offline, tmp_path):
    from qi_core.cli import main

    out = tmp_path / "fb.png"
    args = ["generate", "a red cube", "--model", "tiny", "--seed", "3", "--num-inference-steps", "12",
            "--height", "32", "--width", "32", "--out", str(out)]  # fmt: skip
    assert main([*args, "--cache", "threshold=0.6"]) == 0
    pipe = qi.compose("qwen-image", model="tiny", progress=False)
    want = pipe("a red cube", seed=3, num_inference_steps=12, height=32, width=32, cache={"threshold": 0.6},
                progress_bar_cmd=lambda x: x)  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want))
    plain = pipe(
        "a red cube", seed=3, num_inference_steps=12, height=32, width=32, progress_bar_cmd=lambda x: x
    )
    assert not np.array_equal(np.asarray(plain), np.asarray(want)), "the cache must skip steps here"
    again = tmp_path / "again.png"
    assert main(["generate", "--from", str(out), "--out", str(again)]) == 0, "the record holds the option"
    assert again.read_bytes() == out.read_bytes()
    assert main([*args, "--cache", "bogus"]) == 2
