"""Declared plugin requirements (``QI_REQUIRES``): load order, ``missing-dependency`` with its reason and its
cascade, requirement cycles, and the first-party plugins' declarations matching what they import."""

from __future__ import annotations

import importlib
import json
import re
import textwrap
from pathlib import Path

import pytest

import qi_core as qi
from qi_core import plugin_host
from qi_core.cli import main
from qi_core.errors import UnavailableNameError, UnknownNameError

PLUGINS = Path(__file__).parents[2] / "qi_plugins"
FIRST_PARTY = sorted(p.name for p in PLUGINS.iterdir() if (p / "__init__.py").is_file())
# imports of another plugin that are optional: each is guarded and says which plugin to install when missing
OPTIONAL = {"diffsynth_compat": {"blockwise_controlnet", "lora", "i2l"}, "doors": {"lora"}}


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.delenv(plugin_host.DISABLE_ENV, raising=False)
    plugin_host.reset()
    yield monkeypatch
    plugin_host.reset()


def report() -> dict[str, dict]:
    return {p["name"]: p for p in qi.plugins()}


def disable(monkeypatch, names: str) -> dict[str, dict]:
    monkeypatch.setenv(plugin_host.DISABLE_ENV, names)
    plugin_host.reset()
    return report()


def dependents(of: str, requires: dict[str, tuple[str, ...]]) -> set[str]:
    """Every plugin that requires ``of``, directly or through another."""
    out: set[str] = set()
    while True:
        more = {n for n, rs in requires.items() if n not in out and (of in rs or out & set(rs))}
        if not more:
            return out
        out |= more


def declared() -> dict[str, tuple[str, ...]]:
    return {n: importlib.import_module(f"qi_plugins.{n}").QI_REQUIRES for n in FIRST_PARTY}


# -- first-party declarations --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FIRST_PARTY)
def test_first_party_plugin_requires_what_it_uses(name):
    """Every other plugin a first-party plugin's code names (imports, ``"module:attr"`` factories) is in its
    QI_REQUIRES, directly or through a requirement (the template is rendered for third parties: not counted)."""
    requires = declared()
    files = [
        f for f in (PLUGINS / name).rglob("*.py") if "template" not in f.relative_to(PLUGINS / name).parts
    ]
    used = {m for f in files for m in re.findall(r"qi_plugins\.(\w+)", f.read_text())}
    used = (used & set(FIRST_PARTY)) - {name} - OPTIONAL.get(name, set())

    def closure(n: str) -> set[str]:
        return set(requires[n]).union(*(closure(r) for r in requires[n])) if requires[n] else set()

    assert used <= closure(name), f"{name} uses {sorted(used - closure(name))} without requiring them"
    assert set(requires[name]) <= set(FIRST_PARTY)  # requirements are entry-point names


def test_first_party_plugins_load_ok_and_report_their_requirements(fresh):
    rep = report()
    requires = declared()
    for name in FIRST_PARTY:
        assert rep[name]["status"] == "ok", (name, rep[name]["error"])
        assert rep[name]["requires"] == list(requires[name]) and rep[name]["missing"] == []


def test_without_the_base_plugin_every_dependent_is_missing_dependency(fresh):
    rep = disable(fresh, "qwen_image")
    hit = dependents("qwen_image", declared())
    assert {"edit", "eligen", "in_context", "layered", "lightning", "distill", "i2l"} <= hit
    for name in FIRST_PARTY:
        if name in hit:
            p = rep[name]
            assert p["status"] == "missing-dependency", name
            assert p["provides"] == {} and p["hooks"] == []
            assert "it requires 'qwen_image', which is disabled by QI_DISABLE_PLUGINS" in p["error"]
        elif name != "qwen_image":
            assert rep[name]["status"] == "ok", name
    # the cascade names the plugin in between
    assert (
        "'eligen', which is not loaded (missing-dependency: it requires 'qwen_image'"
        in rep["in_context"]["error"]
    )
    assert rep["in_context"]["missing"] == ["qwen_image", "eligen"]


