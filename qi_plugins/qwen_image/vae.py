"""Qwen-Image VAE: a Wan-2.1-style causal 3D autoencoder, run on single images.

Axis glossary
    B       batch
    C       channels (image: 3 = RGB or 4 = RGBA; latent: z_dim = 16)
    T       frames of the official 5-D layout (always 1 here)
    kt, kh, kw   temporal / spatial kernel size of a 3D convolution
    H, W    image height / width in pixels
    h, w    latent height / width (= H/8, W/8)

The official checkpoint (diffusers ``AutoencoderKLQwenImage``) stores every convolution as a causal 3D convolution
with 5-D weights ``(C_out, C_in, kt, kh, kw)``. A causal convolution pads the time axis at the front only
(``2*p`` zero frames), so for a single frame (T = 1) a kernel with ``kt = 3`` only ever sees ``[0, 0, x]``: the
result is exactly a 2-D convolution with the last temporal slice ``weight[:, :, -1]``. This module therefore keeps
the 5-D parameters (so checkpoints load unchanged, strictly) but computes everything with 2-D ops on
``(B, C, H, W)`` tensors. The ``time_conv`` of the 3D resample layers exists only as parameters: with a single
frame the reference implementations never apply it (down: the first chunk is only cached; up: the first frame is
marked "Rep" and skipped).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from qi_core.errors import InvalidInputError, ModelLoadError
from qi_core.loading import Load, load_module, read_json, weight_files

_REAL_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
_REAL_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class VAEConfig:
    """Fields of the official ``vae/config.json`` (diffusers names, including the "temperal" spelling)."""

    base_dim: int = 96  # channels of the first encoder level (and last decoder level)
    z_dim: int = 16  # latent channels; the encoder emits 2*z_dim (mean ⊕ log-variance)
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)  # channel multiplier per level; len-1 = number of 2x resamplings
    num_res_blocks: int = 2  # residual blocks per encoder level (decoder levels get one more)
    attn_scales: tuple[float, ...] = ()  # encoder scales (1, 1/2, ...) that get an extra attention block
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # which resamplings are 3D (adds time_conv)
    dropout: float = 0.0  # dropout inside residual blocks (inactive in eval mode)
    input_channels: int = 3  # image channels: 3 (RGB) or 4 (RGBA, Qwen-Image-Layered)
    latents_mean: tuple[float, ...] = _REAL_LATENTS_MEAN  # per-channel mean of the raw latents
    latents_std: tuple[float, ...] = _REAL_LATENTS_STD  # per-channel std of the raw latents

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        """Build from a parsed ``config.json``; ``_``-prefixed metadata is ignored, lists become tuples."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if not k.startswith("_") and k not in known)
        if unknown:
            raise ModelLoadError(f"VAE config has unknown field(s) {unknown}; known fields: {sorted(known)}.")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------------------------
# Building blocks (all operate on (B, C, H, W); parameter names/shapes follow the official 5-D checkpoint)
# --------------------------------------------------------------------------------------------------------------


