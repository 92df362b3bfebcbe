"""``qi migrate-diffsynth`` (the one-line migration) and the plugin contract bits the front doors rely on."""

from __future__ import annotations

import importlib
import importlib.metadata as md

from qi_core import hookspecs
from qi_core.cli import main
from qi_plugins.diffsynth_compat.cli import migrate_source

SCRIPT = """\
from diffsynth.pipelines.qwen_image import QwenImagePipeline, ModelConfig, ControlNetInput
from diffsynth.pipelines.qwen_image import FlowMatchScheduler as FMS  # scheduler swap
from diffsynth.controlnets.processors import Annotator
import torch
"""


def test_migrate_rewrites_only_the_front_imports():
    text, changed, left = migrate_source(SCRIPT)
    assert text.splitlines()[:2] == [
        "from qi_plugins.diffsynth_compat import QwenImagePipeline, ModelConfig, ControlNetInput",
        "from qi_plugins.diffsynth_compat import FlowMatchScheduler as FMS  # scheduler swap",
    ]
    assert [n for n, *_ in changed] == [1, 2]
    assert left == [(3, "from diffsynth.controlnets.processors import Annotator")]  # no qi equivalent here
    assert text.splitlines()[2:] == SCRIPT.splitlines()[2:]


def test_migrate_command(tmp_path, capsys):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.splitlines(keepends=True)[0])
    assert main(["migrate-diffsynth", str(script)]) == 0
    assert "+ from qi_plugins.diffsynth_compat import" in capsys.readouterr().out
    assert script.read_text().startswith("from diffsynth")  # dry run by default
    assert main(["migrate-diffsynth", "--write", str(script)]) == 0
    assert (
        script.read_text()
        == "from qi_plugins.diffsynth_compat import QwenImagePipeline, ModelConfig, ControlNetInput\n"
    )
    script.write_text(SCRIPT)
    assert main(["migrate-diffsynth", str(script)]) == 1  # something left to do by hand


def test_every_first_party_plugin_declares_the_hook_api():
    """Plugins declare the hook API they need; qi's own entry points all declare the current one."""
    eps = [
        ep
        for ep in md.entry_points(group="qi.plugins")
        if ep.dist is not None and ep.dist.metadata["Name"] == "qi"
    ]
    assert {"diffsynth_compat", "devtools", "qwen_image"} <= {ep.name for ep in eps}
    for ep in eps:
        module = importlib.import_module(ep.value)
        assert getattr(module, "QI_HOOK_API", None) == hookspecs.HOOK_API_VERSION, ep.name
