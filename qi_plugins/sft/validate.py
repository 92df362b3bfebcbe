"""Load what ``qi train`` saved into a pipeline: a LoRA (any layout, through the LoRA plugin) or full weights
of a component (the seed's ``validate_full``: ``pipe.dit.load_state_dict(step-N.safetensors)``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from qi_core.errors import InvalidInputError, WeightMismatchError
from qi_plugins.sft.models import as_module


def latest_checkpoint(folder: str | Path) -> Path:
    """The newest ``step-N`` / ``epoch-K`` weight file of a training output folder."""
    folder = Path(folder)
    found = []
    for p in folder.glob("*.safetensors"):
        m = re.fullmatch(r"(step|epoch)-(\d+)", p.stem)
        if m:
            found.append((p.stat().st_mtime_ns, m.group(1) == "step", int(m.group(2)), p))
    if not found:
        raise InvalidInputError(f"no step-N.safetensors or epoch-K.safetensors in {str(folder)!r}")
    return max(found)[-1]


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A weight file, or the newest checkpoint of a training output folder."""
    path = Path(checkpoint)
    return latest_checkpoint(path) if path.is_dir() else path


# the key parts of every LoRA layout qi reads (diffsynth/peft: lora_A/lora_B, kohya/comfyui: lora_down/lora_up)
LORA_KEY_PARTS = (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.")


def is_lora(keys: Any) -> bool:
    return any(part in k for k in keys for part in LORA_KEY_PARTS)


def checkpoint_keys(path: str | Path) -> list[str]:
    """The tensor names of a ``.safetensors`` file (its header only: nothing is loaded)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own error types for a file that is not safetensors
        raise InvalidInputError(f"{path} cannot be read as a .safetensors file ({e})") from None


def require_lora(checkpoint: str | Path) -> Path:
    """``checkpoint`` resolved to a file, checked to be a LoRA before any model is built (``--lora``)."""
    path = resolve_checkpoint(checkpoint)
    keys = checkpoint_keys(path)
    if not is_lora(keys):
        more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
        shown = ", ".join(repr(k) for k in keys[:3]) + more
        raise InvalidInputError(
            f"--lora {checkpoint}: {path.name} is not a LoRA: none of its {len(keys)} keys is a lora_A/lora_B/"
            f"lora_down/lora_up weight (found {shown or 'no keys'}). If it holds full weights (saved by "
            f"--trainable_models), validate it with --dit-weights {path} (or --checkpoint {path}, which tells "
            "LoRA and full weights apart)"
        )
    return path


def load_trained(pipe: Any, checkpoint: str | Path, *, role: str = "dit", scale: float = 1.0,
                 strip_prefix: str = "") -> str:  # fmt: skip
    """Apply a LoRA file or load full weights into ``pipe.<role>``; returns "lora" or "full".

    ``checkpoint``: a ``.safetensors`` file or a training output folder (its newest checkpoint).
    """
    from safetensors.torch import load_file

    from qi_core.loading import check_state_dict

    path = resolve_checkpoint(checkpoint)
    if not path.is_file():
        raise InvalidInputError(f"checkpoint {str(path)!r} does not exist")
    sd = load_file(str(path))
    if is_lora(sd):
        from qi_plugins.lora.adapter import load_lora

        load_lora(pipe, str(path), scale, target=role)
        return "lora"
    if role not in pipe.components:
        raise InvalidInputError(f"pipeline {pipe.name!r} has no component {role!r}")
    sd = {k.removeprefix(strip_prefix): v for k, v in sd.items()}
    model = as_module(pipe.components[role], role)
    try:
        check_state_dict(model.state_dict(), sd, f"{path.name} → {role}")
    except WeightMismatchError as e:
        raise WeightMismatchError(
            f"{e}. Full-weight checkpoints must hold every parameter of the {role} under its own names; "
            "pass --strip-prefix if it was saved with another --remove_prefix_in_ckpt"
        ) from None
    state = model.state_dict()
    model.load_state_dict({k: v.to(state[k].dtype) for k, v in sd.items()})
    return "full"
