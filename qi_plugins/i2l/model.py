"""The image-to-LoRA model (DiffSynth-Studio's ``QwenImageImage2LoRAModel``, same state-dict keys).

From one image's embedding ``x`` (1, E) — SigLIP2 pooled ⊕ DINOv3 pooled, E = 1536 + 4096 = 5632 — and an
optional Qwen-VL residual (1, R·D) — the text encoder's hidden states of the image (R tokens of width D) — it
computes a rank-``rank`` LoRA for 12 linear layers of every DiT block:

* ``blocks.{g·num_blocks + b}`` serves DiT block b for pattern group g (four groups, :data:`GROUPS`);
* each target layer j of the group has ``layers.{j}.proj_a`` / ``proj_b``: ``proj_out(proj_in(x) + r)``,
  reshaped to A (rank, in) and B (out, rank) — Linear layers without bias;
* ``r = proj_residual(0.05 · residual)``: Linear(D → mid) on each of the R tokens, flattened, Linear(R·mid →
  compress); absent for the style model (``use_residual=False``).

Several images give one LoRA per image, merged as the seed does (:func:`merge_loras`): A's concatenated
along the rank axis and scaled by 1/n, B's concatenated — the mean of the per-image updates ``B_k A_k``.

Output keys: ``transformer_blocks.{b}.{module}.lora_A.default.weight`` / ``lora_B`` (DiffSynth / PEFT
layout), loadable by any LoRA loader.

Axes: n images · E image-embedding width · R residual tokens · D residual width · r rank.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import nn

from qi_core.errors import InvalidInputError, ModelLoadError
from qi_core.loading import check_state_dict, read_state_dict

#: DiT modules per pattern group, with (in, out) features in units of the DiT width (ffn = 4×, mod = 6×).
GROUPS: tuple[tuple[tuple[str, int, int], ...], ...] = (
    (("attn.to_q", 1, 1), ("attn.to_k", 1, 1), ("attn.to_v", 1, 1), ("attn.to_out.0", 1, 1)),
    (("img_mlp.net.2", 4, 1), ("img_mod.1", 1, 6)),
    (
        ("attn.add_q_proj", 1, 1),
        ("attn.add_k_proj", 1, 1),
        ("attn.add_v_proj", 1, 1),
        ("attn.to_add_out", 1, 1),
    ),
    (("txt_mlp.net.2", 4, 1), ("txt_mod.1", 1, 6)),
)
RESIDUAL_SCALE = 0.05  # DiffSynth's QwenImageImage2LoRAModel.residual_scale


@dataclass(frozen=True)
class I2LConfig:
    """Constructor arguments of DiffSynth's model (defaults = Qwen-Image-i2L-Coarse), plus the target sizes."""

    num_blocks: int = 60  # DiT blocks the LoRA covers
    use_residual: bool = True  # takes the Qwen-VL residual (coarse, fine); False for style
    compress_dim: int = 128  # bottleneck width of every projection (style: 64)
    rank: int = 4  # LoRA rank per image
    residual_length: int = (
        64 + 7
    )  # R: vision tokens + 7 template tokens (coarse 224² → 71, fine 1024² → 1376)
    residual_mid_dim: int = 1024  # per-token width after proj_residual.proj_in (fine: 64)
    residual_dim: int = 3584  # D: text-encoder hidden size (Qwen2.5-VL-7B)
    embed_dim: int = 1536 + 4096  # E: SigLIP2-G384 pooled + DINOv3-7B pooled
    dim: int = 3072  # the target DiT's width (hard-coded to the real Qwen-Image in DiffSynth)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "use_residual" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InvalidInputError(f"I2LConfig.{f.name} must be a positive integer, got {v!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> I2LConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelLoadError(f"unknown i2L config field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


