"""Training support of the edit models: the ``edit_image`` metadata column and its form check.

``qi train --extra_inputs edit_image --data_file_keys image,edit_image`` hands each row's edit image(s) to the
``edit-image`` injector as a call parameter. The column's form must match the model (DiffSynth-Studio's rule,
maintainer answer in its issue #1235): Qwen-Image-Edit was trained with the single-image template, so the
column holds one path; Edit-2509/2511 were trained with the "Picture N:" template, so it holds a list of paths
(a JSON list in a csv cell, a list in json/jsonl), even for one image. Both forms would otherwise run and silently
train the wrong prompt template — the most frequent confusion with edit training data.

The check only concerns training metadata: images loaded by :func:`load_edit_image` carry a marker, so
inference calls (a PIL image or a list, with either model) are unaffected.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from qi_core.errors import InvalidInputError
from qi_core.sizing import SizeSpec, load_rgb

METADATA_MARK = "qi:edit_image_file"  # PIL info key: the metadata file this edit image was loaded from
FORMS = (None, "single", "list")  # values of the edit_image_form call parameter


def load_edit_image(path: str, size: SizeSpec) -> Image.Image:
    """The seed's loader for ``edit_image`` (RGB, cropped and resized like the target), marked as metadata."""
    image = load_rgb(path, size)
    image.info[METADATA_MARK] = path
    return image


def metadata_files(items: list[Any]) -> list[str]:
    """The metadata files among ``items`` (empty for an inference call)."""
    return [
        im.info[METADATA_MARK] for im in items if isinstance(im, Image.Image) and METADATA_MARK in im.info
    ]


def check_metadata_form(value: Any, form: str | None, pipeline: str) -> None:
    """Raise when training metadata gives ``edit_image`` in the form the model was not trained with."""
    if form not in FORMS:
        raise InvalidInputError(f"edit_image_form must be 'single', 'list' or None, got {form!r}")
    multi = isinstance(value, (list, tuple))
    items = list(value) if multi else [value]
    files = metadata_files(items)
    if form is None or not files:
        return
    if form == "list" and not multi:
        raise InvalidInputError(
            f"the training metadata gives edit_image as a single path ({files[0]!r}), but {pipeline!r} takes a "
            "list of edit images (its 'Picture N:' prompt template). Write the column as a list, even for one "
            'image: a JSON list in a csv cell ("[""a.png""]" quoted, i.e. ["a.png"]) or a list in json/jsonl; '
            "or train qwen-image-edit for single-image editing"
        )
    if form == "single" and multi:
        raise InvalidInputError(
            f"the training metadata gives edit_image as a list of {len(items)} path(s) ({files}), but "
            f"{pipeline!r} takes one edit image (its single-image prompt template). Write the column as one "
            "path (a plain string), or train qwen-image-edit-2509 / qwen-image-edit-2511 for a list of images"
        )
