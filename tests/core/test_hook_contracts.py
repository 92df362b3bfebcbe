"""Hook contracts: every hook, its ``register`` callback and every runtime protocol member is documented in
``docs/hooks.md`` with the signature the code has, and a registration that breaks the contract fails."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import qi_core as qi
from qi_core import hookspecs, protocols
from qi_core import plugin_host as plugins_mod
from qi_core.errors import RegistrationError
from qi_core.recipe import Component, Recipe

DOCS = (Path(__file__).parents[2] / "docs" / "hooks.md").read_text()

# Changing a hook's arguments is a deliberate act: update this table, the docs and HOOK_API_VERSION.
FROZEN = {name: ["register"] for name in hookspecs.HOOKS}

# the runtime protocols of qi_core/protocols.py, each documented member by member
PROTOCOLS = (
    protocols.Denoiser,
    protocols.TextEncoder,
    protocols.Autoencoder,
    protocols.Injector,
    protocols.Adapter,
    protocols.MemoryPolicy,
    protocols.TrainingTask,
    protocols.Guider,
    protocols.Sampler,
    protocols.StepRunner,
)


def doc_table(header: str) -> list[list[str]]:
    """The rows of the markdown table whose header row starts with ``header``, cells stripped of backticks."""
    lines = DOCS.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(header))
    rows = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip().strip("`") for c in ln.strip().strip("|").split("|")])
    return rows


def documented_register() -> dict[str, str]:
    """hook name -> the ``register(...)`` signature the docs' hook table gives it."""
    return {row[0].removesuffix("(register)"): row[2] for row in doc_table("| hook | call mode |")}


def plain(fn) -> str:
    return hookspecs.plain_signature(inspect.signature(fn))


def captured_callbacks() -> dict[str, object]:
    """The ``register`` each hook really receives, from an in-process plugin implementing every hook."""
    seen: dict[str, object] = {}
    hooks = {
        name: (lambda n: lambda register: seen.__setitem__(n, register))(name) for name in hookspecs.HOOKS
    }
    plugins_mod.reset()
    try:
        info = qi.register_plugin(plugins_mod.plugin_module("contract_capture", **hooks))
        assert info.status == "ok", info.error
    finally:
        plugins_mod.reset()
    return seen


def test_hook_list_matches_the_specs():
    specs = sorted(n for n in dir(hookspecs) if n.startswith("qi_") and callable(getattr(hookspecs, n)))
    assert specs == sorted(hookspecs.HOOKS) == sorted(hookspecs.HOOK_KINDS) == sorted(hookspecs.REGISTER)


@pytest.mark.parametrize("name", hookspecs.HOOKS)
def test_hook_arguments_are_frozen(name):
    assert list(inspect.signature(getattr(hookspecs, name)).parameters) == FROZEN[name]


@pytest.mark.parametrize("name", hookspecs.HOOKS)
def test_hook_is_documented_with_its_signature(name):
    assert f"## {name}" in DOCS
    assert f"`{name}(register)`" in DOCS
    assert getattr(hookspecs, name).__doc__.strip()


def test_register_callbacks_match_the_docs_and_the_stubs():
    """The signature each hook's ``register`` really has == the docs' table == ``hookspecs.REGISTER``."""
    documented = documented_register()
    assert sorted(documented) == sorted(hookspecs.HOOKS)
    real = {hook: f"register{plain(cb)}" for hook, cb in captured_callbacks().items()}
    stubs = {hook: f"register{plain(stub)}" for hook, stub in hookspecs.REGISTER.items()}
    assert real == stubs == documented
    # and each hook's own docstring states it
    for hook, sig in stubs.items():
        assert f"``{sig}``".replace("''", '""') in getattr(hookspecs, hook).__doc__, hook


def test_the_contract_has_teeth():
    """A drift between code and docs is caught: the helpers see a changed signature."""
    documented = documented_register()

    def register(name, factory, *, role, alias=()):  # a misspelt keyword
        pass

    assert f"register{plain(register)}" != documented["qi_register_encoders"]


def good_args(kind: str, part: str) -> tuple[tuple, dict]:
    if kind == "pipeline":
        return (Recipe(name=part, description="d", components={}, scheduler="qwen-image"),), {}
    if kind == "command":
        return (part, lambda parser: parser.set_defaults(func=lambda args: 0)), {
            "aliases": (part + "-alias",)
        }
    extra = {"encoder": {"role": "contract_slot"}, "source": {"prefixes": ("contract:",)}}.get(kind, {})
    return (part, "qi_core.recipe:Recipe"), {"aliases": (part + "-alias",), **extra}


