"""The LoRA adapter: fuse low-rank updates into a component's Linear weights, or attach them as branches.

Fused (default): ``W ← W + s · (alpha/rank) · B @ A`` computed in float32 (DiffSynth's ``load_lora``). The
weights before each fusion are kept (on the CPU) so ``remove`` restores them bit for bit, whatever order
LoRAs are removed in; ``exact_restore=False`` keeps no copy and subtracts instead (approximate).

Unfused (``fuse=False``): each targeted layer gets a :class:`LoRABranches` sub-module (``layer.qi_lora``) and a
forward hook adding ``Σ s · B(A x)`` to its output. The layer keeps its place and parameter names; the
branches move with it under ``.to()`` and memory policies, and are cast to the input's device and dtype at
call time in case a policy moves the weight alone. ``remove`` deletes hook and branches (the layer computes
exactly its base output again); ``set_scale`` changes the strength without reloading (hot swap).
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qi_core.errors import InvalidInputError, ModelLoadError, WeightMismatchError
from qi_core.protocols import Adapter, component_module
from qi_plugins.lora.formats import LoRAWeight, flatten_name, read_lora
from qi_plugins.lora.sources import resolve_source

_ids = itertools.count()


class LoRABranch(nn.Module):
    """One low-rank branch ``scale · B(A x)``; frozen (an adapter, not a trainable LoRA)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float):
        super().__init__()
        self.down = nn.Parameter(down, requires_grad=False)  # (r, in)
        self.up = nn.Parameter(up, requires_grad=False)  # (out, r)
        self.scale = scale  # user scale × alpha/rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.down.to(device=x.device, dtype=x.dtype)  # no-op unless a policy moved the layer alone
        up = self.up.to(device=x.device, dtype=x.dtype)
        return F.linear(F.linear(x, down), up) * self.scale


class LoRABranches(nn.ModuleDict):
    """The branches attached to one layer, by adapter key; their outputs add up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for branch in self.values():
            y = branch(x)
            out = y if out is None else out + y
        return out


BRANCHES = "qi_lora"  # attribute (sub-module name) of the branches on a targeted layer


def _branch_hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of a layer with LoRA branches: ``output + Σ branch(input)``."""
    x = args[0] if args else kwargs["input"]
    return output + module._modules[BRANCHES](x).to(output.dtype)


def _attach_branches(module: nn.Module) -> LoRABranches:
    """The layer's branch container, created (with its forward hook) on first use. The layer stays in place
    with its own parameter names, so state dicts and memory policies that address weights by name still work;
    the branches are its sub-modules, so ``.to()`` and layer streaming move them with it."""
    branches = module._modules.get(BRANCHES)
    if branches is None:
        branches = LoRABranches()
        module.add_module(BRANCHES, branches)
        module.__dict__["_qi_lora_hook"] = module.register_forward_hook(_branch_hook, with_kwargs=True)
    return branches


def _detach_branches(module: nn.Module, key: str) -> None:
    branches = module._modules.get(BRANCHES)
    if branches is None:
        return
    if key in branches:
        del branches[key]
    if len(branches) == 0:
        module.__dict__.pop("_qi_lora_hook").remove()
        del module._modules[BRANCHES]


@dataclass
class _Fused:
    """One fusion into one weight, kept on the weight (``module._qi_lora_fused``) in fusion order."""

    owner: LoRA
    weight: LoRAWeight
    scale: float
    before: torch.Tensor | None  # the weight before this fusion (CPU copy), None without exact restore


def torch_module(component: Any, role: str) -> nn.Module:
    """The ``nn.Module`` behind a pipeline component (memory policies may wrap it)."""
    module = component_module(component)
    if module is not None:
        return module
    raise InvalidInputError(
        f"component {role!r} is a {type(component).__name__}, not a torch module; a LoRA targets torch models"
    )