class CausalConv3d(nn.Conv3d):
    """Causal 3D convolution evaluated on a single frame as the equivalent 2-D convolution.

    Subclassing ``nn.Conv3d`` keeps the official ``weight (C_out, C_in, kt, kh, kw)`` / ``bias`` names, shapes and
    default initialisation. Only the last temporal tap can touch the frame (the others see causal zero padding).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pad = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        self.spatial_padding = (pad[1], pad[2])  # symmetric in H/W; the time padding is causal (front only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # With front padding kt-1 the single output frame reads the input frame at tap kt-1 only, whatever the
        # time stride. (The resample ``time_conv``s are never called, so their different padding plays no role.)
        weight = self.weight[:, :, -1]
        return F.conv2d(x, weight, self.bias, stride=self.stride[1:], padding=self.spatial_padding)


class RMSNorm(nn.Module):
    """Channel RMS norm: ``normalize(x, dim=C) * sqrt(C) * gamma``.

    ``gamma`` is stored as (C, 1, 1, 1) in 5-D blocks and (C, 1, 1) in attention blocks (official shapes); both are
    applied per channel of a (B, C, H, W) tensor.
    """

    def __init__(self, dim: int, five_d: bool = True) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1, 1) if five_d else (dim, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Reduced-precision inputs normalise in float32 (as the reference does), then go back to their dtype.
        upcast = x.dtype in (torch.float16, torch.bfloat16) or "float8" in str(x.dtype)
        normed = F.normalize(x.float() if upcast else x, dim=1).to(x.dtype)
        # Same operation order as the reference: (normed * scale) * gamma.
        return normed * self.scale * self.gamma.view(-1, 1, 1)


class ResidualBlock(nn.Module):
    """norm → SiLU → conv3x3 → norm → SiLU → dropout → conv3x3, plus a (1x1 if needed) shortcut."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x)))
        x = self.conv2(self.dropout(F.silu(self.norm2(x))))
        return x + shortcut


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of the frame, with residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, five_d=False)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        qkv = rearrange(self.to_qkv(self.norm(x)), "b c h w -> b 1 (h w) c")
        q, k, v = qkv.chunk(3, dim=-1)  # channel blocks [q | k | v] of the 1x1 conv output
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=height, w=width)
        return self.proj(out) + x


