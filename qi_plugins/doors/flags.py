"""Command-line flags generated from a pipeline's declared call parameters (``qi_core.params.specs``).

Each parameter ``name`` becomes ``--name`` with underscores as hyphens, its type, its description and its default
in ``--help``; nothing here lists a variant's parameters. Values left out stay the recipe's defaults.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable
from typing import Any

from qi_core.errors import InvalidInputError

#: Parameters the command line sets another way: the prompt is positional, Python callables and the output
#: type have no command-line form (the command writes image files).
HANDLED_ELSEWHERE = ("prompt", "progress_bar_cmd", "output_type")
#: Short forms kept from earlier versions of the command line.
ALIASES = {"num_inference_steps": ("--steps",), "denoising_strength": ("--strength",),
           "num_images_per_prompt": ("-n", "--num-images")}  # fmt: skip


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _schema(spec: dict[str, Any]) -> dict[str, Any]:
    """The non-null alternative of an optional parameter's JSON schema."""
    t = spec["type"]
    options = [o for o in t.get("anyOf", [t]) if o.get("type") != "null"]
    return options[0] if options else {}


def _kind_of(schema: dict[str, Any]) -> str | None:
    t = schema.get("type")
    return next((x for x in t if x != "null"), None) if isinstance(t, list) else t


def add_parameter_flags(
    parser: argparse.ArgumentParser, specs: list[dict[str, Any]]
) -> dict[str, str | None]:
    """Add one flag per declared parameter; returns ``{name: kind}`` of the parameters that got one."""
    group = parser.add_argument_group("pipeline parameters", "declared by the pipeline and its plugins")
    added: dict[str, str | None] = {}
    for spec in specs:
        name = spec["name"]
        if name in HANDLED_ELSEWHERE or spec.get("kind") == "callable":
            continue
        schema = _schema(spec)
        kind = _kind_of(schema)
        default = spec["default"]
        shown = "" if default is None else f" (default: {default})"
        kw: dict[str, Any] = {"dest": name, "default": None, "help": f"{spec['description']}{shown}"}
        if spec.get("kind") == "entries":
            short = spec.get("shorthand") or {}
            fields = short.get("fields", ())
            form = ":".join(f"{f.upper()}" for f in fields) if fields else "KEY=VALUE,..."
            kw.update(action="append", type=_entry_parser(name, fields), metavar=form)
            kw["help"] += "; repeatable; also KEY=VALUE,... or a JSON object"
            aliases = (flag(short["flag"]),) if short.get("flag") else ()
            group.add_argument(flag(name), *aliases, **kw)
            added[name] = "entries"
            continue
        if spec.get("kind") in ("image", "mask"):
            kw["metavar"] = "FILE"
        elif spec.get("kind") in ("images", "masks"):
            kw.update(nargs="+", metavar="FILE")
        elif kind == "boolean":
            kw["action"] = argparse.BooleanOptionalAction
        elif "enum" in schema:
            kw["choices"] = schema["enum"]
        elif kind == "integer":
            kw["type"] = int
        elif kind == "number":
            kw["type"] = float
        elif kind == "array":
            kw["nargs"] = "+"
            item = _kind_of(schema.get("items", {}))
            kw["type"] = {"integer": int, "number": float}.get(item, str)
        group.add_argument(flag(name), *ALIASES.get(name, ()), **kw)
        added[name] = spec.get("kind")
    return added


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a path or a word


def _entry_parser(name: str, fields: tuple[str, ...]):
    """Parse one entry of an entries-kind parameter: a JSON object, ``KEY=VALUE,KEY=VALUE``, or the declared
    short form (``FIELD:FIELD[:FIELD]`` in the declared field order)."""

    def parse(text: str) -> dict[str, Any]:
        if text.lstrip().startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise argparse.ArgumentTypeError(f"not a JSON object ({e.msg})") from None
            if not isinstance(value, dict):
                raise argparse.ArgumentTypeError('a JSON object, e.g. \'{"image": "a.png"}\'')
            return value
        if "=" in text:
            pairs = [p.partition("=") for p in text.split(",")]
            if any(not sep or not k for k, sep, _ in pairs):
                raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE,KEY=VALUE")
            return {k.strip(): _value(v) for k, _, v in pairs}
        parts = text.split(":")
        if not fields or len(parts) > len(fields):
            form = ":".join(fields) if fields else "KEY=VALUE,..."
            raise argparse.ArgumentTypeError(f"{text!r} is not {form}")
        return {f: _value(v) for f, v in zip(fields, parts, strict=False)}

    parse.__name__ = name  # argparse names the type in its error
    return parse