@pytest.mark.parametrize("name", hookspecs.HOOKS)
def test_each_hook_registers_into_its_kind(name):
    plugins_mod.reset()
    kind = hookspecs.HOOK_KINDS[name]
    part = f"contract-{kind}"
    args, kwargs = good_args(kind, part)
    info = qi.register_plugin(
        plugins_mod.plugin_module(f"contract_{kind}", **{name: lambda register: register(*args, **kwargs)})
    )
    try:
        assert info.status == "ok", info.error
        assert info.hooks == [name]
        assert info.provides == {kind: [part]}
        reg = plugins_mod.host().registry
        assert reg.get(kind, part).plugin == f"contract_{kind}"
        if kind != "pipeline":
            assert reg.get(kind, part + "-alias").name == part
        if kind == "encoder":
            assert reg.get(kind, part).meta == {"role": "contract_slot"}
        if kind == "source":
            assert reg.get(kind, part).meta == {"prefixes": ("contract:",)}
    finally:
        plugins_mod.reset()


@pytest.mark.parametrize("name", hookspecs.HOOKS)
def test_a_wrong_keyword_is_refused_naming_plugin_hook_and_keyword(name):
    plugins_mod.reset()
    kind = hookspecs.HOOK_KINDS[name]
    args, kwargs = good_args(kind, f"typo-{kind}")
    typo, meant = ("nmae", "name") if kind == "pipeline" else ("alias", "aliases")
    kwargs = {**kwargs, typo: ("x",)}
    kwargs.pop(meant, None)
    info = qi.register_plugin(
        plugins_mod.plugin_module(f"typo_{kind}", **{name: lambda register: register(*args, **kwargs)})
    )
    try:
        assert info.status == "error" and info.hook == name
        assert f"plugin 'typo_{kind}', {name}: register() got an unknown keyword {typo!r}" in info.error
        if kind != "pipeline":
            assert f"(did you mean {meant!r}?)" in info.error
        assert f"it takes register{plain(hookspecs.REGISTER[name])}" in info.error
        assert plugins_mod.host().registry.by_plugin(f"typo_{kind}") == {}  # nothing half-registered
    finally:
        plugins_mod.reset()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda register: register("x-encoder", "m:f"), "missing a required argument: 'role'"),
        (
            lambda register: register("x-encoder", "m:f", rol="vae"),
            "unknown keyword 'rol' (did you mean 'role'?)",
        ),
        (
            lambda register: register("x-encoder", "m:f", role="text encoder"),
            "must be the recipe slot it fills",
        ),
        (
            lambda register: register("x-encoder", "not-a-module-path", role="vae"),
            "a callable or a 'module:attribute' string",
        ),
        (lambda register: register("x-encoder", "m:f", role="vae", aliases="y"), "write aliases=('y',)"),
        (lambda register: register("", "m:f", role="vae"), "needs a non-empty string name"),
        (lambda register: register("x-encoder", "m:f", "vae"), "too many positional arguments"),
    ],
)
def test_encoder_register_checks_its_arguments(fresh, call, message):
    info = qi.register_plugin(plugins_mod.plugin_module("bad_encoder", qi_register_encoders=call))
    assert info.status == "error" and info.hook == "qi_register_encoders"
    assert message in info.error and "plugin 'bad_encoder'" in info.error


def test_an_encoder_fills_the_recipe_slot_of_its_role(fresh):
    base_te = "qwen2.5-vl"  # registered by the base plugin with role "text_encoder"
    wrong = Recipe(
        name="swapped", description="d", components={"vae": Component(base_te, "vae")}, scheduler="s"
    )
    info = qi.register_plugin(
        plugins_mod.plugin_module("swapped_slots", qi_register_pipelines=lambda register: register(wrong))
    )
    assert info.status == "error"
    assert f"recipe 'swapped' puts encoder {base_te!r} in the slot 'vae'" in info.error
    assert "but it is registered for the role 'text_encoder' (plugin 'qwen_image')" in info.error
    # the other order: an encoder whose role contradicts a registered recipe's slot
    info = qi.register_plugin(
        plugins_mod.plugin_module(
            "late_encoder",
            qi_register_pipelines=lambda register: register(
                Recipe(
                    name="late",
                    description="d",
                    components={"vae": Component("late-vae", "vae")},
                    scheduler="s",
                )
            ),
        )
    )
    assert info.status == "ok", info.error
    with pytest.raises(
        RegistrationError, match="is registered for the role 'text_encoder', but recipe 'late'"
    ):
        qi.register("encoder", "late-vae", "m:f", role="text_encoder")
    qi.register("encoder", "late-vae", "m:f", role="vae")