class CompressedMLP(nn.Module):
    """``proj_out(proj_in(x) + r)``, no biases."""

    def __init__(self, in_dim: int, mid_dim: int, out_dim: int):
        super().__init__()
        self.proj_in = nn.Linear(in_dim, mid_dim, bias=False)
        self.proj_out = nn.Linear(mid_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        h = self.proj_in(x)
        return self.proj_out(h if r is None else h + r)


class LoRAMatrices(nn.Module):
    """One target layer: the image embedding → A (rank, in) and B (out, rank)."""

    def __init__(self, c: I2LConfig, in_features: int, out_features: int):
        super().__init__()
        self.rank, self.in_features, self.out_features = c.rank, in_features, out_features
        self.proj_a = CompressedMLP(c.embed_dim, c.compress_dim, c.rank * in_features)
        self.proj_b = CompressedMLP(c.embed_dim, c.compress_dim, out_features * c.rank)

    def forward(self, x: torch.Tensor, r: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        a = rearrange(self.proj_a(x, r), "1 (r i) -> r i", r=self.rank)
        b = rearrange(self.proj_b(x, r), "1 (o r) -> o r", r=self.rank)
        return a, b


class ResidualProjection(nn.Module):
    """(1, R·D) → Linear(D → mid) per token → flatten → Linear(R·mid → compress) = (1, compress)."""

    def __init__(self, c: I2LConfig):
        super().__init__()
        self.length, self.width = c.residual_length, c.residual_dim
        self.proj_in = nn.Linear(c.residual_dim, c.residual_mid_dim, bias=False)
        self.proj_out = nn.Linear(c.residual_length * c.residual_mid_dim, c.compress_dim, bias=False)

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        if residual.numel() != self.length * self.width:
            raise InvalidInputError(
                f"the i2L residual has {residual.numel()} values; this model expects {self.length} tokens × "
                f"{self.width} = {self.length * self.width} (coarse models take a 224x224 image: 71 tokens, "
                "fine models 1024x1024: 1376 tokens)"
            )
        tokens = self.proj_in(residual.reshape(self.length, self.width))  # (R, mid)
        return self.proj_out(rearrange(tokens, "R M -> 1 (R M)"))


class Block(nn.Module):
    """The LoRAs of one pattern group for one DiT block (key ``blocks.{g·num_blocks + b}``)."""

    def __init__(self, c: I2LConfig, group: Sequence[tuple[str, int, int]], block: int):
        super().__init__()
        self.names = [f"transformer_blocks.{block}.{name}" for name, _, _ in group]
        self.layers = nn.ModuleList(LoRAMatrices(c, i * c.dim, o * c.dim) for _, i, o in group)
        self.proj_residual = ResidualProjection(c) if c.use_residual else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None) -> dict[str, torch.Tensor]:
        r = self.proj_residual(residual) if self.proj_residual is not None else None
        out = {}
        for name, layer in zip(self.names, self.layers, strict=True):
            out[f"{name}.lora_A.default.weight"], out[f"{name}.lora_B.default.weight"] = layer(x, r)
        return out


class Image2LoRA(nn.Module):
    """The whole model: ``model(x, residual)`` → one image's LoRA state dict."""

    def __init__(self, config: I2LConfig = I2LConfig()):
        super().__init__()
        self.config = c = config
        self.blocks = nn.ModuleList(Block(c, g, b) for g in GROUPS for b in range(c.num_blocks))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``x`` (1, E) or (E,); ``residual`` (1, R·D) — ignored by a model without ``proj_residual``."""
        c = self.config
        x = x.reshape(1, -1).to(self.dtype)
        if x.shape[1] != c.embed_dim:
            raise InvalidInputError(
                f"image embedding has {x.shape[1]} values, the i2L model expects {c.embed_dim} "
                "(SigLIP2-G384 pooled 1536 + DINOv3-7B pooled 4096)"
            )
        if c.use_residual:
            if residual is None:
                raise InvalidInputError(
                    "this i2L model (use_residual=True: coarse/fine) needs the Qwen-VL residual of the image; "
                    "pass residual= or load a text encoder"
                )
            residual = residual.reshape(1, -1).to(self.dtype) * RESIDUAL_SCALE
        else:
            residual = None
        lora: dict[str, torch.Tensor] = {}
        for block in self.blocks:
            lora.update(block(x, residual))
        return lora

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def merged(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Several images (n, 1, E) (and residuals (n, 1, R·D)) → their LoRAs merged as the seed does."""
        if residual is not None and len(residual) != len(x):
            raise InvalidInputError(
                f"{len(x)} image embeddings but {len(residual)} residuals; give one per image"
            )
        return decode([self], x, residual)


def merge_loras(loras: Sequence[dict[str, torch.Tensor]], alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """Concatenate LoRAs along the rank axis (A rows ×``alpha``, B columns): ΔW = alpha · Σ_k B_k A_k.

    DiffSynth's ``merge_lora``: several images are merged with ``alpha = 1/n`` (the mean update); a bias LoRA
    is merged after that with ``alpha = 1``. Every LoRA must have the keys of the first.
    """
    if not loras:
        raise InvalidInputError("merge_loras needs at least one LoRA")
    merged = {}
    for key in (k for k in loras[0] if ".lora_A." in k):
        key_b = key.replace(".lora_A.", ".lora_B.")
        missing = [i for i, lora in enumerate(loras) if key not in lora or key_b not in lora]
        if missing:
            raise InvalidInputError(
                f"LoRA #{missing[0]} has no {key!r} / {key_b!r}; all merged LoRAs need the same keys"
            )
        merged[key] = torch.cat([lora[key] for lora in loras], dim=0) * alpha
        merged[key_b] = torch.cat([lora[key_b] for lora in loras], dim=1)
    return merged


# -- loading -----------------------------------------------------------------------------------------------
def infer_config(sd: dict[str, torch.Tensor], dim: int = 3072) -> I2LConfig:
    """Constructor arguments from the weight shapes (the rank and the DiT width only appear as a product:
    ``dim`` — the target DiT's width — is given, 3072 for every released model)."""
    try:
        blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        a_in = sd["blocks.0.layers.0.proj_a.proj_in.weight"]
        a_out = sd["blocks.0.layers.0.proj_a.proj_out.weight"]
    except (KeyError, ValueError):
        raise ModelLoadError(
            "not an i2L checkpoint: expected keys like blocks.0.layers.0.proj_a.proj_in.weight"
        ) from None
    if blocks % len(GROUPS) or a_out.shape[0] % dim:
        raise ModelLoadError(
            f"i2L checkpoint shapes don't fit a DiT of width {dim}: {blocks} blocks (must be a multiple of "
            f"{len(GROUPS)}), proj_a.proj_out rows {a_out.shape[0]} (must be rank × {dim})"
        )
    kw: dict[str, Any] = dict(num_blocks=blocks // len(GROUPS), compress_dim=a_in.shape[0],
                              embed_dim=a_in.shape[1], rank=a_out.shape[0] // dim, dim=dim)  # fmt: skip
    r_in = sd.get("blocks.0.proj_residual.proj_in.weight")
    kw["use_residual"] = r_in is not None
    if r_in is not None:
        r_out = sd["blocks.0.proj_residual.proj_out.weight"]
        kw.update(residual_mid_dim=r_in.shape[0], residual_dim=r_in.shape[1],
                  residual_length=r_out.shape[1] // r_in.shape[0])  # fmt: skip
    return I2LConfig(**kw)


def load_i2l(path: str | Path, *, config: I2LConfig | None = None, dim: int | None = None,
             device: Any = "cpu", dtype: torch.dtype = torch.float32) -> Image2LoRA:  # fmt: skip
    """Load an i2L model from a ``.safetensors`` file, strictly.

    The config comes from ``config``, else a side-car ``<file>.json`` (``{"init_args": {...}}``), else the weight
    shapes (:func:`infer_config`, with ``dim`` = the target DiT width, default 3072).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"i2L weights {path} do not exist")
    sd = read_state_dict([path])
    if config is None:
        side = path.with_suffix(".json")
        if side.exists():
            args = dict(json.loads(side.read_text()).get("init_args", {}))
            if dim is not None:
                args["dim"] = dim
            config = I2LConfig.from_dict(args)
        else:
            config = infer_config(sd, dim or 3072)
    with torch.device("meta"):
        model = Image2LoRA(config)
    check_state_dict(model.state_dict(), sd, f"i2L model ({path.name}, {config})")
    model.load_state_dict(sd, assign=True, strict=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def save_lora(
    lora: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write a LoRA state dict as safetensors, atomically (temporary file in the same folder, then rename)."""
    from qi_core.atomic import save_safetensors

    return save_safetensors(lora, path, metadata={"format": "pt", **(metadata or {})})


def decode(models: Sequence[Image2LoRA], x: torch.Tensor, residual: torch.Tensor | None = None,
           residual_highres: torch.Tensor | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """DiffSynth's ``QwenImageUnit_Image2LoRADecode``: every model on every image, all LoRAs merged with
    ``alpha = 1/n_images``. ``x`` (n, 1, E); each residual model takes whichever residual (n, 1, R·D) has its
    size (coarse: 224² image, fine: 1024²)."""
    if not models:
        raise InvalidInputError("decode needs at least one i2L model (style, coarse or fine)")
    loras = []
    for model in models:
        c = model.config
        res = None
        if c.use_residual:
            need = c.residual_length * c.residual_dim
            res = next(
                (r for r in (residual, residual_highres) if r is not None and r[0].numel() == need), None
            )
            if res is None:
                got = [tuple(r.shape) for r in (residual, residual_highres) if r is not None]
                raise InvalidInputError(
                    f"an i2L model needs a residual of {c.residual_length} tokens x {c.residual_dim} per image "
                    f"((n, 1, {need})); got {got or 'none'}"
                )
        loras += [model(xk, None if res is None else res[k]) for k, xk in enumerate(x)]
    return merge_loras(loras, alpha=1 / len(x))
