"""LoRA files in the four layouts people share, read into one normalised form and written back.

| layout      | key of module ``transformer_blocks.0.attn.to_q``        | down (A) / up (B)                          | alpha |
|-------------|---------------------------------------------------------|--------------------------------------------|-------|
| `diffsynth` | ``transformer_blocks.0.attn.to_q``                      | ``.lora_A.default.weight`` / ``.lora_B…``  | optional ``.alpha`` (DiffSynth's loader honours it) |
| `peft`      | ``transformer.transformer_blocks.0.attn.to_q``          | ``.lora_A.weight`` / ``.lora_B.weight``    | none: written baked into A (as diffusers does) |
| `kohya`     | ``lora_unet_transformer_blocks_0_attn_to_q``            | ``.lora_down.weight`` / ``.lora_up.weight`` | optional ``.alpha`` |
| `comfyui`   | ``diffusion_model.transformer_blocks.0.attn.to_q``      | ``.lora_down.weight`` / ``.lora_up.weight`` (A/B read too) | optional ``.alpha`` |

Reading is lenient about prefixes (``diffusion_model.``, ``transformer.``, ``base_model.model.``, ``lora_unet_``
or none) and suffixes (A/B with or without ``.default``, down/up); writing is canonical. A LoRA's effect on a
weight ``W`` (out, in) is ``W + s · (alpha / rank) · up @ down`` with ``s`` the user's scale and ``alpha / rank = 1``
when the file carries no alpha (DiffSynth, PEFT, kohya and ComfyUI all agree on this).

No torch import at module level: ``qi lora --help`` and plugin listing stay cheap.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qi_core.atomic import save_safetensors
from qi_core.errors import InvalidInputError, MissingComponentError, ModelLoadError, WeightMismatchError

if TYPE_CHECKING:
    import torch

FORMATS = ("diffsynth", "peft", "kohya", "comfyui")

# suffix → which tensor it is; longest first so ".lora_A.default.weight" wins over ".weight"-like overlaps
_SUFFIXES = (
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".alpha", "alpha"),
)
_PREFIXES = ("diffusion_model.", "base_model.model.", "transformer.")
_KOHYA = "lora_unet_"

# Module-name words that contain underscores, so a kohya name (dots flattened to "_") can be split back.
# Longest match wins; anything else splits at every "_". Names outside this list still load: the adapter also
# matches a model's modules by their flattened names.
_WORDS = sorted(
    (
        tuple(w.split("_"))
        for w in (
            "transformer_blocks time_text_embed timestep_embedder linear_1 linear_2 addition_t_embedding "
            "img_in txt_in txt_norm proj_out norm_out img_mod txt_mod img_mlp txt_mlp img_norm1 img_norm2 "
            "txt_norm1 txt_norm2 to_q to_k to_v to_out to_add_out add_q_proj add_k_proj add_v_proj norm_q "
            "norm_k norm_added_q norm_added_k controlnet_blocks input_proj output_proj x_rms y_rms"
        ).split()
    ),
    key=len,
    reverse=True,
)


class LoRAFormatError(ModelLoadError):
    """A state dict is not a LoRA in any layout qi reads (or holds keys no layout has)."""


@dataclass(frozen=True)
class LoRAWeight:
    """The low-rank update of one module: ``delta = (alpha / rank) · up @ down``."""

    down: torch.Tensor  # (r, in) — "A" / lora_down
    up: torch.Tensor  # (out, r) — "B" / lora_up
    alpha: torch.Tensor | None = None  # 0-d tensor as stored; None = scale 1 (alpha = rank)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / rank`` (1 without alpha)."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank

    def delta(self, device: Any = None, dtype: Any = None) -> torch.Tensor:
        """The full-rank update (out, in), float32 unless asked, alpha applied to ``down`` first (DiffSynth)."""
        import torch

        down = self.down.to(device=device, dtype=dtype or torch.float32)
        up = self.up.to(device=device, dtype=dtype or torch.float32)
        return up @ (down * self.scale) if self.alpha is not None else up @ down


# -- reading -----------------------------------------------------------------------------------------------
def unflatten_name(flat: str) -> str:
    """``transformer_blocks_0_attn_to_out_0`` → ``transformer_blocks.0.attn.to_out.0`` (kohya names)."""
    parts, out, i = flat.split("_"), [], 0
    while i < len(parts):
        for word in _WORDS:
            if tuple(parts[i : i + len(word)]) == word:
                out.append("_".join(word))
                i += len(word)
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def flatten_name(name: str) -> str:
    return name.replace(".", "_")


def _split_key(key: str) -> tuple[str, str] | None:
    """A state-dict key → (module name, "down" | "up" | "alpha"), or None when it is no LoRA key."""
    found = next(((key[: -len(sfx)], part) for sfx, part in _SUFFIXES if key.endswith(sfx)), None)
    if found is None:
        return None
    stem, part = found
    if stem.startswith(_KOHYA):
        return unflatten_name(stem[len(_KOHYA) :]), part
    for prefix in _PREFIXES:
        if stem.startswith(prefix):
            stem = stem[len(prefix) :]
            break
    return (stem, part) if stem else None


def _example_keys(keys: list[str], n: int = 3) -> str:
    return ", ".join(repr(k) for k in keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def detect_format(state_dict: Mapping[str, Any]) -> str:
    """The layout of a LoRA state dict: ``"diffsynth"``, ``"peft"``, ``"kohya"`` or ``"comfyui"``."""
    keys = list(state_dict)
    lora_keys = [k for k in keys if _split_key(k) is not None]
    if not lora_keys:
        raise LoRAFormatError(
            f"not a LoRA: none of its {len(keys)} keys ends in lora_A/lora_B/lora_down/lora_up/alpha "
            f"(e.g. {_example_keys(keys) or 'no keys at all'}); qi reads the {', '.join(FORMATS)} layouts"
        )
    if any(k.startswith(_KOHYA) for k in lora_keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") for k in lora_keys):
        return "comfyui"
    if any(k.startswith(("transformer.", "base_model.model.")) for k in lora_keys):
        return "peft"
    if any(".default." in k for k in lora_keys):
        return "diffsynth"
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in lora_keys):
        return "comfyui"  # lightx2v files without the prefix
    return "diffsynth"  # bare lora_A/lora_B: DiffSynth's loader reads them, diffusers needs "transformer."


def read_state_dict(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file (safetensors only)."""
    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        raise MissingComponentError(f"LoRA file {os.fspath(source)!r} does not exist")
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise InvalidInputError(
                f"{path} is a folder with {len(found)} .safetensors files; pass the LoRA file itself"
            )
        path = found[0]
    if path.suffix != ".safetensors":
        raise LoRAFormatError(f"{path.name}: qi reads LoRA files in safetensors format only (no pickles)")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # a truncated or non-safetensors file
        raise LoRAFormatError(f"{path} could not be read as safetensors: {e}") from e


