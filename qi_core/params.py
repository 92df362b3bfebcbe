"""Declared call parameters: each injector (and the loop itself) declares the parameters it consumes as a pydantic
model — type, default, constraints and a one-line description, plus a ``kind`` for inputs that are files.

The CLI, a server and a form are generated from these declarations (:func:`specs`), and every call is checked
against them (:func:`validate`) before any image is read or any model runs::

    class Params(CallParams):
        guide: ImageInput = param(None, "an image the output follows", kind="image")

Kinds: ``image`` (a PIL image, an image file path or an array), ``mask`` (an image whose white marks a region),
``images`` (one image or a list), ``masks`` (a list of masks), ``entries`` (structured entries: dataclasses or
dicts), ``callable`` (Python only).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    create_model,
    field_validator,
)

from qi_core.errors import ImageReadError, InvalidInputError

KINDS = ("image", "mask", "images", "masks", "entries", "callable")


class CallParams(BaseModel):
    """Base of a parameter declaration. Unknown names are left to the pipeline (it reports them with close
    matches); numbers must be finite."""

    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _flags_are_flags(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads True as 1 and "yes" as True: a flag where a number is expected, or a number or word
        # where a flag is expected, is a mistake, not a value
        types = _types(cls.model_fields[info.field_name].annotation)
        if isinstance(value, bool) and bool not in types:
            raise ValueError("a number, not True/False")
        if types <= {bool, type(None)} and value is not None and not isinstance(value, bool):
            raise ValueError("True or False")
        return value


def _types(annotation: Any) -> set[Any]:
    args = getattr(annotation, "__args__", None)
    if getattr(annotation, "__origin__", None) is Annotated:
        return _types(args[0])
    return {t for a in args for t in _types(a)} if args else {annotation}


def param(default: Any, description: str, *, kind: str | None = None,
          shorthand: tuple[str, tuple[str, ...]] | None = None, **constraints: Any) -> Any:  # fmt: skip
    """A declared parameter: its default, a one-line description, an optional file ``kind``, pydantic
    constraints (``ge``, ``le``, ``gt``, …) and, for ``entries``, an optional short form
    ``(flag, fields)``: ``--flag A:B[:C]`` on a command line is the entry ``{fields[0]: A, …}``."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown parameter kind {kind!r}; kinds are {', '.join(KINDS)}")
    extra: dict[str, Any] = {"kind": kind} if kind else {}
    if shorthand is not None:
        extra["shorthand"] = {"flag": shorthand[0], "fields": list(shorthand[1])}
    extra = extra or None
    return Field(default, description=description, json_schema_extra=extra, **constraints)


def undeclared(name: str, defaults: Mapping[str, Any]) -> type[CallParams]:
    """A declaration for a plain ``{name: default}`` dict (injectors written before declarations): any value."""
    return create_model(name, __base__=CallParams, **{k: (Opaque, Field(v)) for k, v in defaults.items()})


def _is_image(value: Any) -> bool:
    if isinstance(value, (str, os.PathLike)):
        return True  # a path: its existence and format are checked where it is read, with the file named
    return hasattr(value, "getbands") or hasattr(value, "__array__")  # PIL image, numpy/torch array


def _image(value: Any) -> Any:
    if value is not None and not _is_image(value):
        raise ValueError("an image (PIL image, file path or array)")
    return value


def _images(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        for k, v in enumerate(value):
            if not _is_image(v):
                raise ValueError(
                    f"a list of images (PIL images, file paths or arrays); item {k} is a {type(v).__name__}"
                )
        return value
    return _image(value)


_PATH = {"type": "string", "format": "path"}
#: An image input (kind ``image``/``mask``): a PIL image, a path or an array; a path in JSON.
ImageInput = Annotated[
    Any, AfterValidator(_image), WithJsonSchema({"type": ["string", "null"], "format": "path"})
]
#: One image or a list of them; a list of paths in JSON.
ImageList = Annotated[Any, AfterValidator(_images), WithJsonSchema({"type": "array", "items": _PATH})]
#: Any Python value that has no JSON form (callables, structured entries); JSON schema given by the kind.
Opaque = Annotated[Any, WithJsonSchema({})]
#: Structured entries (kind ``entries``): one entry or a list of them, objects in JSON.
Entries = Annotated[Any, WithJsonSchema({"type": "array", "items": {"type": "object"}})]


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)) and all(_jsonable(v) == v for v in value):
        return list(value)
    return getattr(value, "__name__", None)  # e.g. tqdm → "tqdm"