class _Upsample2x(nn.Module):
    """Nearest-neighbour 2x upsampling (parameter-free slot 0 of ``resample``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # For an exact factor 2 "nearest-exact" and "nearest" coincide: every pixel is copied to a 2x2 block.
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


class Resample(nn.Module):
    """Spatial 2x down- or upsampling; the ``*3d`` modes also carry the (unused for images) ``time_conv``."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode in ("downsample2d", "downsample3d"):
            # Pad right/bottom by one, then a stride-2 3x3 conv: H -> H/2 for even H.
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        elif mode in ("upsample2d", "upsample3d"):
            # Upsampling halves the channels (the next decoder level expects dim // 2).
            self.resample = nn.Sequential(_Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        elif mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


class MidBlock(nn.Module):
    """resnet → attention → resnet at the lowest resolution."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout), ResidualBlock(dim, dim, dropout)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            x = resnet(attn(x))
        return x


class Encoder(nn.Module):
    """Image (B, C, H, W) → raw posterior parameters (B, 2*z_dim, h, w)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.input_channels, dims[0], 3, padding=1)
        # One flat list per the checkpoint layout: per level the residual (+attention) blocks, then a resample.
        self.down_blocks = nn.ModuleList()
        scale = 1.0
        n_levels = len(cfg.dim_mult)
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(cfg.num_res_blocks):
                self.down_blocks.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
                if scale in cfg.attn_scales:
                    self.down_blocks.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if level != n_levels - 1:
                mode = "downsample3d" if cfg.temperal_downsample[level] else "downsample2d"
                self.down_blocks.append(Resample(out_dim, mode))
                scale /= 2.0
        self.mid_block = MidBlock(dims[-1], cfg.dropout)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.z_dim * 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class UpBlock(nn.Module):
    """num_res_blocks + 1 residual blocks, then an optional 2x upsampling."""

    def __init__(
        self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float, upsample_mode: str | None
    ) -> None:
        super().__init__()
        dims_in = [in_dim] + [out_dim] * num_res_blocks
        self.resnets = nn.ModuleList(ResidualBlock(d, out_dim, dropout) for d in dims_in)
        # ``upsamplers`` is None (no key) for the last level, a 1-element list otherwise (checkpoint layout).
        self.upsamplers = nn.ModuleList([Resample(out_dim, upsample_mode)]) if upsample_mode else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Decoder(nn.Module):
    """Raw latents (B, z_dim, h, w) → image (B, C, H, W)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temperal_upsample = tuple(reversed(cfg.temperal_downsample))
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], cfg.dropout)
        self.up_blocks = nn.ModuleList()
        n_levels = len(cfg.dim_mult)
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if level > 0:
                in_dim //= 2  # the previous level's upsampler halved the channels
            mode = None
            if level != n_levels - 1:
                mode = "upsample3d" if temperal_upsample[level] else "upsample2d"
            self.up_blocks.append(UpBlock(in_dim, out_dim, cfg.num_res_blocks, cfg.dropout, mode))
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.input_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(x))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


# --------------------------------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------------------------------


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        a, b = v
        return int(a), int(b)
    return int(v), int(v)


def _tile_starts(length: int, size: int, stride: int) -> list[tuple[int, int]]:
    """(start, end) of the tiles along one axis: starts every ``stride``, clipped at the border; a start is dropped
    when the previous tile already reaches the border (it would add nothing)."""
    spans = []
    for start in range(0, length, stride):
        if start - stride >= 0 and start - stride + size >= length:
            continue
        spans.append((start, min(start + size, length)))
    return spans


def _ramp(length: int, width: int, ramp_start: bool, ramp_end: bool) -> torch.Tensor:
    """1-D blend weight: ones, with (k+1)/width, k = 0..width-1 rising at the start and falling at the end.
    The end ramp is written last, so it wins where the two overlap (reference behaviour)."""
    w = torch.ones(length, dtype=torch.float32)
    if width <= 0:  # stride == size: tiles do not overlap, nothing to blend
        return w
    ramp = torch.arange(1, width + 1, dtype=torch.float32) / width
    n = min(width, length)
    if ramp_start:
        w[:n] = ramp[:n]
    if ramp_end:
        w[length - n :] = ramp[:n].flip(0)
    return w


def _tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile_size: int | tuple[int, int],
    tile_stride: int | tuple[int, int],
    in_scale: int,
    out_scale: int,
) -> torch.Tensor:
    """Run ``fn`` tile by tile on a grid measured in latent pixels and blend the outputs.

    A latent pixel covers ``in_scale`` input pixels and ``out_scale`` output pixels per axis (encode: 8 → 1,
    decode: 1 → 8). Each tile output is weighted by a linear ramp of width ``(size - stride) * out_scale`` on every
    edge that is not an image border (2-D weight = min of row and column ramps); result = Σ w·y / Σ w.
    Tiles are processed one at a time so that peak memory is that of one tile.
    """
    size_h, size_w = _pair(tile_size)
    stride_h, stride_w = _pair(tile_stride)
    if not (0 < stride_h <= size_h and 0 < stride_w <= size_w):
        raise InvalidInputError(
            f"tile_stride must be positive and not larger than tile_size; got tile_size={tile_size}, "
            f"tile_stride={tile_stride}."
        )
    grid_h, grid_w = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    out_h, out_w = grid_h * out_scale, grid_w * out_scale
    border_h, border_w = (size_h - stride_h) * out_scale, (size_w - stride_w) * out_scale

    values: torch.Tensor | None = None
    weight = torch.zeros((1, 1, out_h, out_w), dtype=x.dtype, device=x.device)
    for h0, h1 in _tile_starts(grid_h, size_h, stride_h):
        for w0, w1 in _tile_starts(grid_w, size_w, stride_w):
            y = fn(x[..., h0 * in_scale : h1 * in_scale, w0 * in_scale : w1 * in_scale])
            if values is None:
                values = torch.zeros((x.shape[0], y.shape[1], out_h, out_w), dtype=y.dtype, device=y.device)
            ramp_h = _ramp(y.shape[-2], border_h, h0 > 0, h1 < grid_h)
            ramp_w = _ramp(y.shape[-1], border_w, w0 > 0, w1 < grid_w)
            mask = torch.minimum(ramp_h[:, None], ramp_w[None, :]).to(dtype=x.dtype, device=x.device)
            rows = slice(h0 * out_scale, h1 * out_scale)
            cols = slice(w0 * out_scale, w1 * out_scale)
            values[:, :, rows, cols] += y * mask
            weight[:, :, rows, cols] += mask
            del y  # release the tile before the next one is computed
    assert values is not None
    return values / weight


# --------------------------------------------------------------------------------------------------------------
# The autoencoder
# --------------------------------------------------------------------------------------------------------------


class QwenImageVAE(nn.Module):
    """Qwen-Image VAE with the state-dict keys of diffusers' ``AutoencoderKLQwenImage``.

    ``encode``: image (B, C, H, W) in [-1, 1] → normalised latents (B, z_dim, H/8, W/8) (posterior mean).
    ``decode``: normalised latents → image (B, C, H, W), not clamped.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        if len(config.latents_mean) != config.z_dim or len(config.latents_std) != config.z_dim:
            raise ModelLoadError(
                f"latents_mean/latents_std need z_dim={config.z_dim} entries; got "
                f"{len(config.latents_mean)}/{len(config.latents_std)}."
            )
        self.config = config
        self.latent_channels = config.z_dim
        self.scale_factor = 2 ** (len(config.dim_mult) - 1)
        self.image_channels = config.input_channels

        self.encoder = Encoder(config)
        self.quant_conv = CausalConv3d(config.z_dim * 2, config.z_dim * 2, 1)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)

        # Plain float32 CPU tensors, not buffers: they are not in the checkpoint (strict loading), and must not be
        # rounded by ``model.to(bfloat16)``; they are cast to the input's dtype at use. The reciprocal is computed
        # once in float32 and decode divides by it (not multiplies by std) — the reference numerics.
        self._mean = torch.tensor(config.latents_mean, dtype=torch.float32, device="cpu").view(1, -1, 1, 1)
        self._inv_std = 1 / torch.tensor(config.latents_std, dtype=torch.float32, device="cpu").view(
            1, -1, 1, 1
        )

    def _norm_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._mean.to(x.device, x.dtype), self._inv_std.to(x.device, x.dtype)

    def _check(self, x: torch.Tensor, channels: int, what: str, multiple: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise InvalidInputError(f"{what} must be (B, {channels}, H, W); got shape {tuple(x.shape)}.")
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise InvalidInputError(
                f"{what} height and width must be multiples of {multiple}; got {x.shape[-2]}x{x.shape[-1]}."
            )

    def _encode_one(self, image: torch.Tensor) -> torch.Tensor:
        posterior = self.quant_conv(self.encoder(image))
        mu = posterior[:, : self.latent_channels]  # posterior mean; the log-variance half is unused
        mean, inv_std = self._norm_stats(mu)
        return (mu - mean) * inv_std

    def _decode_one(self, z: torch.Tensor) -> torch.Tensor:
        mean, inv_std = self._norm_stats(z)
        return self.decoder(self.post_quant_conv(z / inv_std + mean))

    def encode(
        self,
        image: torch.Tensor,
        tiled: bool = False,
        tile_size: int | tuple[int, int] = 128,
        tile_stride: int | tuple[int, int] = 64,
    ) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] → normalised latents (B, z_dim, H/8, W/8). Tile sizes are in latent pixels."""
        self._check(image, self.image_channels, "image", self.scale_factor)
        if tiled:
            return _tiled(self._encode_one, image, tile_size, tile_stride, self.scale_factor, 1)
        return self._encode_one(image)

    def decode(
        self,
        z: torch.Tensor,
        tiled: bool = False,
        tile_size: int | tuple[int, int] = 128,
        tile_stride: int | tuple[int, int] = 64,
    ) -> torch.Tensor:
        """Normalised latents (B, z_dim, h, w) → image (B, C, 8h, 8w), not clamped."""
        self._check(z, self.latent_channels, "latents", 1)
        if tiled:
            return _tiled(self._decode_one, z, tile_size, tile_stride, 1, self.scale_factor)
        return self._decode_one(z)


# --------------------------------------------------------------------------------------------------------------
# Loading from the official folder layout
# --------------------------------------------------------------------------------------------------------------


def load_vae(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             load: Load | None = None) -> QwenImageVAE:  # fmt: skip
    """Load a VAE from an official ``vae/`` folder (``config.json`` + safetensors), strictly, in eval mode
    (``load``: a factory's loader, see :func:`qi_core.loading.load_module`)."""
    folder = Path(folder)
    config = VAEConfig.from_dict(read_json(folder / "config.json"))
    return load_module(lambda: QwenImageVAE(config), weight_files(folder), device=device, dtype=dtype,
                       what=f"VAE ({folder})", load=load)  # fmt: skip
