"""What a weight file is, from its tensor names and shapes alone (safetensors headers; no torch needed).

DiffSynth-Studio recognises a checkpoint by hashing its key set. qi reads the same headers and looks for the
key names of the official checkpoints instead, which also works for sizes DiffSynth has no hash for (tiny test
models, pruned fine-tunes). When a DiT or VAE arrives without the ``config.json`` of its official folder, its
sizes are read off the weight shapes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from qi_core.errors import ModelLoadError
from qi_core.loading import safetensors_header

Shapes = dict[str, tuple[int, ...]]


def read_shapes(files: Iterable[Path]) -> Shapes:
    """Tensor name → shape over all files, read from the safetensors headers.

    A file that is not as long as its header says (what an interrupted download leaves) fails here, naming
    itself (:func:`qi_core.loading.safetensors_header`), not deep in a loader.
    """
    shapes: Shapes = {}
    for f in files:
        _, header = safetensors_header(f)
        for k, v in header.items():
            if k != "__metadata__":
                shapes[k] = tuple(v["shape"])
    return shapes


def _any(shapes: Shapes, pattern: str) -> bool:
    rx = re.compile(pattern)
    return any(rx.search(k) for k in shapes)


# role → test on the key set. Order matters: a LoRA of the DiT also has "transformer_blocks." keys.
SIGNATURES: tuple[tuple[str, Callable[[Shapes], bool]], ...] = (
    ("lora", lambda s: _any(s, r"(lora_[AB]|lora_up|lora_down|lora\.(up|down))\b")),
    ("blockwise_controlnet", lambda s: _any(s, r"^controlnet_blocks\.\d+\.")),
    (
        "dit",
        lambda s: "img_in.weight" in s and "txt_in.weight" in s and _any(s, r"^transformer_blocks\.\d+\."),
    ),
    ("vae", lambda s: _any(s, r"^encoder\.conv_in\.") or _any(s, r"^decoder\.conv_in\.")),
    ("text_encoder", lambda s: _any(s, r"(^|\.)layers\.\d+\.self_attn\.")),
)


def detect_role(shapes: Shapes) -> str | None:
    """The pipeline role these weights fill (``dit``, ``vae``, ``text_encoder``, ``blockwise_controlnet``,
    ``lora``), or None when no signature matches."""
    return next((role for role, test in SIGNATURES if test(shapes)), None)


def _layers(shapes: Shapes, prefix: str) -> int:
    rx = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    found = [int(m.group(1)) for k in shapes if (m := rx.match(k))]
    return max(found) + 1 if found else 0


def infer_dit_config(shapes: Shapes) -> dict[str, Any]:
    """``transformer/config.json`` fields from the DiT's weight shapes (patch size 2, as every release).

    The RoPE split is not stored in the weights: the official (16, 56, 56) for head dim 128, else the same
    proportions (frame ≈ D/8, the rest halved between rows and columns, all even).
    """
    try:
        head = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
        inner, in_channels = shapes["img_in.weight"]
        joint = shapes["txt_in.weight"][1]
        out = shapes["proj_out.weight"][0]
    except KeyError as e:
        raise ModelLoadError(
            f"DiT weights lack {e.args[0]!r}; cannot read the model sizes from them"
        ) from None
    if head == 128:
        axes = [16, 56, 56]
    else:
        frame = 2 * max(1, round(head / 16))
        rows = 2 * ((head - frame) // 4)
        axes = [frame, rows, head - frame - rows]
    layered = "time_text_embed.addition_t_embedding.weight" in shapes
    return {
        "_class_name": "QwenImageTransformer2DModel",
        "patch_size": 2,
        "in_channels": in_channels,
        "out_channels": out // 4,
        "num_layers": _layers(shapes, "transformer_blocks"),
        "attention_head_dim": head,
        "num_attention_heads": inner // head,
        "joint_attention_dim": joint,
        "axes_dims_rope": axes,
        "use_additional_t_cond": layered,
        "use_layer3d_rope": layered,
    }


def infer_vae_config(shapes: Shapes) -> dict[str, Any]:
    """``vae/config.json`` fields from the VAE's weight shapes: widths and channels; the level structure
    (dim_mult, res blocks, latent statistics) stays the official one."""
    try:
        base_dim, in_ch = shapes["encoder.conv_in.weight"][:2]
        z_dim = shapes["decoder.conv_in.weight"][1]
    except KeyError as e:
        raise ModelLoadError(
            f"VAE weights lack {e.args[0]!r}; cannot read the model sizes from them"
        ) from None
    return {
        "_class_name": "AutoencoderKLQwenImage",
        "base_dim": base_dim,
        "z_dim": z_dim,
        "input_channels": in_ch,
    }


# role → sizes from shapes, for folder-loaded roles whose files come without a config.json
INFER_CONFIG: dict[str, Callable[[Shapes], dict[str, Any]]] = {
    "dit": infer_dit_config,
    "vae": infer_vae_config,
}
