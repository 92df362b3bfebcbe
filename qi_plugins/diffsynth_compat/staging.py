"""A model root in the official layout, assembled from wherever DiffSynth's ``ModelConfig`` s point.

DiffSynth user code picks files across repositories (an Edit DiT, the Qwen-Image text encoder and VAE, the
Edit processor, shard subsets …). qi's loaders read official folders (``transformer/`` with its
``config.json``). The staged root holds one folder per role: a link to the official folder when the files
are exactly its weights, else links to the files plus the ``config.json`` beside them (or one read off the
weight shapes, :mod:`~qi_plugins.diffsynth_compat.detect`) and a shard index. Links only: nothing is copied
unless the file system refuses links. Roles loaded from files (ControlNets, LoRAs: components without a
subfolder) are passed to ``qi.compose(components=...)`` as file lists instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from qi_core.errors import MissingComponentError, ModelLoadError
from qi_core.loading import weight_files
from qi_core.recipe import Recipe
from qi_plugins.diffsynth_compat.detect import INFER_CONFIG, read_shapes
from qi_plugins.diffsynth_compat.resolve import Weights

STAGING_VERSION = 1  # bump when the staged layout changes, so old cache entries are not reused


def stage(base: Path, recipe: Recipe, roles: dict[str, list[Weights]], extra_folders: dict[str, Path]
          ) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    """(model root for ``qi.compose``, ``components=`` overrides). ``extra_folders``: subfolder → folder
    (``tokenizer``, ``processor``)."""
    overrides: dict[str, Any] = {}
    folders: dict[str, list[Path]] = {}
    for role, ws in roles.items():
        files = [f for w in ws for f in w.files]
        sub = recipe.components[role].subfolder
        if sub is None:
            overrides[role] = files
        else:
            folders[sub] = files
    missing = [
        (role, c) for role, c in recipe.components.items()
        if role not in roles and c.required and (c.subfolder is None or c.subfolder not in extra_folders)
    ]  # fmt: skip
    if missing:
        role, c = missing[0]
        where = f"folder {c.subfolder}/ of {c.model or recipe.model}" if c.subfolder else f"{c.model}"
        pattern = f"{c.subfolder}/" if c.subfolder else (c.pattern or "*.safetensors")
        how = (
            f"{c.subfolder}_config=ModelConfig(model_id=..., origin_file_pattern='{pattern}')"
            if c.subfolder in ("tokenizer", "processor")
            else f"ModelConfig(model_id={(c.model or recipe.model)!r}, origin_file_pattern='{pattern}') "
            "to model_configs"
        )
        raise MissingComponentError(
            f"pipeline {recipe.name!r} needs its {role!r} model ({where}) but no ModelConfig provides it; "
            f"add {how}"
        )
    for role, c in recipe.components.items():  # optional file-loaded slots left empty, never downloaded
        if role not in roles and c.subfolder is None and not c.required:
            overrides[role] = []

    key = _key(recipe.name, folders, extra_folders)
    root = base / key
    if not (root / ".complete").exists():
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=base))
        try:
            for sub, files in folders.items():
                stage_folder(tmp / sub, files, _role_of(recipe, sub))
            for sub, folder in extra_folders.items():
                if sub not in folders:
                    _link(folder.resolve(), tmp / sub)
            (tmp / ".complete").write_text(json.dumps({"recipe": recipe.name, "version": STAGING_VERSION}))
            try:
                os.replace(tmp, root)
            except OSError:  # another process staged the same root meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    for role, c in recipe.components.items():
        if role in roles and c.subfolder is not None:
            overrides[role] = root / c.subfolder
    return root, overrides


def _role_of(recipe: Recipe, sub: str) -> str:
    return next(r for r, c in recipe.components.items() if c.subfolder == sub)


def _key(name: str, folders: dict[str, list[Path]], extra: dict[str, Path]) -> str:
    def stamp(p: Path) -> list[Any]:
        st = p.stat()
        return [str(p.resolve()), st.st_size, st.st_mtime_ns]

    doc = {
        "v": STAGING_VERSION,
        "recipe": name,
        "folders": {s: [stamp(f) for f in fs] for s, fs in sorted(folders.items())},
        "extra": {s: str(p.resolve()) for s, p in sorted(extra.items())},
    }
    return hashlib.sha1(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def stage_folder(dst: Path, files: list[Path], role: str, *, quiet: bool = False) -> None:
    """``dst`` as the official folder of ``role`` holding ``files``: a link to their folder when they are all of
    its weights, else links to them plus the ``config.json`` beside them, else a config read off their shapes
    (``quiet``: without the warning that the RoPE split was guessed)."""
    parent = files[0].parent
    same_folder = all(f.parent == parent for f in files)
    if same_folder and (parent / "config.json").is_file():
        try:
            whole = {p.resolve() for p in weight_files(parent)}
        except ModelLoadError:
            whole = set()
        if whole == {f.resolve() for f in files}:
            _link(parent.resolve(), dst)  # exactly the official folder
            return
    dst.mkdir(parents=True)
    names: dict[str, Path] = {}
    for f in files:
        if f.name in names:
            raise ModelLoadError(f"two weight files named {f.name!r} for {role}: {names[f.name]} and {f}")
        names[f.name] = f
        _link(f.resolve(), dst / f.name)
    if same_folder and (parent / "config.json").is_file():
        for extra in parent.iterdir():  # config.json, generation_config.json …, but no shard index
            if extra.is_file() and extra.suffix != ".safetensors" and not extra.name.endswith(".index.json"):
                _link(extra.resolve(), dst / extra.name)
    elif role in INFER_CONFIG:
        config = INFER_CONFIG[role](read_shapes(files))
        if "axes_dims_rope" in config and not quiet:
            # the RoPE split is the one size the weights do not store
            warnings.warn(
                f"{files[0]}: no config.json beside the {role} weights; the RoPE axes are taken as "
                f"{config['axes_dims_rope']} (the official 1/8, 7/16, 7/16 split of the head dim). If the "
                "checkpoint was trained with another split, put its config.json beside the weights",
                stacklevel=2,
            )
        (dst / "config.json").write_text(json.dumps(config, indent=2))
    else:
        raise MissingComponentError(
            f"the {role} weights {', '.join(str(f) for f in files[:2])} come without the config.json of their "
            "official folder; put it beside them (e.g. text_encoder/config.json of Qwen/Qwen-Image)"
        )
    if len(files) > 1:
        _write_index(dst, files)


def _write_index(dst: Path, files: list[Path]) -> None:
    stem = "model" if all(f.name.startswith("model") for f in files) else "diffusion_pytorch_model"
    weight_map = {k: f.name for f in files for k in read_shapes([f])}
    doc = {
        "metadata": {"note": "written by qi's DiffSynth front for a subset of shards"},
        "weight_map": weight_map,
    }
    (dst / f"{stem}.safetensors.index.json").write_text(json.dumps(doc, indent=1))


def _link(src: Path, dst: Path) -> None:
    """Symlink; where the file system refuses, hard links (files) or a folder of links (folders)."""
    try:
        os.symlink(src, dst, target_is_directory=src.is_dir())
        return
    except OSError:
        pass
    if src.is_dir():
        dst.mkdir()
        for child in src.iterdir():
            _link(child, dst / child.name)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
