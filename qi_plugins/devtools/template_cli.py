"""``qi new-plugin NAME DIR``: render the plugin template (``plugin_template/`` of the qi repository, shipped
in this package as ``template/``) under a new name.

The template is a working plugin named ``example``; rendering replaces its names, nothing else:

==========================  ===============================  =====================================
in the template             becomes (NAME = ``my-variant``)  where
==========================  ===============================  =====================================
``qi-plugin-example``       ``qi-plugin-my-variant``         distribution name (PyPI)
``qi_plugin_example``       ``qi_plugin_my_variant``         package folder, imports, test file name
``qwen-image-example``      ``qwen-image-my-variant``        the registered recipe
``example-karras``          ``my-variant-karras``            the registered schedule
``example-rescaled-cfg``    ``my-variant-rescaled-cfg``      the registered guider
``example-midpoint``        ``my-variant-midpoint``          the registered sampler
``example``                 ``my_variant``                   entry-point name, ``NAME``, QI_DISABLE_PLUGINS
==========================  ===============================  =====================================

A name already taken is refused (:func:`check_name_free`): the rendered plugin would not load, or would not
register its recipe, next to the plugin owning it.
"""

from __future__ import annotations

import argparse
import re
from importlib import resources
from pathlib import Path

from qi_core.errors import InvalidInputError

TEMPLATE_NAME = "example"
_SKIP = ("__pycache__", ".pytest_cache", ".egg-info", ".pyc")


def template_dir() -> Path:
    return Path(str(resources.files("qi_plugins.devtools") / "template"))


def plugin_names(name: str) -> tuple[str, str]:
    """(hyphenated, underscored) forms of a plugin name; a ``qi-plugin-`` prefix is dropped."""
    n = name.strip().lower()
    for prefix in ("qi-plugin-", "qi_plugin_"):
        if n.startswith(prefix):
            n = n[len(prefix) :]
    if not re.fullmatch(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*", n):
        raise InvalidInputError(
            f"plugin name {name!r} must be lowercase letters and digits, words joined by '-' or '_', starting "
            "with a letter (e.g. 'karras-schedule')"
        )
    return n.replace("_", "-"), n.replace("-", "_")


def check_name_free(name: str) -> None:
    """Refuse a plugin name whose entry point, distribution, recipe or schedule name is taken by an installed
    plugin (qi's own included). Entry-point names compare with '-' == '_', as the plugin host does."""
    import importlib.metadata as md

    from qi_core.plugin_host import ENTRY_POINT_GROUP, PluginInfo, host, normal_name, owner

    hyphenated, underscored = plugin_names(name)
    taken = None
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        if normal_name(ep.name) == underscored:
            dist = getattr(ep, "dist", None)
            info = PluginInfo(ep.name, dist.metadata["Name"] if dist else None, dist.version if dist else None,
                              ep.value)  # fmt: skip
            taken = f"{owner(info)} has the entry point {ep.name!r} ('-' and '_' count as the same)"
            break
    if taken is None:
        try:
            dist = md.distribution(f"qi-plugin-{hyphenated}")
            taken = f"the distribution {dist.metadata['Name']} {dist.version} is installed"
        except md.PackageNotFoundError:
            pass
    if taken is None:
        registry = host().registry
        for kind, derived in (
            ("pipeline", f"qwen-image-{hyphenated}"),
            ("scheduler", f"{hyphenated}-karras"),
            ("guider", f"{hyphenated}-rescaled-cfg"),
            ("sampler", f"{hyphenated}-midpoint"),
        ):
            if derived in registry.names(kind):
                who = registry.get(kind, derived).plugin
                taken = (
                    f"{owner(host().plugins.get(who), who)} registers the {kind} {derived!r}, the new "
                    f"plugin's {kind} name"
                )
                break
    if taken is not None:
        raise InvalidInputError(
            f"plugin name {name!r} is taken: {taken}; a plugin of that name would clash with it (see "
            f"`qi plugins`). Pick another name, e.g. 'my-{hyphenated}'"
        )


def render_text(text: str, hyphenated: str, underscored: str) -> str:
    for old, new in (
        (f"qi-plugin-{TEMPLATE_NAME}", f"qi-plugin-{hyphenated}"),
        (f"qi_plugin_{TEMPLATE_NAME}", f"qi_plugin_{underscored}"),
        (f"qwen-image-{TEMPLATE_NAME}", f"qwen-image-{hyphenated}"),
        (f"{TEMPLATE_NAME}-karras", f"{hyphenated}-karras"),
        (f"{TEMPLATE_NAME}-rescaled-cfg", f"{hyphenated}-rescaled-cfg"),
        (f"{TEMPLATE_NAME}-midpoint", f"{hyphenated}-midpoint"),
    ):
        text = text.replace(old, new)
    return re.sub(rf"\b{TEMPLATE_NAME}\b", underscored, text)


def render(name: str, dest: str | Path, *, source: Path | None = None, force: bool = False) -> list[Path]:
    """Write the renamed template into ``dest`` (which must be empty unless ``force``); returns the files."""
    hyphenated, underscored = plugin_names(name)
    check_name_free(name)
    src, dest = Path(source or template_dir()), Path(dest)
    if not (src / "pyproject.toml").is_file():
        raise InvalidInputError(f"the plugin template is missing at {src} (a broken qi installation?)")
    if dest.exists() and any(dest.iterdir()) and not force:
        raise InvalidInputError(
            f"{dest} is not empty; pick a new folder (or pass --force to overwrite files)"
        )
    written = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_dir() or any(s in part for part in rel.parts for s in _SKIP):
            continue
        out = dest / Path(*(render_text(p, hyphenated, underscored) for p in rel.parts))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            render_text(path.read_text(encoding="utf-8"), hyphenated, underscored), encoding="utf-8"
        )
        written.append(out)
    return written


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="plugin name, e.g. 'karras-schedule' (distribution qi-plugin-NAME)")
    parser.add_argument("dir", help="folder to create")
    parser.add_argument("--force", action="store_true", help="write into a non-empty folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    files = render(args.name, args.dir, force=args.force)
    hyphenated, underscored = plugin_names(args.name)
    print(f"wrote qi-plugin-{hyphenated} ({len(files)} files) to {args.dir}")
    print(f"next: cd {args.dir} && pip install -e '.[test]' && qi plugins && pytest")
    return 0
