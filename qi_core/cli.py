"""The ``qi`` command line."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys

from qi_core.atomic import check_writable_parent
from qi_core.errors import QiError

EXIT_ERROR = 2  # a QiError: bad input, named in one line
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C


def _plugins(args: argparse.Namespace) -> int:
    from qi_core import plugins

    report = plugins()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for p in report:
        where = f"{p['distribution'] or '-'} {p['version'] or ''}".strip()
        print(f"{p['name']:<24} {p['status']:<18} {where}")
        if p["status"] == "ok":
            for kind, names in p["provides"].items():
                print(f"    {kind}: {', '.join(names)}")
        else:
            print(f"    {p['error']}")
    return 0


def _pipelines(args: argparse.Namespace) -> int:
    from qi_core import pipelines
    from qi_core.composer import describe
    from qi_core.plugin_host import host

    if args.json:
        print(json.dumps([describe(r) for r in pipelines()], indent=2, ensure_ascii=False))
        return 0
    reg = host().registry
    for r in pipelines():
        plugin = reg.get("pipeline", r.name).plugin
        print(f"{r.name:<32} {r.description}  [{plugin}; default model {r.model}]")
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from qi_core.plugin_host import host
    from qi_core.registry import Entry

    recipe = host().registry.get("pipeline", args.pipeline).load()
    if recipe.tiny is None:
        raise QiError(f"pipeline {args.pipeline!r} has no tiny-model builder")
    check_writable_parent(args.dir, "model folder")
    build = Entry("pipeline", recipe.name, recipe.tiny, "").load()
    out = build(args.dir, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote tiny {recipe.name} model to {out}")
    return 0


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``qi`` parser. The command being run (``argv[0]``) is configured with its own arguments when its
    ``configure`` takes ``argv`` (flags that depend on them, e.g. ``generate --pipeline P``); the others with
    ``argv=None``, so listing commands stays cheap."""
    from qi_core import __version__

    parser = argparse.ArgumentParser(prog="qi", description="Run and train the Qwen-Image family.")
    parser.add_argument("--version", action="version", version=f"qi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="list installed plugins")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_plugins)

    pl = sub.add_parser("pipelines", help="list pipelines (recipes)")
    pl.add_argument("--json", action="store_true", help="machine-readable: each pipeline with its parameters")
    pl.set_defaults(func=_pipelines)

    t = sub.add_parser("make-tiny-model", help="write a tiny random model in the official layout")
    t.add_argument("dir")
    t.add_argument("--pipeline", default="qwen-image")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(func=_make_tiny)

    from qi_core.plugin_host import host

    for entry in host().registry.entries("command"):
        if entry.name in sub.choices:
            continue  # built-in commands win; the collision is visible in `qi plugins`
        help_ = entry.meta.get("help") or f"(from plugin {entry.plugin})"
        aliases = [a for a in entry.aliases if a not in sub.choices]  # a taken alias stays the other's
        cmd = sub.add_parser(entry.name, aliases=aliases, help=help_)
        try:
            configure = entry.load()
            if "argv" in inspect.signature(configure).parameters:
                own = argv[1:] if argv and argv[0] in (entry.name, *aliases) else None
                configure(cmd, argv=own)
            else:
                configure(cmd)
        except Exception as e:  # one broken plugin command must not take the whole CLI down
            cmd.set_defaults(func=_broken(entry.name, entry.plugin, e))
    return parser


def _broken(name: str, plugin: str, error: Exception):
    def run(args: argparse.Namespace) -> int:
        print(f"qi: error: command {name!r} of plugin {plugin!r} failed to load: {error}", file=sys.stderr)
        return EXIT_ERROR

    return run


def _end_progress_bars() -> None:
    """Close the tqdm bars an exception left running, so the message below starts on its own line."""
    std = sys.modules.get("tqdm.std")  # no bar can be live if tqdm was never imported
    if std is None:
        return
    bars = [bar for bar in list(getattr(std.tqdm, "_instances", ())) if not bar.disable]
    for bar in bars:
        bar.close()  # leave=False bars clear their line; the others finish theirs
    if bars and not sys.stderr.isatty():
        sys.stderr.write("\n")  # a log file keeps the bar's text; end that line


def _stdout_gone() -> None:
    """After a BrokenPipeError (``qi … | head -1``): point stdout at devnull, so the interpreter's final flush
    does not raise again (the recipe of the Python docs, "Note on SIGPIPE")."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a stand-in stdout (tests, embedding) has no descriptor
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Run the ``qi`` command; exit code 0, 2 for a :class:`QiError` (one line on stderr), 130 on Ctrl-C."""
    try:
        try:
            argv = list(sys.argv[1:] if argv is None else argv)
            args = build_parser(argv).parse_args(argv)
            return args.func(args)
        finally:
            sys.stdout.flush()  # a closed pipe shows up here (also after --help), not at interpreter exit
    except BrokenPipeError:
        _stdout_gone()
        return 1
    except KeyboardInterrupt:
        _end_progress_bars()
        print("qi: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except QiError as e:
        _end_progress_bars()
        print(f"qi: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