def test_a_name_of_a_plugin_missing_its_dependency_says_why(fresh):
    rep = disable(fresh, "qwen-image")  # '-' == '_' here too
    assert rep["qwen_image"]["status"] == "disabled"
    assert "qwen-image-edit" in rep["edit"]["withheld"]["pipeline"]
    with pytest.raises(UnavailableNameError) as e:
        qi.compose("qwen-image-edit")
    msg = str(e.value)
    assert msg.startswith("pipeline 'qwen-image-edit' is provided by plugin 'edit', which is not loaded: ")
    assert "it requires 'qwen_image', which is disabled by QI_DISABLE_PLUGINS" in msg
    assert "Did you mean" not in msg
    assert isinstance(e.value, UnknownNameError)  # callers catching unknown names still catch it
    with pytest.raises(UnknownNameError, match="Plugins disabled by QI_DISABLE_PLUGINS: qwen_image"):
        qi.compose("qwen-image")  # a disabled plugin's names are unknown: the error says what is disabled


def test_without_lora_edit_registers_nothing(fresh, capsys):
    rep = disable(fresh, "lora")
    edit = rep["edit"]
    assert edit["status"] == "missing-dependency" and edit["missing"] == ["lora"]
    assert edit["provides"] == {}
    reg = plugin_host.host().registry
    for kind, names in edit["withheld"].items():
        assert not set(names) & set(reg.names(kind))
    assert "lora" in rep["sft"]["missing"] and rep["qwen_image"]["status"] == "ok"
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["edit", "missing-dependency"])
    assert "it requires 'lora', which is disabled by QI_DISABLE_PLUGINS" in lines[i + 1]
    assert main(["plugins", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert listed["edit"]["status"] == "missing-dependency" and listed["edit"]["missing"] == ["lora"]


# -- third-party plugins: order, not installed, broken, cycles, bad declarations ------------------------------
MODULES = {
    # sorts first, needs a plugin that sorts last: loaded after it
    "qi_dep_early": """
        QI_REQUIRES = ("zz_dep_base",)

        @hookimpl
        def qi_register_pipelines(register):
            register(Recipe(name="dep-early", description="d", components={}, scheduler="zz-dep-schedule"))
    """,
    "qi_dep_base": """
        QI_REQUIRES = ("qwen-image",)

        @hookimpl
        def qi_register_schedulers(register):
            register("zz-dep-schedule", "qi_plugins.qwen_image.parts:scheduler")
    """,
    "qi_dep_missing": """
        QI_REQUIRES = ("qwen_image", "not_installed_anywhere")

        @hookimpl
        def qi_register_schedulers(register):
            register("dep-missing-schedule", object)
    """,
    "qi_dep_cascade": """
        QI_REQUIRES = ("dep_missing",)

        @hookimpl
        def qi_register_schedulers(register):
            register("dep-cascade-schedule", object)
    """,
    "qi_dep_broken": """
        import qi_this_module_does_not_exist
    """,
    "qi_dep_on_broken": """
        QI_REQUIRES = ("dep_broken",)
    """,
    "qi_dep_cycle_a": """
        QI_REQUIRES = ("dep_cycle_b",)
    """,
    "qi_dep_cycle_b": """
        QI_REQUIRES = ("dep_cycle_a",)
    """,
    "qi_dep_on_cycle": """
        QI_REQUIRES = ("dep_cycle_a",)
    """,
    "qi_dep_bad_decl": """
        QI_REQUIRES = "qwen_image"
    """,
}
ENTRY_POINTS = {
    "aa_dep_early": "qi_dep_early",
    "zz_dep_base": "qi_dep_base",
    "dep_missing": "qi_dep_missing",
    "dep_cascade": "qi_dep_cascade",
    "dep_broken": "qi_dep_broken",
    "dep_on_broken": "qi_dep_on_broken",
    "dep_cycle_a": "qi_dep_cycle_a",
    "dep_cycle_b": "qi_dep_cycle_b",
    "dep_on_cycle": "qi_dep_on_cycle",
    "dep_bad_decl": "qi_dep_bad_decl",
}
HEADER = "from qi_core import Recipe, hookimpl\n\nQI_HOOK_API = 1\n"


@pytest.fixture
def dep_plugins(tmp_path, fresh):
    for name, code in MODULES.items():
        (tmp_path / f"{name}.py").write_text(HEADER + textwrap.dedent(code))
    info = tmp_path / "qi_dep_fixture-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qi-dep-fixture\nVersion: 1.0\n")
    eps = "".join(f"{k} = {v}\n" for k, v in ENTRY_POINTS.items())
    (info / "entry_points.txt").write_text(f"[qi.plugins]\n{eps}")
    fresh.syspath_prepend(str(tmp_path))
    plugin_host.reset()
    return report()


def test_plugins_load_after_what_they_require(dep_plugins):
    early = dep_plugins["aa_dep_early"]
    assert early["status"] == "ok", early["error"]  # sorted first, yet its requirement was already there
    assert dep_plugins["zz_dep_base"]["status"] == "ok"
    assert [r.name for r in qi.pipelines() if r.name == "dep-early"] == ["dep-early"]


def test_a_requirement_not_installed_cascades(dep_plugins):
    missing = dep_plugins["dep_missing"]
    assert missing["status"] == "missing-dependency" and missing["missing"] == ["not_installed_anywhere"]
    assert "it requires 'not_installed_anywhere', which is not installed" in missing["error"]
    assert missing["withheld"] == {"scheduler": ["dep-missing-schedule"]}
    cascade = dep_plugins["dep_cascade"]
    assert cascade["status"] == "missing-dependency" and cascade["missing"] == ["dep_missing"]
    assert (
        "'dep_missing', which is not loaded (missing-dependency: it requires 'not_installed_anywhere'"
        in (cascade["error"])
    )
    with pytest.raises(UnavailableNameError, match="provided by plugin 'dep_cascade', which is not loaded"):
        qi.get_scheduler("dep-cascade-schedule")


def test_a_broken_requirement_is_named_with_its_error(dep_plugins):
    assert dep_plugins["dep_broken"]["status"] == "error"
    p = dep_plugins["dep_on_broken"]
    assert p["status"] == "missing-dependency"
    assert "it requires 'dep_broken', which is not loaded (error: import failed: " in p["error"]
    assert "qi_this_module_does_not_exist" in p["error"]


def test_a_requirement_cycle_is_an_error_on_the_plugins_in_it(dep_plugins):
    for name, cycle in (("dep_cycle_a", "'dep_cycle_a' -> 'dep_cycle_b' -> 'dep_cycle_a'"),
                        ("dep_cycle_b", "'dep_cycle_b' -> 'dep_cycle_a' -> 'dep_cycle_b'")):  # fmt: skip
        p = dep_plugins[name]
        assert p["status"] == "error" and f"requirement cycle {cycle}" in p["error"], p["error"]
    on_cycle = dep_plugins["dep_on_cycle"]
    assert on_cycle["status"] == "missing-dependency" and "requirement cycle" in on_cycle["error"]


def test_a_malformed_declaration_is_an_error_with_the_fix(dep_plugins):
    p = dep_plugins["dep_bad_decl"]
    assert p["status"] == "error" and "write QI_REQUIRES = ('qwen_image',)" in p["error"]


def test_in_process_plugins_declare_requirements_too(fresh):
    mod = plugin_host.plugin_module(
        "inline_needs", qi_register_schedulers=lambda register: register("inline-needs", object)
    )
    mod.QI_REQUIRES = ("nowhere_plugin",)
    info = qi.register_plugin(mod)
    assert info.status == "missing-dependency" and info.provides == {}
    assert info.withheld == {"scheduler": ["inline-needs"]}
    mod2 = plugin_host.plugin_module(
        "inline_ok", qi_register_schedulers=lambda register: register("inline-ok", object)
    )
    mod2.QI_REQUIRES = ("qwen_image", "sampling")
    assert qi.register_plugin(mod2).status == "ok"


def test_load_order():
    order, cycles = plugin_host.load_order(
        ["a", "b", "c", "d", "e", "f"],
        {"a": ("c",), "c": ("b", "elsewhere"), "d": ("e",), "e": ("d",), "f": ("d",)},
    )
    assert cycles == {"d": ["d", "e", "d"], "e": ["e", "d", "e"]}
    assert order.index("b") < order.index("c") < order.index("a")
    assert order.index("d") < order.index("f") and order.index("e") < order.index("f")
    assert sorted(order) == ["a", "b", "c", "d", "e", "f"]
    assert plugin_host.load_order(["x"], {"x": ("X",)})[1] == {"x": ["x", "x"]}  # names compare normalised
