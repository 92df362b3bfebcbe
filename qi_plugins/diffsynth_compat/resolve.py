"""Which registered recipe a set of DiffSynth ``ModelConfig`` s needs, and which role each one fills.

Nothing here names a variant. DiffSynth has one pipeline that takes any weights of the right architecture and
any call parameter; qi picks the registered recipe the given files describe best:

1. candidates: the recipes with a slot for every given weight file whose parts take those weights (the
   architecture, read from the tensor names and shapes: :mod:`~qi_plugins.diffsynth_compat.probe`). A
   fine-tune with an id no plugin has heard of is a candidate like any other weights of its architecture;
2. never a recipe whose adapters would add a LoRA the user did not name (none of its ids given);
3. a slot for each given tokenizer/processor folder some recipe can use (``processor_config`` → a recipe
   that loads the VL processor, so ``edit_image`` works whatever the DiT id);
4. a recipe that declares (``Recipe.model_ids``) one of the given ids, if any does;
5. fewest given ids it does not serve at all;
6. then the rarest ids: each given id it declares (``Recipe.model_ids``) counts 1/(number of recipes declaring
   it), then each id it serves (declares, or its ``model`` / a component's ``model``) 1/(number serving it) —
   an id every recipe serves (the shared text encoder) says little, a DiT or ControlNet id says much;
7. then the tokenizer/processor ids it declares, the fewest adapters, components and served ids (the plainest
   recipe), the name.

Without any id (only ``path=`` configs) the weights and the tokenizer/processor ids decide. Call parameters
of other plugins still work on the recipe picked: the front adds their injectors on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
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
                  roles: Iterable[str] = (), *, extras: Iterable[str] = (),
                  taking: Callable[[list[Recipe]], list[Recipe]] | None = None) -> Recipe:  # fmt: skip
    """The recipe the given weights and ids describe best; see the module doc.

    ``ids``: hub ids of the weight configs; ``hints``: those of the tokenizer/processor configs; ``roles``:
    what the weight files are (:func:`~qi_plugins.diffsynth_compat.detect.detect_role`); ``extras``: the
    folders given besides the weights (``"processor"``); ``taking``: keeps the recipes whose parts take the
    weights.
    """
    ids, hints = list(dict.fromkeys(ids)), list(dict.fromkeys(hints))
    roles = set(roles) - {"lora"}  # a LoRA in model_configs never picks a recipe; assign_roles explains
    known = {g for r in recipes for g in served(r)}
    if not roles and ids and not set(ids) & known:
        raise InvalidInputError(
            f"no installed plugin has a pipeline for model ids {', '.join(ids)}, and the weights were not "
            f"recognised from their tensor names. Model ids served: {', '.join(sorted(known))}. Install the "
            "plugin for this model (see `qi plugins`) or pass recipe='NAME' (see `qi pipelines`)"
        )
    pool = [r for r in recipes if roles <= set(r.components)] or list(recipes)
    if taking is not None:
        pool = taking(pool) or pool  # weights no part takes: the load names the mismatching tensors
    if not pool:
        raise InvalidInputError(
            "no pipelines are registered: is qi installed with its plugins? (`qi plugins`)"
        )
    slotted = {c.subfolder for r in recipes for c in r.components.values() if c.subfolder}
    extras = [e for e in dict.fromkeys(extras) if e in slotted]
    n_declared = {g: sum(g in r.model_ids for r in recipes) for g in {*ids, *hints}}
    n_served = {g: sum(g in served(r) for r in recipes) for g in {*ids, *hints}}

    def rarity(r: Recipe, given: list[str]) -> tuple[float, float]:
        s = served(r)
        declared = sum(1 / n_declared[g] for g in given if g in r.model_ids)
        return declared, sum(1 / n_served[g] for g in given if g in s)

    def key(r: Recipe) -> tuple:
        unasked = bool(r.adapters) and not set(r.model_ids) & set(ids)
        subs = {c.subfolder for c in r.components.values()}
        no_slot = sum(e not in subs for e in extras)
        silent = bool(ids) and not set(r.model_ids) & set(ids)
        uncovered = sum(g not in served(r) for g in ids)
        d, s = rarity(r, ids)
        hd, _ = rarity(r, hints)
        return (unasked, no_slot, silent, uncovered, -d, -s, -hd, len(r.adapters), len(r.components), len(served(r)),
                r.name)  # fmt: skip

    return min(pool, key=key)


def role_of(w: Weights, recipe: Recipe) -> str:
    """The component of ``recipe`` that ``w`` fills: the one whose ``model`` is its hub id, else the one whose
    ``subfolder`` its pattern (or folder) names, else the role its tensor names reveal."""
    comps = recipe.components
    if w.model_id is not None:
        by_id = [n for n, c in comps.items() if c.model == w.model_id]
        if len(by_id) > 1:
            by_id = [n for n in by_id if comps[n].subfolder == w.folder_hint] or by_id[:1]
        if by_id:
            return by_id[0]
    if w.folder_hint is not None:
        by_folder = [n for n, c in comps.items() if c.subfolder == w.folder_hint]
        if len(by_folder) == 1:
            return by_folder[0]
    detected = detect_role(w.shapes)
    if detected in comps and detected != "lora":  # DiffSynth loads LoRAs with load_lora, never as a model
        return detected
    why = (
        "a LoRA: load it with pipe.load_lora(pipe.dit, path, alpha=...)"
        if detected == "lora"
        else f"detected as {detected!r}"
        if detected
        else "not recognised from its tensor names"
    )
    raise ModelLoadError(
        f"{w.source} is {why}; pipeline {recipe.name!r} has no slot for it (its components: {', '.join(comps)})"
    )


def roles_in(weights: Sequence[Weights], recipe: Recipe) -> dict[str, list[Weights]]:
    """Role → the weights filling it in ``recipe``, in ``model_configs`` order (nothing is changed)."""
    out: dict[str, list[Weights]] = {}
    for w in weights:
        out.setdefault(role_of(w, recipe), []).append(w)
    return out


def assign_roles(weights: list[Weights], recipe: Recipe) -> dict[str, list[Weights]]:
    """Role → the weights filling it (:func:`role_of`), in ``model_configs`` order; sets ``Weights.role``.
    Two files for one folder-loaded slot must not hold the same tensors (two DiTs, say)."""
    out = roles_in(weights, recipe)
    comps = recipe.components
    for role, ws in out.items():
        for w in ws:
            w.role = role
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