class LoRA(Adapter):
    """A LoRA on one pipeline component (``target``, default the DiT).

    ``source``: a ``.safetensors`` path or a state dict in the DiffSynth, PEFT/diffusers, kohya or ComfyUI
    layout (see :mod:`qi_plugins.lora.formats`), or a hub file ``ORG/NAME[:file.safetensors]``.
    ``scale``: the strength (DiffSynth's ``load_lora(alpha=)``).
    ``fuse``: merge into the weights (fast, default) or keep separate branches (hot-swappable).
    ``strict``: every LoRA module must match a module of the target (else ``WeightMismatchError``).
    ``exact_restore``: keep the weights before fusing so ``remove`` restores them exactly.
    """

    def __init__(self, source: Any, scale: float = 1.0, fuse: bool = True, target: str = "dit",
                 name: str | None = None, *, strict: bool = True, exact_restore: bool = True):  # fmt: skip
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise InvalidInputError(f"LoRA scale must be a number, got {scale!r}")
        if not isinstance(target, str) or not target:
            raise InvalidInputError(f"LoRA target must be a component role such as 'dit', got {target!r}")
        self.source = source
        self.scale = float(scale)
        self.fuse = bool(fuse)
        self.target = target
        self.name = name or _default_name(source)
        self.strict = strict
        self.exact_restore = exact_restore
        self._key = f"{re.sub(r'[^0-9A-Za-z_]', '_', self.name)}_{next(_ids)}"  # branch key: no dots
        self._weights: dict[str, LoRAWeight] | None = None
        self._model: nn.Module | None = None
        # (module path, the layer whose weight or branches changed, its LoRA weights)
        self._applied: list[tuple[str, nn.Module, LoRAWeight]] = []

    def __repr__(self) -> str:
        mode = "fused" if self.fuse else "unfused"
        return f"LoRA({self.name!r}, scale={self.scale}, {mode}, target={self.target!r})"

    @property
    def weights(self) -> dict[str, LoRAWeight]:
        """The normalised LoRA (read once; a hub id is downloaded first)."""
        if self._weights is None:
            self._weights = read_lora(resolve_source(self.source))
        return self._weights

    @property
    def applied(self) -> bool:
        return self._model is not None

    # -- apply / remove ------------------------------------------------------------------------------------
    def apply(self, pipe: Any) -> None:
        if self._model is not None:
            raise InvalidInputError(f"{self!r} is already applied; remove(pipe) it first or make a new LoRA")
        if self.target not in pipe.components:
            raise InvalidInputError(
                f"LoRA target {self.target!r} is not a component of pipeline {pipe.name!r} "
                f"(components: {', '.join(pipe.components)})"
            )
        if self._weights is None:  # a hub id is served from the pipeline's local hub when it has one
            from qi_core.composer import model_hub

            self._weights = read_lora(resolve_source(self.source, model_hub(pipe)))
        model = torch_module(pipe.components[self.target], self.target)
        plan = self._plan(model)
        dtype = getattr(pipe, "dtype", None)
        if self.fuse:
            meta = [path for path, m, _ in plan if m.weight.is_meta]
            if meta:
                raise ModelLoadError(
                    f"cannot fuse LoRA {self.name!r} into {meta[0]}: its weight is not loaded (meta device, e.g. "
                    "a disk-offload memory policy); use LoRA(..., fuse=False) with such policies"
                )
            for path, module, w in plan:
                stack = module.__dict__.setdefault("_qi_lora_fused", [])
                before = module.weight.detach().to("cpu", copy=True) if self.exact_restore else None
                stack.append(_Fused(self, w, self.scale, before))
                _fuse(module.weight, w, self.scale)
                self._applied.append((path, module, w))
        else:
            for path, module, w in plan:
                device = module.weight.device if not module.weight.is_meta else torch.device("cpu")
                cast = dict(device=device, dtype=dtype or w.down.dtype)
                branch = LoRABranch(w.down.to(**cast), w.up.to(**cast), self.scale * w.scale)
                _attach_branches(module)[self._key] = branch
                self._applied.append((path, module, w))
        self._model = model

    def remove(self, pipe: Any) -> None:
        if self._model is None:
            return
        for _, module, _ in reversed(self._applied):
            if self.fuse:
                _unfuse(module, self)
            else:
                _detach_branches(module, self._key)
        self._applied.clear()
        self._model = None
        if self in getattr(pipe, "adapters", []):
            pipe.adapters.remove(self)

    def set_scale(self, scale: float) -> None:
        """Change the strength in place (hot swap): instant for branches, a re-fusion for fused weights."""
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise InvalidInputError(f"LoRA scale must be a number, got {scale!r}")
        if self._applied and self.fuse and not self.exact_restore:
            raise InvalidInputError(
                "this fused LoRA kept no copy of the original weights (exact_restore=False); remove() it and "
                "apply a new LoRA with the wanted scale"
            )
        self.scale = float(scale)
        for _, module, w in self._applied:
            if not self.fuse:
                module._modules[BRANCHES][self._key].scale = self.scale * w.scale
            else:
                stack = module.__dict__["_qi_lora_fused"]
                i = next(i for i, f in enumerate(stack) if f.owner is self)
                stack[i].scale = self.scale
                _refuse_from(module, i)

    # -- matching ----------------------------------------------------------------------------------------
    def _plan(self, model: nn.Module) -> list[tuple[str, nn.Module, LoRAWeight]]:
        """(module path, module whose weight changes, weights) for every LoRA module; checks everything first."""
        index = logical_modules(model)
        flat = {flatten_name(p): p for p in index}
        plan, unmatched = [], []
        for name, w in self.weights.items():
            path = name if name in index else flat.get(flatten_name(name))
            if path is None:
                unmatched.append(name)
                continue
            base = index[path]
            weight = getattr(base, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
                raise WeightMismatchError(
                    f"LoRA {self.name!r}: {name!r} targets {path} ({type(base).__name__}), which has no 2-D "
                    "weight; LoRAs apply to Linear layers"
                )
            out_f, in_f = weight.shape
            if w.down.shape[1] != in_f or w.up.shape[0] != out_f:
                raise WeightMismatchError(
                    f"LoRA {self.name!r}: {name!r} has down {tuple(w.down.shape)} and up {tuple(w.up.shape)} "
                    f"(rank {w.rank}), which give a ({w.up.shape[0]}, {w.down.shape[1]}) update, but "
                    f"{path}.weight is ({out_f}, {in_f}); is this LoRA for another model size?"
                )
            plan.append((path, base, w))
        if unmatched and (self.strict or not plan):
            some = ", ".join(repr(u) for u in unmatched[:3])
            examples = ", ".join([p for p, m in index.items() if _has_matrix(m)][:3])
            raise WeightMismatchError(
                f"LoRA {self.name!r}: {len(unmatched)} of {len(self.weights)} LoRA modules match no module of the "
                f"{self.target} (e.g. {some}); its Linear layers are named like {examples}. Is this LoRA for "
                "another model, or a layout with a prefix qi does not know?"
                + ("" if plan else " Nothing was applied.")
            )
        return plan


# -- helpers -----------------------------------------------------------------------------------------------
def _default_name(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return Path(os.fspath(source).partition(":")[2] or os.fspath(source)).stem
    return "lora"


def _has_matrix(m: nn.Module) -> bool:
    return isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim == 2


def logical_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules by name as the checkpoint knows them (LoRA branches hidden)."""
    return {n: m for n, m in model.named_modules() if f".{BRANCHES}" not in f".{n}"}


def _fuse(weight: torch.Tensor, w: LoRAWeight, scale: float) -> None:
    """``W += scale · delta`` in float32 (float64 weights stay float64), rounded once to the weight's dtype."""
    compute = (
        torch.promote_types(weight.dtype, torch.float32) if weight.is_floating_point() else torch.float32
    )
    with torch.no_grad():
        new = weight.to(compute) + scale * w.delta(weight.device, compute)
        weight.copy_(new.to(weight.dtype))


def _unfuse(module: nn.Module, owner: LoRA) -> None:
    """Take ``owner``'s fusion out of ``module.weight``: restore its snapshot and re-fuse any later LoRAs."""
    stack: list[_Fused] = module.__dict__.get("_qi_lora_fused", [])
    i = next((i for i, f in enumerate(stack) if f.owner is owner), None)
    if i is None:
        return
    gone = stack.pop(i)
    with torch.no_grad():
        if gone.before is not None:
            module.weight.copy_(gone.before.to(module.weight.device))
            if i < len(stack):  # later fusions now start from the weight before the removed one
                if stack[i].before is not None:
                    stack[i].before = gone.before
                _refuse_from(module, i, already_restored=True)
        else:  # no snapshot: subtract (approximate, rounding of the fused weight stays)
            _fuse(module.weight, gone.weight, -gone.scale)
    if not stack:
        del module.__dict__["_qi_lora_fused"]


def _refuse_from(module: nn.Module, i: int, already_restored: bool = False) -> None:
    """Recompute the fusions ``i…`` of ``module`` from the snapshot taken before fusion ``i``."""
    stack: list[_Fused] = module.__dict__["_qi_lora_fused"]
    first = stack[i]
    if first.before is None and not already_restored:
        raise InvalidInputError(
            "this fused LoRA kept no copy of the original weights (exact_restore=False); remove() it and "
            "apply a new LoRA with the wanted scale"
        )
    with torch.no_grad():
        if not already_restored:
            module.weight.copy_(first.before.to(module.weight.device))
        for k in range(i, len(stack)):
            if k > i and stack[k].before is not None:
                stack[k].before = module.weight.detach().to("cpu", copy=True)
            _fuse(module.weight, stack[k].weight, stack[k].scale)


def load_lora(pipe: Any, source: Any, scale: float = 1.0, **kwargs: Any) -> LoRA:
    """Apply a LoRA to a built pipeline and record it in ``pipe.adapters``; returns it (``lora.remove(pipe)``)."""
    lora = LoRA(source, scale, **kwargs)
    lora.apply(pipe)
    pipe.adapters.append(lora)
    return lora
