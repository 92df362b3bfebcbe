"""``qi migrate-diffsynth FILE...``: point DiffSynth-Studio Qwen-Image scripts at qi's compatible front.

Only imports of the names the front provides are rewritten; any other ``diffsynth`` import is reported (the
script needs a change there by hand). Prints the changed lines; ``--write`` edits the files in place.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

FRONT = "qi_plugins.diffsynth_compat"
# what the front provides; DiffSynth's examples import the first four from diffsynth.pipelines.qwen_image (or
# ModelConfig from diffsynth.core), load_state_dict from diffsynth.core or diffsynth, merge_lora from
# diffsynth.utils.lora
NAMES = {
    "QwenImagePipeline",
    "ModelConfig",
    "ControlNetInput",
    "FlowMatchScheduler",
    "load_state_dict",
    "merge_lora",
}
_IMPORT = re.compile(
    r"^(?P<indent>\s*)from\s+(?P<module>diffsynth(?:\.[\w.]+)?)\s+import\s+(?P<names>[^#\n]+?)\s*(?P<comment>#.*)?$"
)


def migrate_source(text: str) -> tuple[str, list[tuple[int, str, str]], list[tuple[int, str]]]:
    """(new text, [(line number, old, new)], [(line number, diffsynth import left as is)]).

    A parenthesised import over several lines counts as one (it becomes one line); one that also imports
    names the front does not provide is left whole and reported, as is any ``import diffsynth...``.
    """
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    changed, left = [], []
    i = 0
    while i < len(lines):
        line, first = lines[i], i
        joined = line.rstrip("\r\n")
        if (
            re.match(r"^\s*from\s+diffsynth\b[\w.]*\s+import\s*\(", joined)
            and ")" not in joined.split("#")[0]
        ):
            while i + 1 < len(lines) and ")" not in lines[i].split("#")[0]:
                i += 1  # the rest of a parenthesised import
            joined = " ".join(part.split("#")[0].strip() for part in lines[first : i + 1])
        block = "".join(lines[first : i + 1])
        i += 1
        m = _IMPORT.match(joined)
        if m is None:
            if re.match(r"^\s*(from|import)\s+diffsynth\b", line):
                left.append((first + 1, block.rstrip()))
            out.append(block)
            continue
        names = [n.strip() for n in m["names"].strip().strip("()").split(",") if n.strip()]
        if not names or not {n.split(" as ")[0].strip() for n in names} <= NAMES:
            left.append((first + 1, block.rstrip()))
            out.append(block)
            continue
        end = block[len(block.rstrip("\r\n")) :]
        comment = f"  {m['comment']}" if m["comment"] else ""
        new = f"{m['indent']}from {FRONT} import {', '.join(names)}{comment}{end}"
        changed.append((first + 1, block.rstrip(), new.rstrip()))
        out.append(new)
    return "".join(out), changed, left


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", help="Python files using diffsynth.pipelines.qwen_image")
    parser.add_argument("--write", action="store_true", help="edit the files in place")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qi_core.errors import InvalidInputError

    status = 0
    for name in args.files:
        path = Path(name)
        if not path.is_file():
            raise InvalidInputError(f"{name} is not a file")
        text, changed, left = migrate_source(path.read_text(encoding="utf-8"))
        for n, old, new in changed:
            print(f"{path}:{n}: - {old.strip()}\n{path}:{n}: + {new.strip()}")
        for n, old in left:
            print(f"{path}:{n}: not migrated (no qi equivalent imported here): {old.strip()}")
            status = 1
        if args.write and changed:
            path.write_text(text, encoding="utf-8")
    return status