def option_value(text: str) -> Any:
    """The value of an option's flag (``qi_register_options``): a JSON object, ``KEY=VALUE,...`` (a dict), or a
    name; a switch given bare is True."""
    if text.lstrip().startswith("{") or "=" in text:
        return _entry_parser("option", ())(text)
    return _value(text)


def add_option_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """A ``--name`` flag for every registered option; {dest: option name}."""
    from qi_core.plugin_host import host

    group = parser.add_argument_group("options (registered by plugins; qi.compose keywords)")
    added = {}
    for entry in host().registry.entries("option"):
        dest = f"option_{entry.name}"
        kw: dict[str, Any] = dict(dest=dest, type=option_value, default=None, help=entry.meta.get("help", ""))
        if entry.meta.get("switch"):
            kw.update(nargs="?", const=True, metavar="SETTINGS")
        else:
            kw["metavar"] = "NAME|KEY=VALUE,..."
        group.add_argument(flag(entry.name), **kw)
        added[dest] = entry.name
    return added


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line, as ``qi.compose`` keywords."""
    return {name: getattr(args, dest) for dest, name in getattr(args, "option_flags", {}).items()
            if getattr(args, dest, None) is not None}  # fmt: skip


def call_from_args(args: argparse.Namespace, flags: dict[str, str | None]) -> dict[str, Any]:
    """The call parameters the user gave (flags left out are not passed: the recipe's defaults apply). A
    single file for a "one image or a list" parameter is passed as one image."""
    call = {}
    for name, kind in flags.items():
        value = getattr(args, name, None)
        if value is not None:
            call[name] = value[0] if kind == "images" and len(value) == 1 else value
    return call


def as_flag_error(e: InvalidInputError, names: Iterable[str] = ()) -> InvalidInputError:
    """An error about call parameters, reworded with their flags: the parameter it starts with
    (``--cfg-scale must be …``) and every ``name=value`` fix it suggests (``--width 72``)."""
    text = str(e)
    name = getattr(e, "param", None)
    first = text.split(" ", 1)[0]
    if name is None and first in names and text.startswith((f"{first} is ", f"{first} must ")):
        name = first
    if name and name not in HANDLED_ELSEWHERE and text.startswith(name):
        text = flag(name) + text[len(name) :]
        text = text.replace(f" — {name}: ", f" — {flag(name)}: ")
    for n in names:
        if n not in HANDLED_ELSEWHERE:
            text = re.sub(rf"\b{n}=(?=[^\s,;)])", f"{flag(n)} ", text)
    if text == str(e):
        return e
    out = type(e)(text)
    out.param = getattr(e, "param", None)
    return out


def flag_tables(recipes: list[Any]) -> str:
    """Markdown for docs/cli.md: the flags of the first recipe (type, default, description), then for each
    other recipe the flags it adds to those."""
    from qi_core.composer import describe

    specs = {
        r.name: [s for s in describe(r)["parameters"] if s["name"] not in HANDLED_ELSEWHERE] for r in recipes
    }
    base, *rest = recipes

    def named(s: dict[str, Any]) -> str:
        short = (s.get("shorthand") or {}).get("flag")
        others = [*ALIASES.get(s["name"], ()), *([flag(short)] if short else [])]
        return " ".join(f"`{f}`" for f in (flag(s["name"]), *others))

    rows = ["| flag | type | default | meaning |", "|---|---|---|---|"]
    for s in specs[base.name]:
        kind = s["kind"] or _kind_of(_schema(s)) or "any"
        rows.append(f"| {named(s)} | {kind} | `{s['default']}` | {s['description']} |")
    known = {s["name"] for s in specs[base.name]}

    rows += ["", "| pipeline | its own flags |", "|---|---|"]
    for r in rest:
        extra = [named(s) for s in specs[r.name] if s["name"] not in known]
        rows.append(f"| `{r.name}` | {', '.join(extra) or '—'} |")
    return "\n".join(rows) + "\n"


def docs_tables() -> str:
    """:func:`flag_tables` of every registered pipeline, the default one first (what docs/cli.md shows)."""
    import qi_core as qi

    recipes = sorted(qi.pipelines(), key=lambda r: (r.name != "qwen-image", r.name))
    return flag_tables(recipes)
