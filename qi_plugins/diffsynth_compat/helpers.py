"""The helpers DiffSynth-Studio's Qwen-Image examples import beside the pipeline.

* ``load_state_dict`` (``from diffsynth.core import load_state_dict``, also ``from diffsynth import ...``): the
  tensors of a weight file, e.g. to rename a LoRA's keys before ``pipe.load_lora(pipe.dit, state_dict=...)``
  (the Distill-DMD2 example strips PEFT's ``base_model.model.`` prefix this way). Reads ``.safetensors`` only:
  DiffSynth falls back to ``torch.load`` for other files, which can run code hidden in a pickle.
* ``merge_lora`` (``from diffsynth.utils.lora import merge_lora``): LoRAs concatenated along the rank, the
  image-to-LoRA example's way of averaging per-image LoRAs (qi's i2l plugin implements it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from qi_core.errors import InvalidInputError, MissingComponentError, ModelLoadError
from qi_plugins.diffsynth_compat.detect import read_shapes

PathLike = str | os.PathLike


def load_state_dict(file_path: PathLike | Sequence[PathLike], torch_dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", pin_memory: bool = False,
                    verbose: int = 0) -> dict[str, torch.Tensor]:  # fmt: skip
    """DiffSynth's ``load_state_dict``: name → tensor of a ``.safetensors`` file, or of a list of files merged
    in order. ``torch_dtype`` casts the floating-point tensors (integer ones keep their type), ``device``
    places them, ``pin_memory`` pins CPU tensors for faster copies to the GPU (when CUDA is there)."""
    if isinstance(file_path, (list, tuple)):
        out: dict[str, torch.Tensor] = {}
        for f in file_path:
            out.update(load_state_dict(f, torch_dtype, device, pin_memory, verbose))
        return out
    if not isinstance(file_path, (str, os.PathLike)):
        raise InvalidInputError(
            f"load_state_dict takes a file path or a list of them, got {type(file_path).__name__}"
        )
    path = Path(os.fspath(file_path))
    if path.suffix != ".safetensors":
        raise ModelLoadError(
            f"{path} is not a .safetensors file: qi reads weights from safetensors only (loading a pickle "
            "checkpoint can run code hidden in it). Convert it once where you trust the file, e.g. "
            "safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')"
        )
    if not path.is_file():
        raise MissingComponentError(f"{path} does not exist (load_state_dict)")
    read_shapes([path])  # a truncated download fails here, naming the file
    if verbose >= 1:
        print(f"Loading file: {path}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path), device=str(device))
    except SafetensorError as e:
        raise ModelLoadError(f"{path} could not be read as safetensors ({e}); download it again") from None
    if torch_dtype is not None:
        sd = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in sd.items()}
    if pin_memory and torch.cuda.is_available():
        sd = {k: v.pin_memory() if v.device.type == "cpu" else v for k, v in sd.items()}
    return sd


def merge_lora(loras: Sequence[dict[str, torch.Tensor]], alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """DiffSynth's ``merge_lora``: LoRAs with the same keys concatenated along the rank (A rows × ``alpha``, B
    columns), i.e. ΔW = alpha · Σ_k B_k A_k. See :func:`qi_plugins.i2l.model.merge_loras`."""
    try:
        from qi_plugins.i2l.model import merge_loras
    except ImportError as e:
        raise ImportError(f"merge_lora needs qi's i2l plugin (qi_plugins.i2l): {e}") from e
    return merge_loras(list(loras), alpha=alpha)


def as_lora_state_dict(state_dict: Any) -> dict[str, Any]:
    """``pipe.load_lora(..., state_dict=...)`` input checked: a mapping of names to tensors."""
    from collections.abc import Mapping

    if not isinstance(state_dict, Mapping) or not state_dict:
        raise InvalidInputError(
            "load_lora(state_dict=...) takes a non-empty dict of LoRA tensors, e.g. "
            f"load_state_dict('lora.safetensors'); got {type(state_dict).__name__}"
            + (" (empty)" if isinstance(state_dict, Mapping) else "")
        )
    return dict(state_dict)
