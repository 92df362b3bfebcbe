"""The plugin host: entry points, isolation of broken plugins, disabling, registry rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import qi_core as qi
from qi_core import plugin_host as plugins_mod
from qi_core.errors import RegistrationError, UnknownNameError
from qi_core.recipe import Recipe

FIXTURES = Path(__file__).parents[1] / "fixtures" / "plugins"


def by_name():
    return {p["name"]: p for p in qi.plugins()}


def test_first_party_plugins_each_have_their_own_entry_point(fresh_host):
    report = by_name()
    assert report["qwen_image"]["status"] == "ok"
    assert report["qwen_image"]["distribution"] == "qi"
    assert report["qwen_image"]["version"] == qi.__version__
    assert "qi_register_pipelines" in report["qwen_image"]["hooks"]
    assert {"none", "offload", "stream", "disk", "fp8", "low-vram"} <= set(
        report["memory"]["provides"]["memory_policy"]
    )


def test_broken_plugins_are_reported_and_the_rest_work(with_fixture_plugins):
    report = by_name()
    broken = report["fixture_broken_import"]
    assert broken["status"] == "error"
    assert "qi_this_module_does_not_exist" in broken["error"]
    assert broken["distribution"] == "qi-fixture-plugins" and broken["version"] == "0.3"

    unknown = report["fixture_unknown_hook"]
    assert unknown["status"] == "error" and unknown["hook"] == "qi_register_schedulerz"
    assert "unknown hook" in unknown["error"]

    old = report["fixture_old_api"]
    assert old["status"] == "incompatible" and "99" in old["error"]

    raising = report["fixture_raises"]
    assert raising["status"] == "error" and raising["hook"] == "qi_register_schedulers"
    assert "boom while registering" in raising["error"]
    reg = plugins_mod.host().registry
    assert "half-registered" not in reg.names("scheduler")  # rolled back

    good = report["fixture_good"]
    assert good["status"] == "ok"
    assert good["provides"] == {"scheduler": ["fixture-linear"], "pipeline": ["fixture-linear-image"]}
    # the host still works: built-in and third-party parts are usable
    assert qi.get_scheduler("fixture-linear").schedule(4, height=64, width=64)[0].shape == (4,)
    assert qi.get_scheduler("qwen-image").schedule(4, height=64, width=64)[0].shape == (4,)
    assert "fixture-linear-image" in [r.name for r in qi.pipelines()]


def test_third_party_recipe_composes_by_name(with_fixture_plugins):
    from conftest import GOLDEN_MODEL

    pipe = qi.compose("fixture-linear-image", model=GOLDEN_MODEL, progress=False)
    lat = pipe("a fox", height=32, width=32, num_inference_steps=2, seed=0, output_type="latent",
               progress_bar_cmd=lambda x: x)  # fmt: skip
    assert lat.shape == (1, 16, 4, 4)


def test_disable_by_name(with_fixture_plugins, monkeypatch):
    monkeypatch.setenv("QI_DISABLE_PLUGINS", "fixture_good, fixture_broken_import")
    plugins_mod.reset()
    report = by_name()
    assert report["fixture_good"]["status"] == "disabled"
    assert report["fixture_broken_import"]["status"] == "disabled"
    with pytest.raises(UnknownNameError):
        qi.get_scheduler("fixture-linear")


def test_unknown_names_list_known_ones_and_close_matches(fresh_host):
    with pytest.raises(UnknownNameError) as e:
        qi.compose("qwen-imag")
    msg = str(e.value)
    assert "Did you mean 'qwen-image'" in msg and "Known pipelines: " in msg
    with pytest.raises(UnknownNameError, match="unknown scheduler 'nope'"):
        qi.get_scheduler("nope")


def test_name_collisions_are_refused_and_user_registration_works(fresh_host):
    with pytest.raises(RegistrationError, match="already registered by 'qwen_image'"):
        qi.register("scheduler", "qwen-image", object)
    qi.register("scheduler", "my-schedule", lambda: "mine")
    assert qi.get_scheduler("my-schedule") == "mine"
    qi.register("scheduler", "qwen-image", lambda: "override", replace=True)
    assert qi.get_scheduler("qwen-image") == "override"


def test_in_process_plugin_module(fresh_host):
    mod = plugins_mod.plugin_module(
        "my_inline_plugin",
        qi_register_pipelines=lambda register: register(
            Recipe(name="inline", description="d", components={}, scheduler="qwen-image")
        ),
    )
    info = qi.register_plugin(mod)
    assert info.status == "ok" and info.provides == {"pipeline": ["inline"]}
    with pytest.raises(RegistrationError):
        plugins_mod.host().registry.add(plugins_mod.Entry("pipeline", "inline", None, "x"))


def test_registering_a_non_recipe_pipeline_is_an_error(fresh_host):
    mod = plugins_mod.plugin_module(
        "bad_recipe", qi_register_pipelines=lambda register: register("just-a-name")
    )
    info = qi.register_plugin(mod)
    assert info.status == "error" and "expects register(Recipe(...))" in info.error


def test_cli_plugins_json_lists_everything_quickly():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FIXTURES), os.environ.get("PYTHONPATH", "")])}
    code = (
        "import sys, json; from qi_core.cli import main; main(['plugins', '--json']); "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('torch', 'transformers', 'diffusers')))),"
        " file=sys.stderr)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    report = {p["name"]: p for p in json.loads(r.stdout)}
    for field in ("distribution", "version", "hooks", "status"):
        assert field in report["qwen_image"]
    assert report["fixture_broken_import"]["status"] == "error"
    assert report["fixture_good"]["status"] == "ok"
    # listing plugins must not import torch, transformers or diffusers
    assert json.loads(r.stderr.strip().splitlines()[-1]) == []
