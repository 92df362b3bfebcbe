"""``ControlNetInput``: one entry of ``blockwise_controlnet_inputs`` (DiffSynth-Studio's fields and meaning)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from qi_core.errors import InvalidInputError

# DiffSynth's ControlNetInput also has these; its Qwen-Image pipeline never reads them.
_IGNORED_WHEN_NONE = ("inpaint_image", "processor_id")


@dataclass(frozen=True)
class ControlNetInput:
    """One control signal for a blockwise ControlNet."""

    controlnet_id: int = 0  # which loaded ControlNet (order of components["blockwise_controlnet"])
    scale: float = 1.0  # residual multiplier
    start: float = 1.0  # applied while denoising progress (1 at the first step → 0 at the last) is ≤ start …
    end: float = 0.0  # … and ≥ end
    image: Any = (
        None  # control image (PIL, path or uint8 array): canny edges, depth map, or the inpaint image
    )
    inpaint_mask: Any = None  # inpaint ControlNet only: white = region to redraw


FIELDS = tuple(f.name for f in fields(ControlNetInput))


def as_controlnet_inputs(value: Any) -> list[ControlNetInput]:
    """Normalise the call parameter: None/[] → [], one input or a list of inputs (dataclasses, dicts with the
    fields above, or DiffSynth's own ``ControlNetInput`` objects)."""
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    return [_one(item, k) for k, item in enumerate(items)]


def _one(item: Any, k: int) -> ControlNetInput:
    where = f"blockwise_controlnet_inputs[{k}]"
    if isinstance(item, ControlNetInput):
        out = item
    elif isinstance(item, dict):
        unknown = [key for key in item if key not in FIELDS and key not in _IGNORED_WHEN_NONE]
        if unknown:
            raise InvalidInputError(f"{where}: unknown field {unknown[0]!r}; fields are {', '.join(FIELDS)}")
        _check_ignored(where, item.get)
        out = ControlNetInput(**{key: v for key, v in item.items() if key in FIELDS})
    elif hasattr(item, "image") and hasattr(item, "controlnet_id"):  # DiffSynth's ControlNetInput
        _check_ignored(where, lambda key: getattr(item, key, None))
        out = ControlNetInput(**{key: getattr(item, key) for key in FIELDS if hasattr(item, key)})
    else:
        raise InvalidInputError(
            f"{where}: expected a ControlNetInput or a dict with fields {', '.join(FIELDS)}, "
            f"got {type(item).__name__}"
        )
    _check_values(where, out)
    return out


def _check_ignored(where: str, get) -> None:
    for key in _IGNORED_WHEN_NONE:
        if get(key) is not None:
            raise InvalidInputError(
                f"{where}.{key} is not used by the Qwen-Image blockwise ControlNet (DiffSynth ignores it too); "
                "pass the preprocessed control image as image= (see docs/control.md)"
            )


def _check_values(where: str, c: ControlNetInput) -> None:
    if not isinstance(c.controlnet_id, int) or isinstance(c.controlnet_id, bool) or c.controlnet_id < 0:
        raise InvalidInputError(f"{where}.controlnet_id must be an integer ≥ 0, got {c.controlnet_id!r}")
    for name in ("scale", "start", "end"):
        v = getattr(c, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise InvalidInputError(f"{where}.{name} must be a finite number, got {v!r}")
    if c.start < c.end:
        raise InvalidInputError(
            f"{where}: start={c.start} < end={c.end}, so it would never be applied; progress runs from 1 (first "
            "step) to 0 (last step): use start ≥ end, e.g. start=1.0, end=0.0 for every step"
        )
    if c.image is None:
        raise InvalidInputError(f"{where}.image is missing: every ControlNet input needs its control image")


def active(c: ControlNetInput, step: int, num_steps: int) -> bool:
    """DiffSynth's window: progress = (N-1-i)/max(N-1, 1) runs 1 → 0; active iff end-1e-4 ≤ progress ≤ start+1e-4."""
    progress = (num_steps - 1 - step) / max(num_steps - 1, 1)
    return c.end - 1e-4 <= progress <= c.start + 1e-4