def read_lora(source: Any) -> dict[str, LoRAWeight]:
    """Normalise a LoRA: module name → :class:`LoRAWeight`, from a file path or a state dict in any layout.

    Already-normalised dicts pass through. Raises :class:`LoRAFormatError` for keys no layout has and
    :class:`~qi_core.errors.WeightMismatchError` naming the module when A/B are missing or their ranks differ.
    """
    if isinstance(source, (str, os.PathLike)):
        source = read_state_dict(source)
    if not isinstance(source, Mapping):
        raise InvalidInputError(f"a LoRA is a .safetensors path or a state dict, got {type(source).__name__}")
    if source and all(isinstance(v, LoRAWeight) for v in source.values()):
        return dict(source)
    detect_format(source)  # no LoRA key at all → a clear error
    parts: dict[str, dict[str, Any]] = {}
    foreign = []
    for key, value in source.items():
        split = _split_key(key)
        if split is None:
            foreign.append(key)
            continue
        name, part = split
        if part in parts.setdefault(name, {}):
            raise WeightMismatchError(f"LoRA module {name!r} appears twice ({part}), e.g. as {key!r}")
        parts[name][part] = value
    if foreign:
        raise LoRAFormatError(
            f"{len(foreign)} key(s) are not LoRA weights: {_example_keys(foreign)}; qi reads lora_A/lora_B, "
            "lora_down/lora_up and alpha (no DoRA, LoKr or full-weight diffs)"
        )
    out = {}
    for name in sorted(parts):
        p = parts[name]
        missing = [m for m in ("down", "up") if m not in p]
        if missing:
            what = {"down": "lora_A/lora_down", "up": "lora_B/lora_up"}
            raise WeightMismatchError(f"LoRA module {name!r} has no {what[missing[0]]} weight")
        down, up = p["down"], p["up"]
        if down.ndim != 2 or up.ndim != 2:
            raise WeightMismatchError(
                f"LoRA module {name!r}: down {tuple(down.shape)} and up {tuple(up.shape)} must be 2-D "
                "(Linear LoRAs only; convolution LoRAs are not supported)"
            )
        if down.shape[0] != up.shape[1]:
            raise WeightMismatchError(
                f"LoRA module {name!r}: rank mismatch, down {tuple(down.shape)} has rank {down.shape[0]} "
                f"but up {tuple(up.shape)} has rank {up.shape[1]}"
            )
        alpha = p.get("alpha")
        if alpha is not None and alpha.numel() != 1:
            raise WeightMismatchError(
                f"LoRA module {name!r}: alpha must be a scalar, got {tuple(alpha.shape)}"
            )
        out[name] = LoRAWeight(down, up, None if alpha is None else alpha.reshape(()))
    return out