def is_json(value: Any) -> bool:
    """Whether ``value`` has a JSON form (a record in a file or a cache can hold it)."""
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def json_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The call parameters that have a JSON form (images do not); the progress bar is never recorded."""
    return {k: v for k, v in params.items() if k != "progress_bar_cmd" and is_json(v)}


def check_required(pipeline: str, required: Iterable[str], values: Mapping[str, Any],
                   models: Iterable[type[CallParams]]) -> None:  # fmt: skip
    """InvalidInputError (with ``.param``) for the first of a recipe's ``required`` parameters left None."""
    missing = [k for k in required if values.get(k) is None]
    if not missing:
        return
    name = missing[0]
    declared = fields(models).get(name)
    what = f" — {name}: {declared[1].description}" if declared and declared[1].description else ""
    e = InvalidInputError(f"{name} is required by pipeline {pipeline!r}{what}")
    e.param = name
    raise e


def fields(models: Iterable[type[CallParams]]) -> dict[str, tuple[type[CallParams], Any]]:
    """Parameter name → (declaring model, pydantic FieldInfo), later models overriding earlier ones."""
    out: dict[str, tuple[type[CallParams], Any]] = {}
    for model in models:
        for name, info in model.model_fields.items():
            out[name] = (model, info)
    return out


def specs(models: Iterable[type[CallParams]], defaults: Mapping[str, Any] = (),
          required: Iterable[str] = ()) -> list[dict[str, Any]]:  # fmt: skip
    """``[{name, type (JSON schema), default, description, required, kind}]`` in declaration order;
    ``defaults`` (a recipe's) replace the declared ones."""
    defaults, required = dict(defaults), set(required)
    schemas: dict[type[CallParams], dict[str, Any]] = {}
    out = []
    for name, (model, info) in fields(models).items():
        if model not in schemas:
            with warnings.catch_warnings():  # defaults with no JSON form (tqdm) are reported below by name
                warnings.simplefilter("ignore")
                schemas[model] = model.model_json_schema()["properties"]
        schema = dict(schemas[model][name])
        for k in ("title", "description", "default", "kind"):
            schema.pop(k, None)
        extra = info.json_schema_extra or {}
        out.append({
            "name": name,
            "type": schema,
            "default": _jsonable(defaults.get(name, info.default)),
            "description": info.description or "",
            "required": name in required,
            "kind": extra.get("kind"),
            **({"shorthand": extra["shorthand"]} if "shorthand" in extra else {}),
        })  # fmt: skip
    return out


def validate(models: Iterable[type[CallParams]], values: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``values`` against the declarations; returns them with numbers coerced (``"4"`` → 4.0 from a
    command line). Raises :class:`InvalidInputError` naming the parameter, what it got and what it takes."""
    out = dict(values)
    for model in models:
        mine = {k: values[k] for k in model.model_fields if k in values}
        try:
            checked = model.model_validate(mine)
        except ValidationError as e:
            raise _error(model, e, mine) from None
        for k in mine:
            v = getattr(checked, k)
            # keep the caller's object unless validation converted a scalar (keeps images and lists as given)
            if isinstance(v, (int, float, str)) or v is None:
                out[k] = v
    return out


def _error(model: type[CallParams], e: ValidationError, given: Mapping[str, Any]) -> InvalidInputError:
    err = e.errors()[0]
    loc = [x for x in err["loc"] if isinstance(x, (str, int))]
    name = str(loc[0]) if loc else "?"
    info = model.model_fields.get(name)
    what = f" — {name}: {info.description}" if info is not None and info.description else ""
    got = given.get(name)
    for k in loc[1:]:  # an item of a list: name it as prompts[1]
        if isinstance(k, int) and isinstance(got, (list, tuple)) and k < len(got):
            name, got = f"{name}[{k}]", got[k]
    msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Input should be ")
    kind = (info.json_schema_extra or {}).get("kind") if info is not None else None
    error = ImageReadError if kind in ("image", "mask", "images", "masks") else InvalidInputError
    out = error(f"{name} must be {msg}, got {got!r}{what}")
    out.param = name  # the command line rewords it with the flag
    return out
