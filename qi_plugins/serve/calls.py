"""What one request asks for, checked before it is queued: the OpenAI fields (``prompt``, ``n``, ``size``,
``response_format``, ``output_format``, ``output_compression``, ``model``) and every call parameter the
pipeline declares, validated against its declarations (``qi_core.params``); uploads decoded under a pixel
limit; LoRAs by name from the server's folder.

Nothing here lists a variant's parameters: they come from ``pipe.parameter_specs()``, and uploads go to the
parameters whose declared ``kind`` is an image or a mask.
"""

from __future__ import annotations

import difflib
import io
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

from qi_core.params import check_required, json_params, validate
from qi_plugins.serve.loras import LoraChoice, LoraFolder, invalid, no_loras

#: OpenAI fields accepted and ignored: they identify the end user, and the server keeps no such record.
IGNORED = ("user", "safety_identifier")
#: The OpenAI fields the server reads (besides the declared parameters and ``loras``).
OPENAI = ("prompt", "n", "size", "response_format", "output_format", "output_compression", "model", "stream")
#: OpenAI fields whose form value is text as it stands (the others are JSON: numbers, true/false).
TEXT_FIELDS = ("prompt", "size", "response_format", "output_format", "model", *IGNORED)
#: Declared parameters the server sets itself: the progress bar reports to the job; outputs are image files.
SERVER_SET = ("progress_bar_cmd", "output_type")
IMAGE_KINDS = ("image", "images", "mask", "masks")
#: Kinds with no HTTP form: Python callables, and structured entries (which may name files on the server).
PYTHON_ONLY = ("callable", "entries")
#: output_format → the suffix :func:`qi_core.images.save_image` writes that format for.
FORMATS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
#: Formats an upload may have (decoded by Pillow after its header's size is checked).
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_N = 10
SEED_MAX = 2**64 - 1


@dataclass
class Call:
    """A checked request: the pipeline's call parameters (without the seed), the first seed (image ``j``
    uses ``seed + j``), how many images, their format and the LoRAs to apply."""

    params: dict[str, Any]
    seed: int
    n: int = 1
    response_format: str = "b64_json"
    output_format: str = "png"
    quality: int = 95
    loras: list[LoraChoice] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # registered per-call options (``cache``)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + j for j in range(self.n)]

    def settings(self, pipe: Any) -> dict[str, Any]:
        """Every call parameter with a JSON form, defaults filled in (images and the progress bar left out)."""
        return json_params({**pipe.parameters(), **self.params, "seed": self.seed})


def call_options() -> dict[str, Any]:
    """The registered options a request may give (``per_call``), by name and alias: {name: registry entry}."""
    from qi_core.plugin_host import host

    entries = [e for e in host().registry.entries("option") if e.meta.get("per_call")]
    return {n: e for e in entries for n in (e.name, *e.aliases)}


def option_specs() -> list[dict[str, Any]]:
    """The per-call options as the page's form lists parameters: a name, or JSON settings (kind ``option``)."""
    schema = {"anyOf": [{"type": "string"}, {"type": "object"}, {"type": "boolean"}, {"type": "null"}]}
    return [{"name": e.name, "type": schema, "default": None, "description": e.meta.get("help", ""),
             "required": False, "kind": "option"}
            for e in {id(e): e for e in call_options().values()}.values()]  # fmt: skip


def _check_option(name: str, value: Any) -> None:
    """An option's own ``check`` (from its registration), its error naming the field."""
    from qi_core.errors import InvalidInputError
    from qi_core.pipeline import check_option

    try:
        check_option(name, value)
    except InvalidInputError as e:
        raise invalid(str(e), name) from None


def settable(spec: dict[str, Any]) -> bool:
    """Whether a request can set a declared parameter (images only as uploads)."""
    return spec["name"] not in SERVER_SET and spec["kind"] not in PYTHON_ONLY


def declared(pipe: Any) -> dict[str, dict[str, Any]]:
    """The pipeline's declared call parameters by name (``pipe.parameter_specs()``; computed once: building
    the JSON schemas takes milliseconds)."""
    return {s["name"]: s for s in pipe.parameter_specs()}


def upload_targets(specs: dict[str, dict[str, Any]]) -> tuple[str | None, str | None]:
    """The parameters an edit request's ``image`` and ``mask`` go to: the first image- or images-kind
    parameter the pipeline requires, else its first one (``edit_image`` of the edit pipelines, ``input_image``
    of qwen-image), and its first mask- or masks-kind parameter."""
    images = [s for s in specs.values() if s["kind"] in ("image", "images")]
    image = next((s for s in images if s["required"]), images[0] if images else None)
    mask = next((s for s in specs.values() if s["kind"] in ("mask", "masks")), None)
    return (image["name"] if image else None, mask["name"] if mask else None)


