"""Hook contracts: every hook is documented with its signature, frozen, and exercised here."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import qi_core as qi
from qi_core import hookspecs
from qi_core import plugin_host as plugins_mod
from qi_core.recipe import Recipe

DOCS = (Path(__file__).parents[2] / "docs" / "hooks.md").read_text()

# Changing a hook's arguments is a deliberate act: update this table, the docs and HOOK_API_VERSION.
FROZEN = {name: ["register"] for name in hookspecs.HOOKS}


def test_hook_list_matches_the_specs():
    specs = sorted(n for n in dir(hookspecs) if n.startswith("qi_") and callable(getattr(hookspecs, n)))
    assert specs == sorted(hookspecs.HOOKS) == sorted(hookspecs.HOOK_KINDS)


@pytest.mark.parametrize("name", hookspecs.HOOKS)
def test_hook_arguments_are_frozen(name):
    assert list(inspect.signature(getattr(hookspecs, name)).parameters) == FROZEN[name]


@pytest.mark.parametrize("name", hookspecs.HOOKS)
def test_hook_is_documented_with_its_signature(name):
    assert f"## {name}" in DOCS
    assert f"`{name}(register)`" in DOCS
    assert getattr(hookspecs, name).__doc__.strip()


@pytest.mark.parametrize("name", hookspecs.HOOKS)
def test_each_hook_registers_into_its_kind(name):
    plugins_mod.reset()
    kind = hookspecs.HOOK_KINDS[name]
    part = f"contract-{kind}"

    def impl(register):
        if kind == "command":
            register(
                part, lambda parser: parser.set_defaults(func=lambda args: 0), aliases=(part + "-alias",)
            )
        elif kind == "pipeline":
            register(Recipe(name=part, description="d", components={}, scheduler="qwen-image"))
        else:
            register(part, object, aliases=(part + "-alias",))

    info = qi.register_plugin(plugins_mod.plugin_module(f"contract_{kind}", **{name: impl}))
    try:
        assert info.status == "ok", info.error
        assert info.hooks == [name]
        assert info.provides == {kind: [part]}
        reg = plugins_mod.host().registry
        assert reg.get(kind, part).plugin == f"contract_{kind}"
        if kind != "pipeline":
            assert reg.get(kind, part + "-alias").name == part
    finally:
        plugins_mod.reset()


def test_api_version_is_declared_by_first_party_plugins():
    import qi_plugins.memory
    import qi_plugins.qwen_image

    assert qi_plugins.qwen_image.QI_HOOK_API == qi_plugins.memory.QI_HOOK_API == hookspecs.HOOK_API_VERSION


def test_plugin_commands_become_subcommands():
    from qi_core.cli import main

    plugins_mod.reset()
    seen = []

    def configure(parser):
        parser.add_argument("word")
        parser.set_defaults(func=lambda args: seen.append(args.word) or 0)

    qi.register_plugin(
        plugins_mod.plugin_module(
            "cmd_plugin", qi_register_commands=lambda register: register("echo", configure)
        )
    )
    try:
        assert main(["echo", "hello"]) == 0
        assert seen == ["hello"]
    finally:
        plugins_mod.reset()


def test_a_broken_plugin_command_does_not_break_the_cli(capsys):
    from qi_core.cli import main

    plugins_mod.reset()

    def configure(parser):
        raise ImportError("no module named qi_missing_dependency")

    qi.register_plugin(
        plugins_mod.plugin_module("bad_cmd", qi_register_commands=lambda register: register("bad", configure))
    )
    try:
        assert main(["pipelines"]) == 0  # everything else still works
        assert main(["bad"]) == 2
        assert "qi_missing_dependency" in capsys.readouterr().err
    finally:
        plugins_mod.reset()
