"""Models for training: where the weights come from, what is trained (full, or a LoRA through the LoRA plugin's
:mod:`qi_plugins.lora.training`), how the frozen rest is stored (fp8 with the memory plugin's quantiser,
offloaded), and the module that data-parallel wrappers see.

Parameter names follow the seed: the training module holds the trained components as ``pipe.<role>``, so a
LoRA weight is ``pipe.dit.transformer_blocks.0.attn.to_q.lora_A.default.weight`` and ``--remove_prefix_in_ckpt
pipe.dit.`` (the default) saves it as ``transformer_blocks.0.attn.to_q.lora_A.default.weight``.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qi_core.devices import parse_dtype
from qi_core.errors import InvalidInputError, WeightMismatchError
from qi_core.protocols import component_module
from qi_plugins.sft.args import TrainArgs


def as_module(component: Any, role: str = "component") -> nn.Module:
    """The ``nn.Module`` behind a pipeline component (wrappers keep theirs in ``.model`` or ``.module``)."""
    module = component_module(component)
    if module is None:
        raise InvalidInputError(f"component {role!r} ({type(component).__name__}) is not a torch module")
    return module


# -- where the weights come from ---------------------------------------------------------------------------------
def model_sources(args: TrainArgs, recipe: Any) -> tuple[Any, dict[str, Any], dict[str, str]]:
    """``(model root, {role: folder or files}, {model string: role})`` from ``--model``, ``--model_paths``
    and ``--model_id_with_origin_paths``."""
    from qi_plugins.diffsynth_compat.config import ModelConfig

    by_folder = {c.subfolder: r for r, c in recipe.components.items() if c.subfolder}
    overrides: dict[str, Any] = {}
    names: dict[str, str] = {}
    root: Any = args.model

    def role_of(text: str, hint: str) -> str:
        role, sep, _ = text.partition("=")
        if sep and role in recipe.components:
            return role
        parts = Path(hint).parts
        for part in reversed(parts):
            if part in by_folder:
                return by_folder[part]
            if part in recipe.components:  # a folder named after the role (models/<role>/model.safetensors)
                return part
        raise InvalidInputError(
            f"cannot tell which component of {recipe.name!r} {text!r} holds; name it as ROLE=…, roles: "
            f"{', '.join(recipe.components)} (e.g. dit={text})"
        )

    if args.model_paths:
        try:
            paths = json.loads(args.model_paths)
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"--model_paths must be JSON (a list or {{role: path}}): {e}") from None
        items = list(paths.items()) if isinstance(paths, dict) else [(None, p) for p in paths]
        for role, value in items:
            if value == [] and role in recipe.components:  # {"role": []}: an optional component left out
                overrides[role] = []
                continue
            first = value[0] if isinstance(value, list) and value else value
            role = role or role_of(
                str(first), str(first) if Path(first).is_dir() else str(Path(first).parent)
            )
            if role not in recipe.components:
                raise InvalidInputError(
                    f"--model_paths names role {role!r}; roles are {', '.join(recipe.components)}"
                )
            overrides[role] = _component_path(value)
            names[json.dumps(value) if isinstance(value, list) else str(value)] = role
        if root is None:  # local components of one official layout: its root has the tokenizer too
            parents = {Path(v[0] if isinstance(v, list) else v).parent for v in overrides.values() if v != []}
            roots = [q for q in (*parents, *(q.parent for q in parents)) if (q / "tokenizer").is_dir()]
            root = str(roots[0]) if roots else None
    if args.model_id_with_origin_paths:
        ids = set()
        for entry in TrainArgs.split(args.model_id_with_origin_paths):
            spec = entry.partition("=")[2] if "=" in entry.split(":")[0] else entry
            model_id, sep, pattern = spec.partition(":")
            if not sep:
                raise InvalidInputError(
                    f"--model_id_with_origin_paths entry {entry!r} must be ORG/NAME:pattern"
                )
            role = role_of(entry, pattern)
            names[entry] = role
            sub = recipe.components[role].subfolder
            if sub and pattern.startswith(f"{sub}/") and "=" not in entry.split(":")[0]:
                ids.add(model_id)  # served from the model's official layout
            else:
                overrides[role] = ModelConfig(model_id=model_id, origin_file_pattern=pattern)
        if len(ids) == 1 and root is None:
            root = ids.pop()
        elif ids and root is None:
            raise InvalidInputError(
                f"--model_id_with_origin_paths mixes repositories {sorted(ids)}; pass --model for the main one "
                "and name the others as ROLE=ORG/NAME:pattern"
            )
    return root, overrides, names


def _component_path(value: Any) -> Any:
    if isinstance(value, list):
        return [Path(v) for v in value]
    p = Path(value)
    if p.is_file() and (p.parent / "config.json").exists():
        return p.parent  # the component folder: its loader reads config.json next to the weights
    return p


def roles_of(spec: str | None, names: dict[str, str], recipe: Any, what: str) -> list[str]:
    """Roles named by ``--fp8_models`` / ``--offload_models``: role names or the model strings given."""
    out = []
    for item in TrainArgs.split(spec):
        role = item if item in recipe.components else names.get(item)
        if role is None:
            raise InvalidInputError(
                f"--{what} names {item!r}, which is neither a role ({', '.join(recipe.components)}) nor one of "
                "the model strings given in --model_paths / --model_id_with_origin_paths"
            )
        out.append(role)
    return out


def overlay_root(root: Path, replace: dict[str, str]) -> Path:
    """A folder showing ``root`` with some subfolders replaced (``--tokenizer_path``/``--processor_path``)."""
    out = Path(tempfile.mkdtemp(prefix="qi-model-"))
    for entry in Path(root).iterdir():
        if entry.name not in replace:
            (out / entry.name).symlink_to(entry.resolve())
    for name, target in replace.items():
        if not Path(target).is_dir():
            raise InvalidInputError(f"--{name}_path {target!r} is not a folder")
        (out / name).symlink_to(Path(target).resolve())
    return out


def load_pipeline(args: TrainArgs, roles: set[str] | None, device: Any, dtype: torch.dtype) -> Any:
    """``qi.compose`` the recipe with the components this stage needs (``roles``; None = all)."""
    import qi_core as qi
    from qi_core.loading import resolve_model_root
    from qi_core.plugin_host import host

    recipe = host().registry.get("pipeline", args.pipeline).load()
    root, overrides, names = model_sources(args, recipe)
    offload = roles_of(args.offload_models, names, recipe, "offload_models")
    replace = {k: v for k, v in (("tokenizer", args.tokenizer_path), ("processor", args.processor_path)) if v}
    if replace:
        source = root if root is not None else recipe.model
        subs = [c.subfolder for c in recipe.components.values() if c.subfolder]
        root = overlay_root(resolve_model_root(source, [*subs, "tokenizer", "scheduler"]), replace)
    memory = {r: "offload" for r in offload if roles is None or r in roles}
    overrides = {r: v for r, v in overrides.items() if roles is None or r in roles}
    return qi.compose(args.pipeline, model=root, device=str(device), torch_dtype=dtype, components=overrides,
                      memory=memory or "none", roles=roles, progress=False)  # fmt: skip


# -- what is trained --------------------------------------------------------------------------------------------
def prepare_for_training(pipe: Any, args: TrainArgs) -> list[str]:
    """Fuse the preset LoRA, add the trainable LoRA, unfreeze full-trained roles, store the frozen rest in fp8,
    switch on gradient checkpointing. Returns the roles with trainable parameters."""
    from qi_plugins.lora.training import add_lora, fuse_lora, load_lora_checkpoint

    trainable = TrainArgs.split(args.trainable_models)
    for role in trainable + ([args.lora_base_model] if args.lora_base_model else []):
        if role not in pipe.components:
            raise InvalidInputError(
                f"role {role!r} is not a loaded component of {pipe.name!r} (components: {', '.join(pipe.components)})"
            )
    if args.preset_lora_path:
        fuse_lora(pipe, args.preset_lora_path, args.preset_lora_model or args.lora_base_model or "dit")
    if args.lora_base_model:
        model = as_module(pipe.components[args.lora_base_model], args.lora_base_model)
        add_lora(model, args.lora_target_modules, args.lora_rank, pipe.dtype)
        if args.lora_checkpoint:
            load_lora_checkpoint(model, args.lora_checkpoint)
    for role in trainable:  # after LoRA injection, which freezes every non-LoRA parameter
        as_module(pipe.components[role], role).requires_grad_(True)
    roles = [r for r in pipe.components if _has_trainable(pipe.components[r])]
    if not roles:
        raise InvalidInputError(
            "nothing to train: pass --trainable_models (e.g. dit) for full training or --lora_base_model dit for LoRA"
        )
    from qi_core.plugin_host import host

    recipe = host().registry.get("pipeline", args.pipeline).load()
    names = model_sources(args, recipe)[2]
    for role in roles_of(args.fp8_models, names, recipe, "fp8_models"):
        if role not in pipe.components:
            continue  # not loaded in this stage of split training
        if role in trainable:
            raise InvalidInputError(f"--fp8_models {role}: a fully trained model cannot be stored in fp8")
        store_fp8(as_module(pipe.components[role], role))
    if args.use_gradient_checkpointing or args.use_gradient_checkpointing_offload:
        for role in roles:
            m = as_module(pipe.components[role], role)
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = True
            else:
                warnings.warn(
                    f"{role} ({type(m).__name__}) has no gradient_checkpointing switch", stacklevel=2
                )
    return roles


def _has_trainable(component: Any) -> bool:
    try:
        return any(p.requires_grad for p in as_module(component).parameters())
    except InvalidInputError:
        return False


# -- fp8 storage of frozen weights ----------------------------------------------------------------------------
class FP8Linear(nn.Linear):
    """A frozen Linear whose weight is kept in float8_e4m3fn (``weight_fp8``, per-row ``fp8_scale``) and computed
    in its original dtype. Swapped in by class, so the module tree is unchanged; ``weight`` reads back the
    dequantized matrix (models that take their compute dtype from a weight still see bf16/fp32)."""

    weight_fp8: torch.Tensor
    fp8_scale: torch.Tensor
    compute_dtype: torch.dtype

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.weight_fp8.to(self.compute_dtype) * self.fp8_scale.to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_fp8.to(x.dtype) * self.fp8_scale.to(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w, b)


def store_fp8(module: nn.Module) -> int:
    """Store every frozen ``nn.Linear`` of ``module`` in fp8 (per-row scales keep small weights out of fp8's
    subnormal range); returns how many layers were converted. Trainable layers are left alone. The fp8 tensors
    are non-persistent buffers: frozen weights are never saved."""
    from qi_plugins.memory.policies import quantise_rows

    n = 0
    for m in module.modules():
        if type(m) is not nn.Linear or m.weight.requires_grad or m.weight.is_meta:
            continue
        w = m._parameters.pop("weight").data
        fp8 = torch.empty(w.shape, dtype=torch.float8_e4m3fn, device=w.device)
        scale = quantise_rows(w, fp8)  # (out, 1) float32: amax / fp8 max, per row
        m.register_buffer("weight_fp8", fp8, persistent=False)
        m.register_buffer("fp8_scale", scale, persistent=False)
        m.compute_dtype = w.dtype
        m.__class__ = FP8Linear
        n += 1
    return n


# -- the module data-parallel wrappers see -------------------------------------------------------------------
class TrainingModule(nn.Module):
    """Holds the trained components as ``pipe.<role>`` and computes the task's loss through the pipeline."""

    def __init__(self, pipe: Any, task: Any, roles: list[str], *, offload_activations: bool = False):
        super().__init__()
        self.pipe = nn.ModuleDict({r: as_module(pipe.components[r], r) for r in roles})
        self.qi_pipe, self.task, self.offload_activations = pipe, task, offload_activations
        # DDP broadcasts and syncs only what is trained: frozen weights are identical on every process already
        # (and fp8 buffers are not a dtype every backend can send)
        frozen = [n for n, p in self.named_parameters() if not p.requires_grad]
        frozen += [n for n, b in self.named_buffers() if n.endswith((".weight_fp8", ".fp8_scale"))]
        self._ddp_params_and_buffers_to_ignore = frozen

    def forward(self, batch: Any, generators: list[torch.Generator]) -> torch.Tensor:
        ctx = nullcontext()
        if self.offload_activations:  # the saved activations (checkpointed block inputs) live on the CPU
            ctx = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
        with ctx:
            return self.task.loss(self.qi_pipe, batch, generators)