def decode_image(data: bytes, param: str, max_pixels: int) -> Any:
    """An uploaded image, decoded only after its header's size is checked against ``max_pixels``."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        raise invalid(f"{param} is not a PNG, JPEG or WebP image ({e})", param) from None
    w, h = image.size
    if w * h > max_pixels:
        raise invalid(
            f"{param} is {w}x{h} = {w * h} pixels; this server takes images of at most {max_pixels} pixels",
            param,
        )
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise invalid(f"{param} cannot be decoded ({e})", param) from None
    return image


def _types(schema: dict[str, Any]) -> set[str]:
    out: set[str] = set()
    for option in schema.get("anyOf", [schema]):
        t = option.get("type", "any")
        out.update(t if isinstance(t, list) else [t])
    return out


def _from_text(name: str, text: str, types: set[str]) -> Any:
    """A form field's text as the value its JSON schema types take: text stays text where a string is
    accepted; an empty field is null where null is; anything else is read as JSON (numbers, true/false)."""
    if text == "" and "null" in types:
        return None
    if "string" in types:
        return text
    try:
        return json.loads(text)
    except ValueError:
        raise invalid(f"{name} must be {' or '.join(sorted(types - {'any'}))}, got {text!r}", name) from None


_KEY = re.compile(r"(\w+)((?:\[[^\]]*\])*)")


def form_fields(pipe: Any, specs: dict[str, dict[str, Any]], form: list[tuple[str, Any]]
                ) -> tuple[dict[str, Any], list[tuple[str, str, Any]]]:  # fmt: skip
    """A multipart form (``(key, text or file)`` pairs) → (fields as typed values, ``(parameter, field,
    file)`` for each file).

    Keys follow the openai client: ``image`` or ``image[]`` (several), ``name[]`` for lists, ``loras[][name]``
    and ``loras[][scale]`` (or ``loras`` as JSON text). ``image`` goes to :func:`upload_targets`' image
    parameter, ``mask`` to its mask parameter; a declared image-kind parameter can be sent by its own name.
    """
    image, mask = upload_targets(specs)
    texts: dict[str, list[str]] = {}
    lists: set[str] = set()
    loras: list[tuple[str, str, str]] = []
    files: list[tuple[str, str, Any]] = []
    for key, value in form:
        m = _KEY.fullmatch(key)
        if m is None:
            raise invalid(f"unexpected form field {key!r}", key)
        name, brackets = m.group(1), m.group(2)
        if not isinstance(value, str):
            target = {"image": image, "mask": mask}.get(name, name)
            if target is None or specs.get(target, {}).get("kind") not in IMAGE_KINDS:
                what = "takes no image" if name in ("image", "mask") else "is not an image parameter"
                raise invalid(f"file field {name!r}: pipeline {pipe.name!r} {what}", name)
            files.append((target, name, value))
        elif name == "loras" and brackets:
            parts = re.findall(r"\[([^\]]*)\]", brackets)
            if len(parts) != 2:
                raise invalid(
                    f"unexpected form field {key!r}; send loras[][name] and loras[][scale]", "loras"
                )
            loras.append((parts[0], parts[1], value))
        else:
            if brackets == "[]":
                lists.add(name)
            elif brackets:
                raise invalid(f"unexpected form field {key!r}", name)
            texts.setdefault(name, []).append(value)
    fields: dict[str, Any] = {}
    per_call = call_options()
    for name, values in texts.items():
        if name not in lists and len(values) > 1:
            raise invalid(f"{name} is given {len(values)} times", name)
        if name in TEXT_FIELDS:
            types = {"string"}
        elif name not in specs and name in per_call:  # a name, JSON settings, or true/false
            fields[name] = _option_text(values[0])
            continue
        elif name in specs:
            types = _types(specs[name]["type"])
        else:
            types = {"any"}
        if name in lists:
            fields[name] = [_from_text(name, v, _types(specs.get(name, {}).get("type", {}).get("items", {})))
                            for v in values]  # fmt: skip
        else:
            fields[name] = _from_text(name, values[0], types)
    if loras:
        fields["loras"] = _form_loras(loras)
    return fields, files


def _option_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _form_loras(entries: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """``loras[][name]``/``loras[][scale]`` (or ``loras[0][name]`` …) pairs → ``[{name, scale}]``."""
    items: dict[int, dict[str, Any]] = {}
    seen: dict[str, int] = {}
    for index, key, text in entries:
        if index == "":
            i = seen.get(key, 0)
            seen[key] = i + 1
        elif index.isdigit():
            i = int(index)
        else:
            raise invalid(f"unexpected form field loras[{index}][{key}]", "loras")
        items.setdefault(i, {})[key] = (
            text if key == "name" else _from_text(f"loras[{i}].{key}", text, {"any"})
        )
    return [items[i] for i in sorted(items)]


def parse_request(pipe: Any, specs: dict[str, dict[str, Any]], fields: dict[str, Any],
                  uploads: dict[str, list[Any]] | None = None, loras: LoraFolder | None = None,
                  max_pixels: int = 4096 * 4096) -> Call:  # fmt: skip
    """Check a request's fields (and decoded uploads, by parameter) against the pipeline's declarations.

    ``specs``: :func:`declared`. Raises InvalidInputError whose ``param`` names the offending field. Without a
    size, an edit's output takes the first uploaded image's size (rounded down to the pipeline's size multiple).
    An output over ``max_pixels`` is refused.
    """
    fields = {k: v for k, v in fields.items() if k not in IGNORED}
    model = fields.pop("model", None)
    if model not in (None, pipe.name, str(pipe.model)):
        raise invalid(f"model {model!r} is not served here; this server serves {pipe.name!r}", "model")
    prompt = fields.pop("prompt", None)
    if not isinstance(prompt, str):
        raise invalid(f"prompt is required and must be a string, got {prompt!r}", "prompt")
    n = fields.pop("n", None)
    n = 1 if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise invalid(f"n must be an integer from 1 to {MAX_N}, got {n!r}", "n")
    size = fields.pop("size", None)
    response_format = fields.pop("response_format", None) or "b64_json"
    if response_format not in ("b64_json", "url"):
        raise invalid(
            f"response_format must be 'b64_json' or 'url', got {response_format!r}", "response_format"
        )
    output_format = fields.pop("output_format", None) or "png"
    if output_format not in FORMATS:
        raise invalid(
            f"output_format must be one of {', '.join(FORMATS)}, got {output_format!r}", "output_format"
        )
    quality = fields.pop("output_compression", None)
    quality = 95 if quality is None else quality
    if isinstance(quality, bool) or not isinstance(quality, int) or not 0 <= quality <= 100:
        raise invalid(
            f"output_compression must be an integer from 0 to 100, got {quality!r}", "output_compression"
        )
    if fields.pop("stream", None) not in (None, False):
        raise invalid("stream is not supported: POST /v1/jobs and follow GET /v1/jobs/{id}/events", "stream")
    chosen = loras.parse(fields.pop("loras", None)) if loras else no_loras(fields.pop("loras", None))

    call: dict[str, Any] = {}
    options, per_call = {}, call_options()
    for name, value in fields.items():
        spec = specs.get(name)
        if spec is None and name in per_call:
            _check_option(name, value)
            options[name] = value
            continue
        if spec is None:
            close = difflib.get_close_matches(
                name, [*OPENAI, *per_call, *(k for k, s in specs.items() if settable(s))], n=1
            )
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise invalid(f"unknown field {name!r} for pipeline {pipe.name!r}{hint}", name)
        if not settable(spec):
            raise invalid(
                f"{name} cannot be set over HTTP (the server sets it, or it has no JSON form)", name
            )
        if spec["kind"] in IMAGE_KINDS:
            raise invalid(f"{name} is an image: upload it as a file field of POST /v1/images/edits", name)
        call[name] = value
    _size(call, size, uploads or {}, pipe.size_multiple)
    call["prompt"] = prompt
    for name, images in (uploads or {}).items():
        if specs[name]["kind"] in ("image", "mask") and len(images) > 1:
            raise invalid(f"{name} takes one image, got {len(images)}", name)
        call[name] = images[0] if len(images) == 1 else images

    seed = call.pop("seed", None)
    checked = validate(pipe.declarations(), {**call, "seed": seed})
    check_required(pipe.name, pipe.required, {**pipe.parameters(), **checked}, pipe.declarations())
    if seed is None:
        seed = random.randrange(2**31)
    elif seed + n - 1 > SEED_MAX:
        raise invalid(
            f"seed + n - 1 must be at most 2^64 - 1 (image j uses seed + j), got seed {seed}", "seed"
        )
    params = {k: checked[k] for k in call}
    _check_size({**pipe.parameters(), **params}, pipe.size_multiple, max_pixels, "size" if size else "height")
    return Call(params, seed, n, response_format, output_format, quality, chosen, options)


def _size(call: dict[str, Any], size: Any, uploads: dict[str, list[Any]], multiple: int) -> None:
    """``size`` ("WxH"; "auto" or none: the declared height and width, or an edit's first image's size) into
    ``call``'s width and height."""
    if size in (None, "auto"):
        first = next((images[0] for images in uploads.values() if images), None)
        if first is not None and "height" not in call and "width" not in call:
            w, h = first.size
            call.update(
                width=max(multiple, w // multiple * multiple), height=max(multiple, h // multiple * multiple)
            )
        return
    m = re.fullmatch(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})", size) if isinstance(size, str) else None
    if m is None:
        raise invalid(f"size must be WIDTHxHEIGHT in pixels (e.g. 512x512) or 'auto', got {size!r}", "size")
    w, h = int(m.group(1)), int(m.group(2))
    for key, value in (("width", w), ("height", h)):
        if key in call and call[key] != value:
            raise invalid(f"size {size} conflicts with {key}={call[key]!r}; give one of them", "size")
    call.update(width=w, height=h)


def _check_size(params: dict[str, Any], multiple: int, max_pixels: int, param: str) -> None:
    h, w = params["height"], params["width"]
    if h % multiple or w % multiple:
        raise invalid(f"width and height must be multiples of {multiple} for this model, got {w}x{h}", param)
    if h * w > max_pixels:
        raise invalid(f"{w}x{h} is {w * h} pixels; this server makes images of at most {max_pixels}", param)