# -- writing -----------------------------------------------------------------------------------------------
def to_format(weights: Any, fmt: str) -> dict[str, torch.Tensor]:
    """Write normalised weights (or any LoRA source) as a state dict in layout ``fmt``.

    Tensors keep their dtype. Alpha is kept as a key in every layout but ``peft``, which has no place for it:
    there ``down`` is multiplied by ``alpha / rank`` (the product ``up @ down`` is what diffusers would load).
    """
    if fmt not in FORMATS:
        raise InvalidInputError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
    import torch

    out: dict[str, torch.Tensor] = {}
    for name, w in read_lora(weights).items():
        alpha, down = w.alpha, w.down
        if fmt == "diffsynth":
            a, b, stem = ".lora_A.default.weight", ".lora_B.default.weight", name
        elif fmt == "peft":
            a, b, stem = ".lora_A.weight", ".lora_B.weight", f"transformer.{name}"
            if alpha is not None:
                down = (down.to(torch.float32) * w.scale).to(down.dtype)
                alpha = None
        elif fmt == "kohya":
            a, b, stem = ".lora_down.weight", ".lora_up.weight", _KOHYA + flatten_name(name)
        else:
            a, b, stem = ".lora_down.weight", ".lora_up.weight", f"diffusion_model.{name}"
        out[stem + a] = down
        out[stem + b] = w.up
        if alpha is not None:
            out[stem + ".alpha"] = alpha
    return out


def save_file_atomic(tensors: dict[str, torch.Tensor], out_path: str | os.PathLike, metadata=None) -> Path:
    """Write a safetensors file through a temporary file in the same folder and ``os.replace``."""
    path = Path(os.fspath(out_path)).expanduser()
    if path.suffix != ".safetensors":
        raise InvalidInputError(f"output {path.name!r} must end in .safetensors (qi writes safetensors only)")
    return save_safetensors(tensors, path, metadata=metadata or {})


def convert_file(in_path: str | os.PathLike, out_path: str | os.PathLike, fmt: str) -> Path:
    """Convert a LoRA file to layout ``fmt`` (``qi lora convert IN OUT --to FMT``). Returns the output path."""
    if fmt not in FORMATS:
        raise InvalidInputError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if Path(os.fspath(in_path)).resolve() == Path(os.fspath(out_path)).resolve():
        raise InvalidInputError("input and output are the same file; write the converted LoRA elsewhere")
    tensors = to_format(read_lora(in_path), fmt)
    return save_file_atomic(tensors, out_path, metadata={"format": "pt", "qi_lora_format": fmt})
