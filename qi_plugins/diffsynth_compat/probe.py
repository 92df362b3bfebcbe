"""Which recipes' parts take the given weights, decided from tensor names and shapes alone.

DiffSynth-Studio recognises a checkpoint by hashing its key set against a table of known models, so a
Qwen-Image-Layered transformer loads as the layered DiT whatever its file is called. qi asks the parts
instead, so nothing here (or in any table) names a variant: each candidate part is built on the meta device
(no memory, no weights read) from the config it would load with (the ``config.json`` beside the weights, else
one read off their shapes), and the keys and shapes of its state dict are compared with the file headers. A
layered transformer (one extra ``time_text_embed.addition_t_embedding.weight``) then fits exactly the parts
that build that embedding.

A part's factory reads its modules through the ``load`` it is handed (``factory(..., load=)``, as the composer
hands it a memory policy's); the probe hands it one that compares instead of loading. Only roles whose part
differs between candidate recipes are probed (the text encoder, shared by every recipe, never is); a factory
that takes no ``load`` cannot be asked.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qi_core.errors import ModelLoadError, QiError
from qi_core.recipe import Component, Recipe
from qi_plugins.diffsynth_compat.detect import Shapes
from qi_plugins.diffsynth_compat.resolve import Weights, roles_in


class _Compared(Exception):  # noqa: N818 — control flow, never seen by users
    """Stops a part's factory once the probe has compared (nothing is loaded)."""


class _ProbeLoad:
    """A factory's ``load`` (see :class:`qi_core.loading.PolicyLoader`) that compares keys and shapes."""

    def __init__(self, shapes: Shapes):
        self.shapes = shapes
        self.fits: bool | None = None

    def __call__(self, build: Callable[[], Any], files: list[Path], **_: Any) -> Any:
        import torch

        with torch.device("meta"):  # shapes only: no memory, no weights read
            module = build()
        want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        self.fits = want == self.shapes  # the same strict check load_module makes, on the headers
        raise _Compared


class PartProbe:
    """Answers "does this part take these weights?" once per (part, weights)."""

    def __init__(self) -> None:
        self._verdicts: dict[tuple[str, str, tuple[str, ...]], bool | None] = {}
        self._tmp: Path | None = None

    def fits(self, comp: Component, role: str, w: Weights) -> bool | None:
        """True / False, or None when the part cannot be asked (no config to build it from, or its factory
        failed in a way that says nothing about these weights)."""
        key = (comp.kind, comp.part, tuple(str(f) for f in w.files))
        if key not in self._verdicts:
            self._verdicts[key] = self._ask(comp, role, w)
        return self._verdicts[key]

    def _ask(self, comp: Component, role: str, w: Weights) -> bool | None:
        import torch

        from qi_core.loading import takes_load
        from qi_core.plugin_host import host
        from qi_plugins.diffsynth_compat.staging import stage_folder

        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="qi-probe-"))
        folder = self._tmp / str(len(self._verdicts))  # one folder per question
        try:
            stage_folder(folder, w.files, role, quiet=True)
        except ModelLoadError:
            return None  # e.g. a text encoder without its config.json: the real load reports it
        factory = host().registry.get(comp.kind, comp.part).load()
        if not takes_load(factory):
            return None  # it would read the weights for real
        load = _ProbeLoad(w.shapes)
        try:
            factory(root=self._tmp, folder=folder, device="cpu", dtype=torch.float32, load=load)
        except _Compared:
            pass
        except QiError:
            return False if load.fits is None else load.fits  # the part refused the folder itself
        except Exception:
            return load.fits  # a factory bug says nothing about the weights; the real load will show it
        return load.fits

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def taking(recipes: Sequence[Recipe], weights: Sequence[Weights], probe: PartProbe) -> list[Recipe]:
    """The recipes that have a slot for every given weight file and whose parts take them.

    Only roles whose part differs between these recipes are probed; a part that cannot be asked (None) does
    not exclude its recipe.
    """
    slots = {}
    for r in recipes:
        try:
            slots[r.name] = roles_in(weights, r)
        except ModelLoadError:
            continue  # no slot for one of the files
    pool = [r for r in recipes if r.name in slots]
    parts: dict[str, set[tuple[str, str]]] = {}
    for r in pool:
        for role in slots[r.name]:
            c = r.components[role]
            parts.setdefault(role, set()).add((c.kind, c.part))
    differing = {role for role, ps in parts.items() if len(ps) > 1}
    return [
        r for r in pool
        if all(probe.fits(r.components[role], role, w) is not False
               for role, ws in slots[r.name].items() if role in differing for w in ws)
    ]  # fmt: skip