def test_user_registration_has_the_same_contract(fresh):
    with pytest.raises(RegistrationError, match=r"unknown keyword 'rol' \(did you mean 'role'\?\)"):
        qi.register("encoder", "my-te", "m:f", rol="text_encoder")
    with pytest.raises(RegistrationError, match=r"missing a required argument: 'role'"):
        qi.register("encoder", "my-te", "m:f")
    with pytest.raises(
        RegistrationError, match=r"unknown part kind 'schedulers'\. Did you mean 'scheduler'\?"
    ):
        qi.register("schedulers", "x", lambda: None)
    with pytest.raises(
        RegistrationError, match=r"qi.register\('adapter', name, factory, \*, aliases=\(\), replace"
    ):
        qi.register("adapter", "x", lambda: None, help="not for adapters")
    qi.register("encoder", "my-te", "m:f", role="text_encoder", aliases=("my-te-2",))
    reg = plugins_mod.host().registry
    assert reg.get("encoder", "my-te-2").meta == {"role": "text_encoder"}
    recipe = Recipe(name="mine", description="d", components={}, scheduler="qwen-image")
    qi.register("pipeline", recipe)
    assert reg.get("pipeline", "mine").obj is recipe
    qi.register("pipeline", "mine", recipe, replace=True)  # the named form, for compatibility
    with pytest.raises(RegistrationError, match="the recipe is named 'mine'"):
        qi.register("pipeline", "other", recipe)


def protocol_members(cls) -> dict[str, str]:
    """member -> how the docs write it: ``name(params)`` for methods, ``name: type`` for attributes."""
    out = {k: f"{k}: {v}" for k, v in cls.__dict__.get("__annotations__", {}).items()}
    for k, v in cls.__dict__.items():
        if (k.startswith("_") and k != "__call__") or isinstance(v, type) or not callable(v):
            continue
        out[k] = f"{k}{plain(v)}"
    return out


def test_every_protocol_member_is_documented_with_its_parameters():
    documented: dict[tuple[str, str], str] = {}
    for proto, member, _ in doc_table("| protocol | member |"):
        key = re.match(r"[A-Za-z_]+", member).group(0)
        documented[(proto, key)] = member
    code = {(cls.__name__, k): v for cls in PROTOCOLS for k, v in protocol_members(cls).items()}
    assert sorted(code) == sorted(documented)  # nothing undocumented, nothing documented that is not there
    for key, sig in code.items():
        assert documented[key] == sig, key


def test_protocols_cover_what_plugins_call():
    """The keywords plugins pass and the attributes they read are part of the protocols."""
    encode = inspect.signature(protocols.TextEncoder.encode_prompt).parameters
    assert {"images", "template", "drop", "processor", "max_tokens"} <= set(encode)
    assert {"latent_channels", "scale_factor", "image_channels"} <= set(protocols.Autoencoder.__annotations__)
    from qi_plugins.qwen_image.text_encoder import QwenTextEncoder

    assert set(encode) <= set(inspect.signature(QwenTextEncoder.encode_prompt).parameters)


@pytest.fixture
def fresh():
    plugins_mod.reset()
    yield
    plugins_mod.reset()


def test_a_command_configure_may_take_argv(fresh):
    """As docs/hooks.md says: ``configure(parser, argv=)`` gets the command's own arguments when it is the one
    being run, else None."""
    from qi_core.cli import main

    seen = []

    def configure(parser, argv=None):
        seen.append(argv)
        parser.add_argument("word", nargs="?")
        parser.set_defaults(func=lambda args: 0)

    qi.register("command", "argv-echo", configure)
    assert main(["argv-echo", "hi"]) == 0 and seen[-1] == ["hi"]
    assert main(["pipelines"]) == 0 and seen[-1] is None
    commands = DOCS[DOCS.index("## qi_register_commands") : DOCS.index("## The denoising loop")]
    assert "argv=" in commands


def test_the_sources_section_says_how_a_source_is_chosen():
    sources = DOCS[DOCS.index("## qi_register_sources") : DOCS.index("## Runtime protocols")]
    for word in "prefixes QI_DOWNLOAD_SOURCE DIFFSYNTH_DOWNLOAD_SOURCE modelscope DownloadError".split():
        assert word in sources, word


def test_api_version_is_declared_by_first_party_plugins():
    import qi_plugins.memory
    import qi_plugins.qwen_image

    assert qi_plugins.qwen_image.QI_HOOK_API == qi_plugins.memory.QI_HOOK_API == hookspecs.HOOK_API_VERSION


def test_plugin_commands_become_subcommands(fresh):
    from qi_core.cli import main

    seen = []

    def configure(parser):
        parser.add_argument("word")
        parser.set_defaults(func=lambda args: seen.append(args.word) or 0)

    qi.register_plugin(
        plugins_mod.plugin_module(
            "cmd_plugin",
            qi_register_commands=lambda register: register(
                "echo", configure, help="say it", aliases=("say",)
            ),
        )
    )
    assert main(["echo", "hello"]) == 0
    assert main(["say", "again"]) == 0  # aliases are sub-commands too
    assert seen == ["hello", "again"]


def test_a_broken_plugin_command_does_not_break_the_cli(capsys, fresh):
    from qi_core.cli import main

    def configure(parser):
        raise ImportError("no module named qi_missing_dependency")

    qi.register_plugin(
        plugins_mod.plugin_module("bad_cmd", qi_register_commands=lambda register: register("bad", configure))
    )
    assert main(["pipelines"]) == 0  # everything else still works
    assert main(["bad"]) == 2
    assert "qi_missing_dependency" in capsys.readouterr().err
