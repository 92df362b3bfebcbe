"""LoRA for training (``qi train --lora_base_model``): a trainable peft LoRA, the file it may start from, and the
LoRA fused into the base first (differential training).

The trainable LoRA is peft's (``lora_alpha = rank``, so scale 1, as the seed), so its parameters carry the seed's
names: ``transformer_blocks.0.attn.to_q.lora_A.default.weight``. Files are read in any layout qi reads
(:func:`qi_plugins.lora.formats.read_lora`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qi_core.errors import InvalidInputError, WeightMismatchError


def lora_targets(model: nn.Module, spec: str | None) -> list[str]:
    """Module names for peft: the given comma-separated list; else (None) the model's own
    ``default_lora_targets`` (a denoiser may declare the modules its family's LoRAs use); else, as the seed does
    for an empty list, every Linear with min(in, out) ≥ 512 inside a repeated ModuleList."""
    names = [s.strip() for s in (spec or "").split(",") if s.strip()]
    if names:
        return names
    if spec is None and getattr(model, "default_lora_targets", None):
        return list(model.default_lora_targets)
    found = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1:
            for sub, lin in m.named_modules():
                if isinstance(lin, nn.Linear) and min(lin.in_features, lin.out_features) >= 512:
                    found.append(f"{name}.{sub}")
    if not found:
        raise InvalidInputError(
            "no LoRA targets: --lora_target_modules is empty and no Linear layer of at least 512 features was "
            "found in a repeated block; list the modules, e.g. to_q,to_k,to_v,to_out.0"
        )
    return sorted(set(found))


def add_lora(model: nn.Module, targets: str | None, rank: int, dtype: torch.dtype) -> nn.Module:
    """peft LoRA (alpha = rank, so scale 1, as the seed) on ``targets``; LoRA weights in ``dtype``. Every other
    parameter of ``model`` is frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    names = lora_targets(model, targets)
    try:
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=names), model)
    except ValueError as e:
        raise InvalidInputError(f"--lora_target_modules {','.join(names)}: {e}") from None
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)
    return model


def load_lora_checkpoint(model: nn.Module, source: str) -> None:
    """Start the trainable LoRA of ``model`` from the LoRA file ``source`` (its scale folded into A)."""
    from qi_plugins.lora.formats import read_lora

    params = dict(model.named_parameters())
    missing = []
    with torch.no_grad():
        for name, w in read_lora(source).items():
            down, up, scale = w.down, w.up, w.scale
            a, b = f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight"
            if a not in params or b not in params:
                missing.append(name)
                continue
            if params[a].shape != down.shape or params[b].shape != up.shape:
                raise WeightMismatchError(
                    f"--lora_checkpoint {source}: {name} has rank {down.shape[0]} ({tuple(down.shape)}), the "
                    f"trained LoRA has {tuple(params[a].shape)}; pass --lora_rank {down.shape[0]}"
                )
            params[a].copy_((down.float() * scale).to(params[a].dtype))
            params[b].copy_(up.to(params[b].dtype))
    if missing:
        raise WeightMismatchError(
            f"--lora_checkpoint {source}: {len(missing)} module(s) are not LoRA targets of this run "
            f"(e.g. {', '.join(missing[:3])}); add them to --lora_target_modules"
        )


def fuse_lora(pipe: Any, source: str, role: str) -> None:
    """Fuse the LoRA file ``source`` into ``pipe.<role>`` for good (``--preset_lora_path``)."""
    from qi_plugins.lora.adapter import LoRA

    LoRA(source, scale=1.0, fuse=True, target=role, exact_restore=False).apply(pipe)
