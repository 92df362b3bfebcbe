"""``qi new-plugin`` renders ``plugin_template/``; the rendered distribution installs with pip, shows in
``qi plugins``, composes by name, is skipped by ``QI_DISABLE_PLUGINS`` and passes its own tests.

The plugin is installed with ``pip install --target`` into a temporary folder put on the path (in-process and
for the subprocesses), not into the shared environment: nothing to uninstall, nothing leaks into other runs.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import qi_core as qi
from qi_core import plugin_host
from qi_core.cli import main
from qi_core.errors import InvalidInputError, UnknownNameError
from qi_plugins.devtools.template_cli import plugin_names, render, template_dir

REPO = Path(__file__).parents[2]
NAME = "tmpl-check"  # → distribution qi-plugin-tmpl-check, entry point tmpl_check


def tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): p.read_text()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")
    }


def test_shipped_template_is_plugin_template_and_renders_to_itself(tmp_path):
    assert tree(template_dir()) == tree(REPO / "plugin_template")  # the package-data copy is in sync
    render("example", tmp_path / "same")
    assert tree(tmp_path / "same") == tree(REPO / "plugin_template")


def test_names_and_rendering_rules(tmp_path):
    assert plugin_names("qi-plugin-My_Variant") == ("my-variant", "my_variant")
    for bad in ("1abc", "a b", "x--y", ""):
        with pytest.raises(InvalidInputError, match="plugin name"):
            plugin_names(bad)
    files = render("my-variant", tmp_path / "out")
    text = "\n".join(f.read_text() for f in files) + "\n".join(str(f) for f in files)
    assert "example" not in text.lower()  # every name was derived, none left behind
    assert 'my_variant = "qi_plugin_my_variant"' in (tmp_path / "out" / "pyproject.toml").read_text()
    with pytest.raises(InvalidInputError, match="not empty"):
        render("other", tmp_path / "out")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``qi new-plugin`` → ``pip install --no-deps --no-build-isolation --target``; on sys.path meanwhile."""
    base = tmp_path_factory.mktemp("plugin")
    src, target = base / "src", base / "site"
    assert main(["new-plugin", NAME, str(src)]) == 0
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-compile",
         "--disable-pip-version-check", "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]),
           "QI_CACHE_DIR": str(base / "cache")}  # fmt: skip
    plugin_host.reset()
    try:
        yield src, env
    finally:
        sys.path.remove(str(target))
        for mod in [m for m in sys.modules if m.startswith("qi_plugin_tmpl_check")]:
            del sys.modules[mod]
        importlib.invalidate_caches()
        plugin_host.reset()


def qi_plugins_json(env: dict[str, str]) -> dict[str, dict]:
    r = subprocess.run([sys.executable, "-m", "qi_core.cli", "plugins", "--json"], capture_output=True, text=True,
                       env=env, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return {p["name"]: p for p in json.loads(r.stdout)}


def test_installed_plugin_is_listed(installed):
    _, env = installed
    p = qi_plugins_json(env)["tmpl_check"]
    assert (p["status"], p["distribution"], p["version"], p["api"]) == (
        "ok",
        "qi-plugin-tmpl-check",
        "0.1.0",
        1,
    )
    assert p["provides"] == {
        "pipeline": ["qwen-image-tmpl-check"],
        "scheduler": ["tmpl-check-karras"],
        "guider": ["tmpl-check-rescaled-cfg"],
        "sampler": ["tmpl-check-midpoint"],
    }
    assert sorted(p["hooks"]) == [
        "qi_register_guiders",
        "qi_register_pipelines",
        "qi_register_samplers",
        "qi_register_schedulers",
    ]


def test_installed_plugin_composes_by_name(installed):
    from conftest import GOLDEN_MODEL

    plugin_host.reset()
    pipe = qi.compose("qwen-image-tmpl-check", model=GOLDEN_MODEL, progress=False)
    seen = {}
    pipe.tracer = lambda k, v: seen.setdefault(k, v)
    out = pipe(prompt="a lighthouse", height=32, width=32, num_inference_steps=3, seed=0, output_type="np",
               progress_bar_cmd=lambda x: x)  # fmt: skip
    assert out.shape == (32, 32, 3)
    base, _ = qi.get_scheduler("qwen-image").schedule(3, height=32, width=32)
    assert seen["sigmas"][0] == 1.0 and not (seen["sigmas"] == base).all()  # its own schedule ran


def test_installed_plugin_is_disabled_by_name(installed, monkeypatch):
    _, env = installed
    report = qi_plugins_json({**env, "QI_DISABLE_PLUGINS": "tmpl_check"})
    assert report["tmpl_check"]["status"] == "disabled" and report["qwen_image"]["status"] == "ok"
    monkeypatch.setenv("QI_DISABLE_PLUGINS", "tmpl_check")
    plugin_host.reset()
    try:
        with pytest.raises(UnknownNameError, match="qwen-image-tmpl-check"):
            qi.compose("qwen-image-tmpl-check", model="tiny")
    finally:
        monkeypatch.delenv("QI_DISABLE_PLUGINS")
        plugin_host.reset()


def test_rendered_plugin_passes_its_own_tests(installed):
    src, env = installed
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=src,
                       capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "8 passed" in r.stdout
