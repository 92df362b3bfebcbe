"""Plugin name clashes are reported, never silent: an entry point named like a built-in (or like another
plugin), a command shadowed by a built-in or another plugin's, and ``qi new-plugin`` with a taken name."""

from __future__ import annotations

import json
import textwrap

import pytest

import qi_core as qi
from qi_core import plugin_host
from qi_core.cli import build_parser, main
from qi_core.errors import UnknownNameError

DIST = "qi-clash-fixture"

# a third-party distribution whose plugins each clash with something (written to a temporary folder)
MODULES = {
    # entry points "qwen_image" (a built-in's, exactly) and "in-context" (built-in "in_context", normalised)
    "qi_clash_named": """
        from qi_core import hookimpl

        QI_HOOK_API = 1

        @hookimpl
        def qi_register_schedulers(register):
            register("clash-named-schedule", object)
    """,
    # sorts before every built-in; its scheduler name is the built-in one's
    "qi_clash_early": """
        from qi_core import hookimpl

        QI_HOOK_API = 1

        @hookimpl
        def qi_register_schedulers(register):
            register("qwen-image", object)
    """,
    # a command of the core CLI's own name, plus a working scheduler
    "qi_clash_generate": """
        from qi_core import hookimpl

        QI_HOOK_API = 1

        def configure(parser):
            parser.set_defaults(func=lambda args: 0)

        @hookimpl
        def qi_register_schedulers(register):
            register("clash-generate-schedule", object)

        @hookimpl
        def qi_register_commands(register):
            register("pipelines", configure)
    """,
    # a command another (built-in) plugin registers
    "qi_clash_train": """
        from qi_core import hookimpl

        QI_HOOK_API = 1

        @hookimpl
        def qi_register_commands(register):
            register("train", lambda parser: None)
    """,
}
ENTRY_POINTS = {
    "qwen_image": "qi_clash_named",
    "in-context": "qi_clash_named",
    "aaa_clash_early": "qi_clash_early",
    "clash_generate": "qi_clash_generate",
    "clash_train": "qi_clash_train",
}


@pytest.fixture
def clash_plugins(tmp_path, monkeypatch):
    for name, code in MODULES.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(code))
    info = tmp_path / "qi_clash_fixture-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 1.0\n")
    eps = "".join(f"{k} = {v}\n" for k, v in ENTRY_POINTS.items())
    (info / "entry_points.txt").write_text(f"[qi.plugins]\n{eps}")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin_host.reset()
    yield
    plugin_host.reset()


def reports(name: str) -> list[dict]:
    return [p for p in qi.plugins() if p["name"] == name]


def test_entry_point_named_like_a_builtin_is_reported_with_both_owners(clash_plugins):
    builtin, clash = reports("qwen_image")
    assert (
        builtin["status"] == "ok" and builtin["distribution"] == "qi"
    )  # the built-in wins, and is listed first
    assert (
        clash["status"] == "name-clash"
        and clash["distribution"] == DIST
        and clash["module"] == "qi_clash_named"
    )
    assert (
        "built-in plugin 'qwen_image' (qi " in clash["error"]
        and "module qi_plugins.qwen_image" in clash["error"]
    )
    assert "rename the entry point" in clash["error"] and f"of {DIST} pyproject.toml" in clash["error"]
    (normalised,) = reports("in-context")  # '-' == '_': the built-in in_context owns this name too
    assert normalised["status"] == "name-clash" and "built-in plugin 'in_context'" in normalised["error"]
    assert reports("in_context")[0]["status"] == "ok"
    with pytest.raises(UnknownNameError):  # the clashing plugin was not loaded at all
        qi.get_scheduler("clash-named-schedule")


def test_builtins_load_first_so_a_third_party_cannot_take_their_names(clash_plugins):
    assert reports("qwen_image")[0]["provides"]["scheduler"] == ["qwen-image"]
    (early,) = reports("aaa_clash_early")
    assert early["status"] == "name-clash" and early["hook"] == "qi_register_schedulers"
    assert (
        "scheduler 'qwen-image' is already registered by built-in plugin 'qwen_image' (qi " in early["error"]
    )
    assert f"rename it in plugin 'aaa_clash_early' ({DIST} 1.0, module qi_clash_early)" in early["error"]
    assert plugin_host.host().registry.get("scheduler", "qwen-image").plugin == "qwen_image"


def test_command_shadowed_by_a_builtin_command_is_not_ok(clash_plugins):
    (p,) = reports("clash_generate")
    assert p["status"] == "name-clash" and p["hook"] == "qi_register_commands"
    assert "command(s) 'pipelines' shadowed by qi's built-in command(s)" in p["error"]
    assert f"plugin 'clash_generate' ({DIST} 1.0, module qi_clash_generate)" in p["error"]
    # the rest of the plugin still works
    assert plugin_host.host().registry.get("scheduler", "clash-generate-schedule").plugin == "clash_generate"


def test_command_shadowed_by_another_plugins_command_names_both(clash_plugins):
    (p,) = reports("clash_train")
    assert p["status"] == "name-clash"
    assert "command 'train' is already registered by built-in plugin 'sft' (qi " in p["error"]
    assert "module qi_plugins.sft" in p["error"] and f"({DIST} 1.0, module qi_clash_train)" in p["error"]


def test_qi_plugins_lists_the_clashes(clash_plugins, capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    lines = [ln.split() for ln in out.splitlines() if ln.startswith(("qwen_image ", "clash_generate "))]
    assert lines == [["clash_generate", "name-clash", DIST, "1.0"], ["qwen_image", "ok", "qi", qi.__version__],
                     ["qwen_image", "name-clash", DIST, "1.0"]]  # fmt: skip
    assert main(["plugins", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sum(p["status"] == "name-clash" for p in listed) == len(ENTRY_POINTS)


def test_core_commands_are_the_parsers_own(fresh_host, monkeypatch):
    import importlib.metadata as md

    names = ",".join(ep.name for ep in md.entry_points(group=plugin_host.ENTRY_POINT_GROUP))
    monkeypatch.setenv(plugin_host.DISABLE_ENV, names)  # no plugin: the parser has the core's commands only
    plugin_host.reset()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(plugin_host.CORE_COMMANDS)


# -- qi new-plugin with a taken name -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "owner"),
    [
        ("qwen-image", "built-in plugin 'qwen_image' (qi "),
        ("Qwen_Image", "built-in plugin 'qwen_image' (qi "),
        ("qi-plugin-lora", "built-in plugin 'lora' (qi "),
        ("edit-2509", "registers the pipeline 'qwen-image-edit-2509'"),
    ],
)
def test_new_plugin_refuses_a_builtin_name(tmp_path, capsys, fresh_host, name, owner):
    dest = tmp_path / "plugin"
    assert main(["new-plugin", name, str(dest)]) == 2
    err = capsys.readouterr().err
    assert f"plugin name {name!r} is taken: " in err and owner in err and "Pick another name" in err
    assert len(err.strip().splitlines()) == 1 and not dest.exists()


def test_new_plugin_refuses_an_installed_plugins_name(tmp_path, capsys, with_fixture_plugins):
    assert main(["new-plugin", "fixture-good", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "plugin 'fixture_good' (qi-fixture-plugins 0.3, module qi_fixture_good)" in err
    assert not (tmp_path / "p").exists()
    assert main(["new-plugin", "fixture-better", str(tmp_path / "q")]) == 0  # a free name still renders
