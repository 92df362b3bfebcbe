"""``qi make-tiny-model``: a deterministic tiny random Qwen-Image in the official repository layout.

Sizes follow the golden fixtures (2 blocks, 2 heads × 32, text hidden 64, VAE base 8). QK-norm gains are
drawn in [2.25, 3.75] and the text-norm gain in [0.5, 1.5] so attention is sharp and the output clearly
depends on the prompt and on positions — otherwise text-path bugs hide in near-uniform attention.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

from qi_core.atomic import atomic_folder
from qi_core.composer import TINY_HUB
from qi_core.errors import InvalidInputError
from qi_plugins.qwen_image.dit import DiTConfig, QwenImageDiT
from qi_plugins.qwen_image.tiny_text import build_processor, build_text_encoder, build_tokenizer
from qi_plugins.qwen_image.vae import QwenImageVAE, VAEConfig

TINY_DIT = DiTConfig(num_layers=2, num_attention_heads=2, attention_head_dim=32, joint_attention_dim=64,
                     axes_dims_rope=(8, 12, 12))  # fmt: skip
TINY_VAE = VAEConfig(base_dim=8, num_res_blocks=1)

SCHEDULER_CONFIG = {  # the real Qwen-Image scheduler/scheduler_config.json
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.42.1",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
MODEL_INDEX = {
    "_class_name": "QwenImagePipeline",
    "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
}


def _config_json(class_name: str, cfg: object) -> str:
    d = {"_class_name": class_name, "_diffusers_version": "0.42.1"}
    d.update({k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items() if k != "rope_theta"})
    return json.dumps(d, indent=2, sort_keys=True) + "\n"


def _save(module: torch.nn.Module, folder: Path, config_text: str) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(config_text)
    sd = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})


def tiny_dit(seed: int, config: DiTConfig = TINY_DIT) -> QwenImageDiT:
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dit = QwenImageDiT(config)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if name.endswith(
                ("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight")
            ):
                p.copy_(2.25 + 1.5 * torch.rand(p.shape, generator=g))
            elif name == "txt_norm.weight":
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith(("_mod.1.weight", "norm_out.linear.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)  # non-trivial modulation
    return dit


def tiny_vae(seed: int, config: VAEConfig = TINY_VAE) -> QwenImageVAE:
    g = torch.Generator().manual_seed(seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = QwenImageVAE(config)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return vae


def make_tiny_model(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    overwrite: bool = False,
    image_channels: int = 3,
    dit_config: DiTConfig = TINY_DIT,
    vae_config: VAEConfig = TINY_VAE,
) -> Path:
    """Write the tiny model to ``out_dir`` (built in a temporary sibling folder, then renamed into place)."""
    out = Path(out_dir)
    with atomic_folder(out, overwrite) as tmp:
        build_tokenizer(tmp / "tokenizer")
        build_processor(tmp / "processor", tmp / "tokenizer")
        build_text_encoder(tmp / "text_encoder", tmp / "tokenizer", seed=seed)
        if dit_config.joint_attention_dim != 64:
            raise InvalidInputError("the tiny text encoder has hidden size 64; set joint_attention_dim=64")
        dit = tiny_dit(seed, dit_config)
        _save(dit, tmp / "transformer", _config_json("QwenImageTransformer2DModel", dit.config))
        vae_cfg = replace(vae_config, input_channels=image_channels)
        _save(tiny_vae(seed, vae_cfg), tmp / "vae", _config_json("AutoencoderKLQwenImage", vae_cfg))
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(SCHEDULER_CONFIG, indent=2) + "\n"
        )
        (tmp / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")
    return out


# -- what variant plugins build on ------------------------------------------------------------------------
def save_dit(dit: QwenImageDiT, folder: Path) -> None:
    """``folder``/config.json + diffusion_pytorch_model.safetensors, as the official ``transformer/``."""
    _save(dit, folder, _config_json("QwenImageTransformer2DModel", dit.config))


def save_vae(vae: QwenImageVAE, folder: Path) -> None:
    """``folder``/config.json + diffusion_pytorch_model.safetensors, as the official ``vae/``."""
    _save(vae, folder, _config_json("AutoencoderKLQwenImage", vae.config))


def hub_folder(root: str | os.PathLike, model_id: str) -> Path:
    """Where a tiny model keeps the repository ``model_id`` (``ORG/NAME``) its recipe names besides the model
    itself; ``qi.compose(..., model="tiny")`` serves that id from here instead of downloading it."""
    return Path(root) / TINY_HUB / model_id


def make_tiny_model_with(
    out_dir: str | os.PathLike,
    extras: Callable[[Path, int], None],
    *,
    seed: int = 0,
    overwrite: bool = False,
    **base: object,
) -> Path:
    """The tiny base model (``make_tiny_model(**base)``) plus ``extras(folder, seed)``, which writes what a
    variant adds (LoRAs, ControlNets, other DiTs under :func:`hub_folder`); built beside ``out_dir`` and
    renamed into place, so an interrupted build leaves nothing half-written."""
    out = Path(out_dir)
    with atomic_folder(out, overwrite) as tmp:
        make_tiny_model(tmp, seed=seed, overwrite=True, **base)
        extras(tmp, seed)
    return out


def meta_dit(config: DiTConfig = TINY_DIT) -> QwenImageDiT:
    """The tiny DiT's module tree without weights (meta device): names and shapes for tiny LoRAs."""
    with torch.device("meta"):
        return QwenImageDiT(config)
