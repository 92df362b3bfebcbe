"""Which registered recipe a set of DiffSynth ``ModelConfig`` s needs, and which role each one fills.

Nothing here names a variant. Every recipe says which hub ids it serves (:attr:`Recipe.model_ids`, its default
``model`` and the ``model`` of its components); the recipe picked is the one those ids describe best:

1. candidates are the recipes that *declare* (``model_ids``) at least one given id;
2. fewest given ids it does not serve at all;
3. then the rarest ids: each given id it declares counts 1/(number of recipes declaring it), then each id it
   serves 1/(number of recipes serving it) — an id every recipe serves (the shared text encoder) says little,
   a DiT or ControlNet id says much;
4. then the tokenizer/processor ids the same way, the smaller served set, fewer adapters, the name.

Without any model id (only ``path=`` configs) every recipe that has a slot for each detected role is a
candidate and the tokenizer/processor ids decide.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from qi_core.errors import InvalidInputError, ModelLoadError
from qi_core.recipe import Recipe
from qi_plugins.diffsynth_compat.detect import Shapes, detect_role, read_shapes


@dataclass
class Weights:
    """The files one ``ModelConfig`` resolved to."""

    files: list[Path]  # safetensors files, in the order given
    model_id: str | None  # hub id, None for path= configs
    folder_hint: str | None  # the official subfolder the files come from ("transformer"), if any
    source: str  # how the user named them, for messages
    index: int  # position in model_configs (ControlNet ids follow it)
    role: str | None = None  # filled by assign_roles
    _shapes: Shapes | None = None

    @property
    def shapes(self) -> Shapes:
        if self._shapes is None:
            self._shapes = read_shapes(self.files)
        return self._shapes


def folder_hint(pattern: str | list[str] | None, files: Sequence[Path]) -> str | None:
    """``"transformer/diffusion_pytorch_model*.safetensors"`` → ``"transformer"``; for local files, the name
    of the folder holding them."""
    pat = pattern[0] if isinstance(pattern, list) and pattern else pattern
    if isinstance(pat, str):
        head = pat.strip("/").split("/")
        return head[0] if len(head) > 1 or pat.endswith("/") else None
    parents = {f.parent.name for f in files}
    return parents.pop() if len(parents) == 1 else None


def served(r: Recipe) -> set[str]:
    ids = set(r.model_ids) | {c.model for c in r.components.values() if c.model}
    return ids | ({r.model} if r.model else set())


def choose_recipe(ids: Sequence[str], recipes: Sequence[Recipe], hints: Sequence[str] = (),
                  roles: Iterable[str] = ()) -> Recipe:  # fmt: skip
    """The recipe the model ids (and detected roles of ``path=`` weights) describe best; see the module doc."""
    ids, hints, roles = list(dict.fromkeys(ids)), list(dict.fromkeys(hints)), set(roles)
    n_declared = {g: sum(g in r.model_ids for r in recipes) for g in {*ids, *hints}}
    n_served = {g: sum(g in served(r) for r in recipes) for g in {*ids, *hints}}

    def declaring(pool: Sequence[Recipe]) -> list[Recipe]:
        return [r for r in pool if set(r.model_ids) & set(ids)] if ids else list(pool)

    # recipes with a slot for every detected role; if none has, assign_roles will say which file has no slot
    candidates = declaring([r for r in recipes if roles <= set(r.components)]) or declaring(recipes)
    if not candidates:
        known = sorted({g for r in recipes for g in r.model_ids})
        what = f"model ids {', '.join(ids)}" if ids else f"weights for {', '.join(sorted(roles))}"
        raise InvalidInputError(
            f"no installed plugin has a pipeline for {what}. Model ids served: {', '.join(known)}. Install the "
            "plugin for this model (see `qi plugins`) or pass recipe='NAME' (see `qi pipelines`)"
        )

    def rarity(r: Recipe, given: list[str]) -> tuple[float, float]:
        s = served(r)
        declared = sum(1 / n_declared[g] for g in given if g in r.model_ids)
        return declared, sum(1 / n_served[g] for g in given if g in s)

    def key(r: Recipe) -> tuple:
        uncovered = sum(g not in served(r) for g in ids)
        d, s = rarity(r, ids)
        hd, hs = rarity(r, hints)
        return (uncovered, -d, -s, -hd, -hs, len(served(r)), len(r.adapters), r.name)

    return min(candidates, key=key)


def assign_roles(weights: list[Weights], recipe: Recipe) -> dict[str, list[Weights]]:
    """Role → the weights filling it, in ``model_configs`` order.

    A config fills the component whose ``model`` is its hub id, else the one whose ``subfolder`` its pattern
    (or folder) names, else the role its tensor names reveal (:func:`detect_role`).
    """
    comps = recipe.components
    out: dict[str, list[Weights]] = {}
    for w in weights:
        role = None
        if w.model_id is not None:
            by_id = [n for n, c in comps.items() if c.model == w.model_id]
            if len(by_id) > 1:
                by_id = [n for n in by_id if comps[n].subfolder == w.folder_hint] or by_id[:1]
            role = by_id[0] if by_id else None
        if role is None and w.folder_hint is not None:
            by_folder = [n for n, c in comps.items() if c.subfolder == w.folder_hint]
            role = by_folder[0] if len(by_folder) == 1 else None
        if role is None:
            detected = detect_role(w.shapes)
            if detected in comps:
                role = detected
            else:
                why = (
                    "a LoRA: load it with pipe.load_lora(pipe.dit, path, alpha=...)"
                    if detected == "lora"
                    else f"detected as {detected!r}"
                    if detected
                    else "not recognised from its tensor names"
                )
                raise ModelLoadError(
                    f"{w.source} is {why}; pipeline {recipe.name!r} has no slot for it "
                    f"(its components: {', '.join(comps)})"
                )
        w.role = role
        out.setdefault(role, []).append(w)
    for role, ws in out.items():
        if len(ws) > 1 and comps[role].subfolder is not None:
            seen: dict[str, str] = {}
            for w in ws:
                for k in w.shapes:
                    if k in seen:
                        raise ModelLoadError(
                            f"{seen[k]} and {w.source} both hold {k!r}: two models for the {role!r} slot of "
                            f"pipeline {recipe.name!r}; pass one of them"
                        )
                    seen[k] = w.source
    return out