def trainable_state_dict(module: nn.Module, remove_prefix: str | None = None,
                         state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """The trainable parameters by (prefix-stripped) name, on the CPU. ``state``: a gathered state dict
    (DeepSpeed ZeRO-3) to read the values from."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    values = state if state is not None else dict(module.named_parameters())
    out = {}
    for n in names:
        key = n[len(remove_prefix) :] if remove_prefix and n.startswith(remove_prefix) else n
        out[key] = values[n].detach().to("cpu").contiguous()
    return out


def load_trainable(
    module: nn.Module, weights: dict[str, torch.Tensor], remove_prefix: str | None, what: str
) -> None:
    """Copy saved trainable weights back (prefix re-added); strict on unknown keys, as the seed."""
    params = dict(module.named_parameters())
    unknown = []
    with torch.no_grad():
        for key, value in weights.items():
            name = key if key in params else f"{remove_prefix or ''}{key}"
            if name not in params:
                unknown.append(key)
                continue
            if params[name].shape != value.shape:
                raise WeightMismatchError(
                    f"{what}: {key} is {tuple(value.shape)}, the model's is {tuple(params[name].shape)}"
                )
            params[name].copy_(value.to(params[name].dtype))
    if unknown:
        raise WeightMismatchError(
            f"{what}: {len(unknown)} key(s) match no parameter (e.g. {', '.join(unknown[:3])}); was it saved with "
            f"another --remove_prefix_in_ckpt (this run: {remove_prefix!r}) or other LoRA targets?"
        )


def default_dtype(args: TrainArgs, device: torch.device) -> torch.dtype:
    if args.torch_dtype is not None:
        return parse_dtype(args.torch_dtype, ("float32", "bfloat16", "float16"))
    return torch.float32 if device.type == "cpu" else torch.bfloat16
