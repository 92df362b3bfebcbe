"""Training data: metadata rows (csv / json / jsonl) whose file columns are loaded as images, or cached
encoder outputs (split training).

Rows are checked once, up front: a file that is missing, not an image, or outside ``--dataset_base_path`` makes
the row *bad*. Bad rows stop the run with an error naming the row, or are skipped (and counted) with
``--skip_bad_rows``. The check reads image headers only, so it also yields every sample's training size,
which batches (buckets) same-size samples.

Every column named in ``--data_file_keys`` goes through a *file loader* (default: RGB, cropped and resized to
the training size like the seed's ``ImageCropAndResize``, :func:`qi_core.sizing.load_rgb`). An injector whose
input needs other decoding (an RGBA frame, a one-channel mask) declares its own in ``Injector.file_loaders``;
the run passes the loaders of its pipeline's injectors (``loaders=``). Columns named in ``--extra_inputs`` then
reach the pipeline as call parameters of the same name.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from qi_core.errors import ImageReadError, InvalidInputError
from qi_core.sizing import FileLoader, SizeSpec, load_rgb
from qi_plugins.sft.encoding import FORMAT


class BadRowError(ImageReadError):
    """A metadata row names a file that is missing, unreadable, or outside the dataset folder."""

    def __init__(self, where: str, key: str, reason: str):
        self.where, self.key, self.reason = where, key, reason
        super().__init__(
            f"{where}: column {key!r}: {reason}. Fix the row, or pass --skip_bad_rows to skip such rows"
        )


class MissingColumnError(InvalidInputError):
    """The metadata file has no column of a name the run needs (every row lacks it)."""


# -- metadata ----------------------------------------------------------------------------------------------
def read_metadata(path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
    """``[(where, row)]`` from a .csv, .json (a list of objects) or .jsonl file; ``where`` names the row."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"dataset metadata {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    name = path.name
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        # csv: empty cells are "no value" (pandas' NaN in the seed)
        rows = [{k: (v if v != "" else None) for k, v in r.items() if k is not None} for r in rows]
        return [(f"row {i + 1} of {name} (line {i + 2})", r) for i, r in enumerate(rows)]
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{name} is not valid JSON: {e}") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise InvalidInputError(f"{name} must hold a JSON list of objects (one per sample)")
        return [(f"item {i} of {name}", r) for i, r in enumerate(data)]
    if suffix == ".jsonl":
        out = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidInputError(f"line {i + 1} of {name} is not valid JSON: {e}") from None
            if not isinstance(row, dict):
                raise InvalidInputError(f"line {i + 1} of {name} must be a JSON object")
            out.append((f"line {i + 1} of {name}", row))
        return out
    raise InvalidInputError(f"dataset metadata must be .csv, .json or .jsonl, got {name!r}")


def check_columns(rows: list[tuple[str, dict[str, Any]]], name: str, needed: Sequence[str], why: str) -> None:
    """Fail when no row of the metadata file ``name`` has a column of ``needed`` (a wrong header or key), naming
    the missing columns and the ones found: row by row this would read as an empty value in the first row."""
    found = list(dict.fromkeys(k for _, row in rows for k in row))
    missing = [c for c in needed if c not in found]
    if not missing or not rows:
        return
    hints = []
    for c in missing:
        close = difflib.get_close_matches(c, found, n=1, cutoff=0.6)
        if close:
            hints.append(f"{close[0]!r} → {c!r}")
    hint = f" (e.g. {', '.join(hints)})" if hints else ""
    raise MissingColumnError(
        f"{name} has no column{'s' if len(missing) > 1 else ''} {', '.join(repr(c) for c in missing)} ({why}); "
        f"its columns are {', '.join(repr(c) for c in found) or '(none)'}. Rename the column(s) in the file{hint}"
    )


def inside(base: Path, value: str) -> Path | None:
    """``base/value`` when it stays inside ``base`` (lexically: symlinked datasets are fine), else None."""
    full = Path(os.path.normpath(base / value))
    root = Path(os.path.normpath(base))
    return full if full == root or root in full.parents else None


# -- datasets ------------------------------------------------------------------------------------------------
class MetadataDataset:
    """Rows of a metadata file; ``dataset[i]`` loads row ``i % rows`` (``repeat`` passes per epoch).

    ``required``: columns every row needs a value in; ``columns``: columns the run reads (``--extra_inputs``).
    A file without one of them at all fails up front, naming the columns it has (a misspelt header), before any
    row is checked.

    An item is the row's dict with file columns replaced by loaded values, plus ``"_where"`` (the row's name).
    ``bucket(i)`` is the training size of every file column (samples with equal buckets can share a batch).
    """

    def __init__(self, base_path: str | os.PathLike, metadata_path: str | os.PathLike,
                 file_keys: Sequence[str] = ("image", "video"), *, repeat: int = 1,
                 size: SizeSpec | None = None, required: Sequence[str] = (), skip_bad_rows: bool = False,
                 loaders: dict[str, FileLoader] | None = None, columns: Sequence[str] = ()):  # fmt: skip
        self.base = Path(base_path)
        if not self.base.is_dir():
            raise InvalidInputError(f"--dataset_base_path {str(self.base)!r} is not a folder")
        self.file_keys = tuple(file_keys)
        self.repeat = int(repeat)
        self.size = size or SizeSpec()  # default: dynamic resolution under 1024² pixels
        self.loaders = dict(loaders or {})  # {column: loader} declared by the pipeline's injectors
        self.rows: list[tuple[str, dict[str, Any]]] = []
        self.buckets: list[tuple] = []
        self.skipped: list[BadRowError] = []
        rows = read_metadata(metadata_path)
        check_columns(rows, Path(metadata_path).name, required, "needed by the training task")
        check_columns(rows, Path(metadata_path).name, columns, "named in --extra_inputs")
        for where, row in rows:
            try:
                self.buckets.append(self._check(where, row, required))
                self.rows.append((where, row))
            except BadRowError as e:
                if not skip_bad_rows:
                    raise
                self.skipped.append(e)
        if not self.rows:
            why = f" ({len(self.skipped)} bad rows skipped)" if self.skipped else ""
            raise InvalidInputError(f"the dataset {os.fspath(metadata_path)!r} has no usable rows{why}")

    def _check(self, where: str, row: dict[str, Any], required: Sequence[str]) -> tuple:
        for key in required:
            if row.get(key) in (None, "", []):
                raise BadRowError(where, key, "has no value (the training task needs it)")
        sizes = []
        for key in self.file_keys:
            value = row.get(key)
            if value is None:
                continue
            if isinstance(value, str) and value.strip().startswith("[") and value.strip().endswith("]"):
                # a csv cell can only hold text: a list of files is written as a JSON list
                try:
                    value = row[key] = json.loads(value)
                except json.JSONDecodeError:
                    raise BadRowError(where, key, f"{value!r} is not a JSON list of paths") from None
            paths = value if isinstance(value, list) else [value]
            for p in paths:
                sizes.append((key, self._header(where, key, p)))
        return tuple(sizes)

    def _header(self, where: str, key: str, value: Any) -> tuple[int, int]:
        if not isinstance(value, str) or not value:
            raise BadRowError(where, key, f"expected a file path, got {value!r}")
        path = inside(self.base, value)
        if path is None:
            raise BadRowError(
                where, key, f"path {value!r} points outside the dataset folder {str(self.base)!r}"
            )
        if not path.is_file():
            raise BadRowError(where, key, f"file {value!r} does not exist (looked for {str(path)!r})")
        try:
            with Image.open(path) as im:
                w, h = im.size
        except (UnidentifiedImageError, OSError) as e:
            if self.loaders.get(key, load_rgb) is not load_rgb:
                return (0, 0)  # not an image: a plugin's loader decodes it (size unknown, not bucketed)
            raise BadRowError(where, key, f"{value!r} cannot be read as an image ({e})") from None
        try:
            return self.size.target(w, h)
        except InvalidInputError as e:
            raise BadRowError(where, key, str(e)) from None

    def __len__(self) -> int:
        return len(self.rows) * self.repeat

    def bucket(self, i: int) -> tuple:
        return self.buckets[i % len(self.rows)]

    def __getitem__(self, i: int) -> dict[str, Any]:
        where, row = self.rows[i % len(self.rows)]
        item = dict(row)
        for key in self.file_keys:
            value = row.get(key)
            if value is None:
                continue
            loader = self.loaders.get(key, load_rgb)
            try:
                if isinstance(value, list):
                    item[key] = [loader(str(inside(self.base, v)), self.size) for v in value]
                else:
                    item[key] = loader(str(inside(self.base, value)), self.size)
            except (UnidentifiedImageError, OSError) as e:
                raise BadRowError(where, key, f"{value!r} could not be decoded ({e})") from None
        item["_where"] = where
        return item


def cache_signature(path: str | os.PathLike) -> tuple:
    """Shapes that must agree for two cached samples to share a batch (text lengths are padded). Reads the
    header only, and checks it is a cache file, so a wrong folder fails before training starts."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        if json.loads((f.metadata() or {}).get("qi", "{}")).get("format") != FORMAT:
            raise InvalidInputError(
                f"{path} is not a qi training cache file ({FORMAT}); without --dataset_metadata_path, "
                "--dataset_base_path must be the --output_path of a --task X:data_process run (pass "
                "--dataset_metadata_path to train from a raw dataset)"
            )
        return tuple(
            (k, tuple(f.get_slice(k).get_shape()))
            for k in sorted(f.keys())  # noqa: SIM118
            if not k.startswith("text.")
        )


class CachedDataset:
    """Encoder outputs written by ``--task X:data_process`` (``<folder>/<rank>/<i>.safetensors``)."""

    def __init__(self, folder: str | os.PathLike, *, repeat: int = 1):
        self.base = Path(folder)
        files = sorted(self.base.rglob("*.safetensors"), key=_natural)
        files = [f for f in files if not f.name.startswith(".")]
        if not files:
            raise InvalidInputError(
                f"no cached samples (*.safetensors) under {str(self.base)!r}; run --task <task>:data_process "
                "with --output_path there first, or pass --dataset_metadata_path"
            )
        self.files = files
        self.repeat = int(repeat)
        self.buckets = [cache_signature(f) for f in files]
        self.skipped: list[BadRowError] = []

    def __len__(self) -> int:
        return len(self.files) * self.repeat

    def bucket(self, i: int) -> tuple:
        return self.buckets[i % len(self.files)]

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.files[i % len(self.files)]
        return {"_cache": str(path), "_where": str(path.relative_to(self.base))}


def _natural(path: Path) -> tuple:
    """Sort ``0/2.safetensors`` before ``0/10.safetensors``."""
    out: list[tuple[int, Any]] = []
    for part in path.with_suffix("").parts:
        out.append((0, int(part)) if part.isdigit() else (1, part))
    return tuple(out)


def collate_samples(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DataLoader collate: keep the samples as a list (the trainer encodes them one by one)."""
    return items
