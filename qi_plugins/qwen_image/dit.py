"""The Qwen-Image MMDiT: 60 dual-stream blocks, joint [text, image] attention, 3-axis RoPE.

State-dict keys are the official ones (``transformer/diffusion_pytorch_model*.safetensors``).

Axes: B batch · F target frames · L text tokens · N image tokens · S = L + N joint sequence · H heads ·
D head dim · C latent channels · (h, w) latent size · (P, Q) = 2x2 patch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from qi_core.errors import InvalidInputError
from qi_core.protocols import DenoiseInput, ImageSegment, TextSegment
from qi_plugins.qwen_image import kernels


@dataclass(frozen=True)
class DiTConfig:
    """``transformer/config.json`` of the official repository (defaults = Qwen-Image)."""

    patch_size: int = 2  # latent pixels per token side
    in_channels: int = 64  # C·P·Q of a patchified latent token
    out_channels: int = 16  # latent channels C
    num_layers: int = 60  # dual-stream blocks
    attention_head_dim: int = 128  # D
    num_attention_heads: int = 24  # H; inner dim = H·D = 3072
    joint_attention_dim: int = 3584  # text-encoder hidden size (Qwen2.5-VL-7B)
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)  # RoPE dims for (frame, row, column); sum = D
    rope_theta: int = 10000  # RoPE base (official QwenEmbedRope)
    zero_cond_t: bool = False  # Edit-2511 flag; honoured by the edit plugin's injector, kept for round trips
    use_additional_t_cond: bool = False  # layered flag; the layered plugin builds its own DiT
    use_layer3d_rope: bool = False  # layered flag
    guidance_embeds: bool = False  # unused by every released checkpoint

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def __post_init__(self) -> None:
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise InvalidInputError(
                f"RoPE axes {tuple(self.axes_dims_rope)} sum to {sum(self.axes_dims_rope)}, but the head dim is "
                f"{self.attention_head_dim}; they must be equal"
            )
        if any(d % 2 for d in self.axes_dims_rope):
            raise InvalidInputError(f"every RoPE axis dim must be even, got {tuple(self.axes_dims_rope)}")

    @classmethod
    def from_dict(cls, d: dict) -> DiTConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known}
        return cls(**kw)


class RMSNorm(nn.Module):
    """RMS norm with statistics in float32 (official numerics)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # fused kernel, same arithmetic
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [cos, sin] of ``1000·t`` (t = timestep/1000), float32, (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    a = 1000 * (t[:, None].float() * freqs[None])
    return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(256, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(timestep_features(t).to(dtype))))


class TimeTextEmbed(nn.Module):
    """Key prefix ``time_text_embed``; ``timestep_embedder`` holds the MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(t, dtype)


class Attention(nn.Module):
    """Joint attention of the text and image streams, each with its own projections and QK norms."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out = nn.Linear(dim, dim)
        self.attend = F.scaled_dot_product_attention  # backend(q, k, v, mask); see QwenImageDiT.set_attention

    def forward(self, img, txt, rope_img, rope_txt, mask):
        heads = lambda lin, x: rearrange(kernels.linear(lin, x), "B S (H D) -> B S H D", D=self.head_dim)  # noqa: E731
        q = torch.cat([rope(self.norm_added_q(heads(self.add_q_proj, txt)), rope_txt),
                       rope(self.norm_q(heads(self.to_q, img)), rope_img)], dim=1)  # fmt: skip
        k = torch.cat([rope(self.norm_added_k(heads(self.add_k_proj, txt)), rope_txt),
                       rope(self.norm_k(heads(self.to_k, img)), rope_img)], dim=1)  # fmt: skip
        v = torch.cat([heads(self.add_v_proj, txt), heads(self.to_v, img)], dim=1)
        if callable(mask):  # the attention itself: a stacked batch's rows, a sequence split's part
            out = mask(self.attend, q, k, v)
        else:
            q, k, v = (rearrange(x, "B S H D -> B H S D") for x in (q, k, v))
            out = self.attend(q, k, v, mask)
            out = rearrange(out, "B H S D -> B S (H D)").to(q.dtype)
        L = txt.shape[1]
        img_out = kernels.linear(self.to_out[0], out[:, L:].contiguous())
        return img_out, kernels.linear(self.to_add_out, out[:, :L].contiguous())


def rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (xr, xi) of ``x`` (B, S, H, D) by the angles whose (cos, sin) are ``rot`` (S, D/2, 2):
    (xr·cos − xi·sin, xr·sin + xi·cos) in float32. Eager, as one complex multiply; while ``torch.compile``
    traces, in real arithmetic (inductor generates no code for complex operators and would not fuse it)."""
    if torch.compiler.is_compiling():
        cos, sin = rot[:, None].unbind(-1)
        xr, xi = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1).flatten(-2).type_as(x)
    pairs = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.view_as_complex(rot)[:, None]).flatten(-2).type_as(x)


class FeedForward(nn.Module):
    """``net.0.proj`` → GELU(tanh) → ``net.2`` (the official activation; see README of the golden data)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([_Proj(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(self.net[2], kernels.linear(self.net[0].proj, x, "gelu-tanh"))


class _Proj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)


class Block(nn.Module):
    """Dual-stream block: adaLN-modulated attention and MLP on the text and image streams."""

    #: submodules only :meth:`modulation` reads (see ``QwenImageDiT.modulation_modules``)
    MODULATION = ("img_mod", "txt_mod")

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, head_dim)
        self.img_mlp = FeedForward(dim)
        self.txt_mlp = FeedForward(dim)

    def modulation(self, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """adaLN parameters from the timestep embeddings (K, B, dim): image (K, B, 6·dim), text (B, 6·dim)."""
        return _mod_linear(self.img_mod, temb), _mod_linear(self.txt_mod, temb[0])

    def forward(self, img, txt, temb, rope_img, rope_txt, mask, mod_index, mods=None):
        # temb: (K, B, dim) — K timestep embeddings; image tokens pick theirs through mod_index (B, N)
        if mods is None:
            img_mod, txt_mod = self.img_mod(temb), self.txt_mod(temb[0])  # text always uses the step timestep
        else:  # precomputed once per call for this timestep
            img_mod, txt_mod = mods
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = _select(img_mod, mod_index)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = txt_mod[:, None].chunk(6, dim=-1)

        # x·(1 + scale) + shift and x + gate·y as single fused multiply-adds
        img_a, txt_a = self.attn(
            torch.addcmul(img_shift1, self.img_norm1(img), 1 + img_scale1),
            torch.addcmul(t_shift1, self.txt_norm1(txt), 1 + t_scale1),
            rope_img,
            rope_txt,
            mask,
        )
        img = torch.addcmul(img, img_gate1, img_a)
        txt = torch.addcmul(txt, t_gate1, txt_a)
        img_m = torch.addcmul(img_shift2, self.img_norm2(img), 1 + img_scale2)
        txt_m = torch.addcmul(t_shift2, self.txt_norm2(txt), 1 + t_scale2)
        img = torch.addcmul(img, img_gate2, self.img_mlp(img_m))
        txt = torch.addcmul(txt, t_gate2, self.txt_mlp(txt_m))
        if img.dtype == torch.float16:  # keep fp16 activations finite
            img, txt = img.clip(-65504, 65504), txt.clip(-65504, 65504)
        return img, txt


def _mod_linear(seq: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """SiLU → Linear; weights that live elsewhere (under a memory policy) are brought to ``x``."""
    lin = seq[1]
    on_device = lin.weight.device == x.device and lin.weight.dtype == x.dtype
    if on_device or type(lin) is not nn.Linear or lin._forward_hooks or lin._forward_pre_hooks:
        return seq(x)  # also the path for adapters that wrap or hook the Linear
    w = lin.weight.to(x.device, x.dtype)
    b = lin.bias.to(x.device, x.dtype) if lin.bias is not None else None
    return F.linear(F.silu(x), w, b)


def _select(mod: torch.Tensor, index: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Per-token modulation: (K, B, 6·dim) and token indices (B, N) → six (B, N or 1, dim) tensors."""
    if index is None:
        return mod[0][:, None].chunk(6, dim=-1)
    per_token = rearrange(mod, "K B E -> B K E").expand(index.shape[0], -1, -1)  # B = 1: shared by every row
    per_token = torch.gather(per_token, 1, index[..., None].expand(-1, -1, per_token.shape[-1]))
    return per_token.chunk(6, dim=-1)


class OutNorm(nn.Module):
    """Key prefix ``norm_out``: adaLN with (scale, shift) from the timestep embedding."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb)).to(x.dtype).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


class QwenImageDiT(nn.Module):
    """The Qwen-Image transformer. ``forward`` takes a :class:`DenoiseInput` and returns the velocity."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = c = config
        dim = c.inner_dim
        self.img_in = nn.Linear(c.in_channels, dim)
        self.txt_norm = RMSNorm(c.joint_attention_dim)
        self.txt_in = nn.Linear(c.joint_attention_dim, dim)
        self.time_text_embed = TimeTextEmbed(dim)
        self.transformer_blocks = nn.ModuleList(
            Block(dim, c.num_attention_heads, c.attention_head_dim) for _ in range(c.num_layers)
        )
        self.norm_out = OutNorm(dim)
        self.proj_out = nn.Linear(dim, c.patch_size * c.patch_size * c.out_channels)
        self.gradient_checkpointing = False
        # {modulation key: every block's modulation} while ``precomputed_modulation`` is open; None: inline
        self._modulation: dict[tuple, list] | None = None
        self._split = None  # the open sequence split (see ``sequence_split``), or None

    def set_attention(self, backend) -> None:
        """Use ``backend(q, k, v, mask) -> out`` (a registered attention backend) in every block."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.attend = backend

    # -- inputs ----------------------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor, frames: int = 1) -> torch.Tensor:
        p = self.config.patch_size
        return rearrange(x, "(B F) C (h P) (w Q) -> B (F h w) (C P Q)", F=frames, P=p, Q=p)

    def unpatchify(self, x: torch.Tensor, h: int, w: int, frames: int = 1) -> torch.Tensor:
        p = self.config.patch_size
        return rearrange(
            x, "B (F h w) (C P Q) -> (B F) C (h P) (w Q)", F=frames, h=h // p, w=w // p, P=p, Q=p
        )

    def _axis_angles(self, axis: int, pos: torch.Tensor) -> torch.Tensor:
        """Angles (len(pos), d/2) of one RoPE axis, computed as the official tables are (float32)."""
        d = self.config.axes_dims_rope[axis]
        inv = 1.0 / torch.pow(self.config.rope_theta, torch.arange(0, d, 2).to(torch.float32).div(d))
        return torch.outer(pos.to(torch.float32), inv)

    @staticmethod
    def centred(n: int) -> torch.Tensor:
        """Centred positions of a grid side: -(n - n//2) … -1, 0 … n//2 - 1."""
        return torch.arange(n) - (n - n // 2)

    def image_angles(self, frame: int, h: int, w: int, rows=None, cols=None) -> torch.Tensor:
        """RoPE angles (h·w, D/2) of one image grid with the given frame index and row/column positions."""
        rows = self.centred(h) if rows is None else rows
        cols = self.centred(w) if cols is None else cols
        f = self._axis_angles(0, torch.tensor([frame])).expand(h * w, -1)
        r = self._axis_angles(1, rows)[:, None].expand(h, w, -1).reshape(h * w, -1)
        c = self._axis_angles(2, cols)[None, :].expand(h, w, -1).reshape(h * w, -1)
        return torch.cat([f, r, c], dim=-1)

    def text_angles(self, offset: int, n: int) -> torch.Tensor:
        pos = torch.arange(offset, offset + n)
        return torch.cat([self._axis_angles(a, pos) for a in range(3)], dim=-1)

    def rope_tables(
        self, inp: DenoiseInput, grids: list[tuple[int, int, int]], segs: list[ImageSegment | None]
    ):
        """(cos, sin) tables, (S, D/2, 2) in float32, for the image tokens and every text segment."""
        (F0, H2, W2) = grids[0]
        parts, frame_next = [], F0
        for f in range(F0):
            parts.append(self.image_angles(f, H2, W2))
        for (_, h2, w2), seg in zip(grids[1:], segs[1:], strict=True):
            frame = frame_next if seg.frame is None else seg.frame
            frame_next += 1
            if seg.rope_from_target and (h2, w2) != (H2, W2):
                rows = self.centred(H2)[torch.linspace(0, H2 - 1, h2).long()]
                cols = self.centred(W2)[torch.linspace(0, W2 - 1, w2).long()]
                parts.append(self.image_angles(frame, h2, w2, rows, cols))
            else:
                parts.append(self.image_angles(frame, h2, w2))
        m = max(max(h // 2, w // 2) for _, h, w in grids)
        img = torch.cat(parts, dim=0)
        txt = [
            self.text_angles(m if s.rope_offset is None else s.rope_offset, s.emb.shape[1]) for s in inp.text
        ]
        dev = inp.latents.device
        rot = lambda a: torch.stack([torch.cos(a), torch.sin(a)], dim=-1).to(dev)  # noqa: E731
        return rot(img), rot(torch.cat(txt, dim=0))

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, inp: DenoiseInput) -> torch.Tensor:
        return self.forward_many([inp])[0]

    def forward_many(self, inputs: list[DenoiseInput], *, stack: bool = False) -> list[torch.Tensor]:
        """Several independent inputs (the CFG sides) block by block: each block runs for all of them before
        the next one, so a streamed block moves once per step, and each input's maths is exactly its own
        forward. With ``stack``, inputs that agree in everything but their text (:func:`layout`) go through as
        one batch along B (:meth:`_enter_stacked`), each result its own forward up to the rounding of matrix
        kernels that depend on the number of rows (none in the CPU tests)."""
        states = self.enter(inputs, stack=stack)
        self.run_blocks(states)
        return self.exit(states)

    def _enter(self, inp: DenoiseInput) -> dict:
        """Tokens, embeddings, RoPE tables and masks of one input."""
        p = self.config.patch_size
        x, Fr = inp.latents, inp.target_frames
        dtype = self.img_in.weight.dtype
        _, _, h, w = x.shape
        if h % p or w % p:
            raise InvalidInputError(f"latent size {h}x{w} must be a multiple of the patch size {p}")
        tokens = [self.patchify(x.to(dtype), Fr)]
        grids = [(Fr, h // p, w // p)]
        mod_ids = [torch.zeros(tokens[0].shape[1], dtype=torch.long)]
        for seg in inp.images:
            tokens.append(self.patchify(seg.latents.to(dtype)))
            grids.append((1, seg.latents.shape[-2] // p, seg.latents.shape[-1] // p))
            mod_ids.append(torch.full((tokens[-1].shape[1],), seg.modulation, dtype=torch.long))
        n_target = tokens[0].shape[1]
        B = tokens[0].shape[0]
        img = self.img_in(torch.cat(tokens, dim=1))

        # text: each segment is normalised and projected on its own, then joined
        txt = torch.cat([self.txt_in(self.txt_norm(s.emb.to(dtype))) for s in inp.text], dim=1)
        txt_mask = torch.cat([_keep(s, img.device) for s in inp.text], dim=1)

        # one timestep for every row (a stacked batch): embedded and modulated as one row alone, broadcast
        temb = self.timestep_embedding(inp, 1 if inp.timestep.numel() == 1 else B, img.device)
        mod_index = torch.cat(mod_ids).to(img.device)
        mod_index = mod_index[None].expand(B, -1) if bool(mod_index.any()) else None
        mods = self._precomputed(inp, temb) or [None] * len(self.transformer_blocks)
        state = {
            "img": img, "txt": txt, "temb": temb, "mod_index": mod_index, "mods": mods,
            "rope": self.rope_tables(inp, grids, [None, *inp.images]),
            "mask": self.joint_mask(txt_mask, img.shape[1], inp.attention_mask, img.dtype),
            "n_target": n_target, "hw": (h, w), "frames": Fr,
        }  # fmt: skip
        return state if self._split is None else self._part(inp, state)

    @contextmanager
    def sequence_split(self, split) -> Iterator[None]:
        """While open, each forward keeps one part of the joint sequence (sequence parallelism, the ``parallel``
        plugin): ``split.part(inp, n_txt, n_img, mask)`` returns the part, with ``text`` and ``image`` (the
        slices of each stream this process computes), ``attention`` (``(attend, q, k, v) -> out`` over the
        part's tokens, given to the blocks in place of the mask) and ``gather_image(img)`` (the whole image
        stream, before the output layers). Per-token operations run on the part only."""
        outer, self._split = self._split, split
        try:
            yield
        finally:
            self._split = outer

    def _part(self, inp: DenoiseInput, s: dict) -> dict:
        part = self._split.part(inp, s["txt"].shape[1], s["img"].shape[1], s["mask"])
        t, i = part.text, part.image
        rope_img, rope_txt = s["rope"]
        mod_index = None if s["mod_index"] is None else s["mod_index"][:, i]
        return {**s, "img": s["img"][:, i], "txt": s["txt"][:, t], "rope": (rope_img[i], rope_txt[t]),
                "mod_index": mod_index, "mask": part.attention, "part": part}  # fmt: skip

    def _enter_stacked(self, inputs: list[DenoiseInput]) -> tuple[DenoiseInput, dict]:
        """One input and state for inputs of one :func:`layout`, their rows stacked along B: text right-padded
        to the longest (mask False), block hooks on their own rows, attention row by row over each row's own
        tokens with its own mask (:class:`RowAttention`). Every operation is row-wise, so each row computes
        what it would alone (padded, masked attention would not: its sums run over other lengths)."""
        if self._split is not None:
            raise InvalidInputError("a sequence split runs each input on its own: do not stack under it")
        stacked, positions = _stack(inputs)
        s = self._enter(stacked)
        n_img, L, dev = s["img"].shape[1], s["txt"].shape[1], s["img"].device
        rows, at = [], 0
        for inp, pos in zip(inputs, positions, strict=True):
            r = inp.latents.shape[0] // inp.target_frames
            keep = torch.cat([_keep(t, dev) for t in inp.text], dim=1)
            mask = self.joint_mask(keep, n_img, inp.attention_mask, s["img"].dtype)
            rows.append((at, r, torch.cat([pos, L + torch.arange(n_img)]).to(dev), mask))
            at += r
        s["mask"] = RowAttention(rows)
        return stacked, s

    def _exit(self, s: dict) -> torch.Tensor:
        img = s["part"].gather_image(s["img"]) if "part" in s else s["img"]
        out = self.proj_out(self.norm_out(img[:, : s["n_target"]], s["temb"][0]))
        return self.unpatchify(out, *s["hw"], s["frames"])

    def timestep_embedding(self, inp: DenoiseInput, batch: int, device: torch.device) -> torch.Tensor:
        """(K, B, dim): index 0 = this step's timestep, 1.. = ``extra_timesteps`` (t = 0 for references)."""
        dtype = self.img_in.weight.dtype
        t = inp.timestep.to(device=device, dtype=torch.float32).reshape(-1).expand(batch) / 1000
        ts = [t] + [torch.full_like(t, v / 1000) for v in inp.extra_timesteps]
        temb = self.time_text_embed(torch.cat(ts), dtype).view(len(ts), batch, -1)
        return temb + self.extra_conditioning(inp, temb)

    # -- timestep-only state --------------------------------------------------------------------------
    # A block's adaLN modulation depends on the timestep embedding alone, so it can be computed for every step
    # of a call before the first one, with the same kernels as inline. The memory plugin does that (for every
    # policy; a streamed block then never moves its modulation weights while denoising) through these four.
    def modulation_layers(self) -> nn.ModuleList:
        """The layers with a timestep-only ``modulation(temb)`` (the blocks)."""
        return self.transformer_blocks

    def modulation_modules(self) -> tuple[str, ...]:
        """Submodules of a layer (names relative to it) that only its ``modulation`` reads."""
        return Block.MODULATION

    def timestep_embeddings(
        self, inputs: list[DenoiseInput], timesteps: torch.Tensor
    ) -> dict[tuple, torch.Tensor]:
        """The timestep embedding (K, 1, dim) of each input at each of ``timesteps`` (one timestep for every
        row: the forward embeds it once), keyed as the forward looks precomputed modulation up (the CFG sides
        and the items of a batch share theirs)."""
        out: dict[tuple, torch.Tensor] = {}
        device = self.img_in.weight.device
        for inp in inputs:
            for t in timesteps.reshape(-1):
                step = replace(inp, timestep=t.reshape(1).to(inp.timestep.dtype))
                key = self._modulation_key(step, 1)
                if key not in out:
                    out[key] = self.timestep_embedding(step, 1, device)
        return out

    @contextmanager
    def precomputed_modulation(self, table: dict[tuple, list]) -> Iterator[None]:
        """While open, layer i takes its modulation for an input from ``table[key][i]`` (``key`` as in
        :meth:`timestep_embeddings`); an input whose key is not there computes it inline."""
        outer, self._modulation = self._modulation, table
        try:
            yield
        finally:
            self._modulation = outer

    @staticmethod
    def _modulation_key(inp: DenoiseInput, batch: int) -> tuple:
        return float(inp.timestep.reshape(-1)[0]), tuple(inp.extra_timesteps), batch

    def _precomputed(self, inp: DenoiseInput, temb: torch.Tensor) -> list | None:
        if self._modulation is None:
            return None
        return self._modulation.get(self._modulation_key(inp, temb.shape[1]))

    def extra_conditioning(self, inp: DenoiseInput, temb: torch.Tensor) -> torch.Tensor | float:
        """Added to the timestep embeddings; subclasses (layered) override."""
        return 0.0

    @staticmethod
    def joint_mask(txt_mask: torch.Tensor, n_img: int, extra: torch.Tensor | None, dtype: torch.dtype):
        """SDPA mask over [text, image]: padding tokens are never attended to; ``extra`` is additive."""
        if extra is None:
            if bool(txt_mask.all()):
                return None
            ones = torch.ones(txt_mask.shape[0], n_img, dtype=torch.bool, device=txt_mask.device)
            return torch.cat([txt_mask, ones], dim=1)[:, None, None, :]
        keep = torch.cat([txt_mask, torch.ones_like(txt_mask[:, :1]).expand(-1, n_img)], dim=1)
        pad = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))
        return extra.to(dtype) + pad[:, None, None, :]

    # -- stages: forward_many is enter → run_blocks → exit (step caches run the blocks in parts) -------------
    def enter(self, inputs: list[DenoiseInput], *, stack: bool = False) -> list[dict]:
        """The first stage of :meth:`forward_many`: one state per group of inputs it runs as one (with
        ``stack``, stacked along B). ``state["indices"]``: the group's inputs (positions in ``inputs``);
        ``state["rows"]``: each one's rows along B; ``state["img"]`` (B, N, dim) and ``state["txt"]`` (B, L,
        dim): the streams the blocks update. ``enter``, :meth:`run_blocks` over every block and :meth:`exit`
        compute exactly what ``forward_many`` does."""
        groups = _groups(inputs) if stack else [[k] for k in range(len(inputs))]
        states = []
        for g in groups:
            if len(g) > 1:
                inp, s = self._enter_stacked([inputs[k] for k in g])
            else:
                inp, s = inputs[g[0]], self._enter(inputs[g[0]])
            rows = [inputs[k].latents.shape[0] // inputs[k].target_frames for k in g]
            s.update(indices=list(g), rows=rows, input=inp, sizes=[inputs[k].latents.shape[0] for k in g])
            states.append(s)
        return states

    def run_blocks(self, states: list[dict], start: int = 0, stop: int | None = None) -> None:
        """Blocks ``start`` … ``stop - 1`` (default: to the last) on every state of :meth:`enter`, block by
        block as :meth:`forward_many` runs them (a streamed block moves once), each input's block hooks after
        each block. Updates ``state["img"]`` and ``state["txt"]`` in place."""
        stop = len(self.transformer_blocks) if stop is None else stop
        checkpoint = self.gradient_checkpointing and torch.is_grad_enabled()
        for i in range(start, stop):
            block = self.transformer_blocks[i]
            for s in states:
                args = (s["img"], s["txt"], s["temb"], *s["rope"], s["mask"], s["mod_index"], s["mods"][i])
                if checkpoint:
                    img, txt = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
                else:
                    img, txt = block(*args)
                for hook in s["input"].block_hooks:
                    img = hook(i, img, txt)
                s["img"], s["txt"] = img, txt

    def exit(self, states: list[dict]) -> list[torch.Tensor]:
        """The last stage: the velocity of every input given to :meth:`enter`, in that order."""
        out: dict[int, torch.Tensor] = {}
        for s in states:
            result = self._exit(s)
            parts = result.split(s["sizes"]) if len(s["indices"]) > 1 else [result]
            out.update(zip(s["indices"], parts, strict=True))
        return [out[k] for k in range(len(out))]

    def modulated_input(self, state: dict, index: int = 0) -> torch.Tensor:
        """The image stream of a state of :meth:`enter` as block ``index``'s attention takes it (its LayerNorm,
        then the shift and scale of its timestep modulation), (B, N, dim): what TeaCache compares."""
        block = self.transformer_blocks[index]
        mods = state["mods"][index]
        img_mod = block.img_mod(state["temb"]) if mods is None else mods[0]
        shift, scale = _select(img_mod, state["mod_index"])[:2]
        return torch.addcmul(shift, block.img_norm1(state["img"]), 1 + scale)


# -- stacking (batches) ------------------------------------------------------------------------------------
def layout(inp: DenoiseInput) -> tuple:
    """What inputs must share to be stacked: sizes, one timestep, modulation, image segments, text RoPE
    offsets. Text lengths, attention masks and block hooks may differ (``QwenImageDiT._enter_stacked``)."""
    segs = tuple((tuple(s.latents.shape[1:]), s.frame, s.modulation, s.rope_from_target) for s in inp.images)
    one_t = float(inp.timestep.reshape(-1)[0]) if inp.timestep.numel() == 1 else id(inp)
    size = (tuple(inp.latents.shape[1:]), inp.latents.dtype, inp.target_frames)
    return (*size, one_t, tuple(inp.extra_timesteps), segs, tuple(s.rope_offset for s in inp.text))


def _same(a: object, b: object) -> bool:
    try:
        return bool(a == b)
    except (RuntimeError, ValueError):  # tensors of several elements: only the same object is the same
        return a is b


def _groups(inputs: list[DenoiseInput]) -> list[list[int]]:
    """Indices of ``inputs`` grouped by :func:`layout` and equal ``extras``, in order of first appearance."""
    groups: list[tuple[tuple, dict, list[int]]] = []
    for k, inp in enumerate(inputs):
        key = layout(inp)
        group = next((g for g in groups if g[0] == key and _same(g[1], inp.extras)), None)
        if group is None:
            groups.append((key, inp.extras, [k]))
        else:
            group[2].append(k)
    return [g[2] for g in groups]


def _stack(inputs: list[DenoiseInput]) -> tuple[DenoiseInput, list[torch.Tensor]]:
    """The rows of ``inputs`` (one :func:`layout`) as one input, each text segment right-padded to the longest
    (mask False; real tokens keep their RoPE positions), no attention mask (see :class:`RowAttention`), block
    hooks applied per row; and each input's text token positions in the padded text."""
    first, rows = inputs[0], [x.latents.shape[0] // x.target_frames for x in inputs]
    longest = [max(x.text[j].emb.shape[1] for x in inputs) for j in range(len(first.text))]
    text = []
    for j, n in enumerate(longest):
        segs = [x.text[j] for x in inputs]
        emb = [F.pad(t.emb, (0, 0, 0, n - t.emb.shape[1])) for t in segs]
        keep = [F.pad(_keep(t, t.emb.device), (0, n - t.emb.shape[1])) for t in segs]
        text.append(TextSegment(torch.cat(emb), torch.cat(keep), segs[0].rope_offset))
    starts = [sum(longest[:j]) for j in range(len(longest))]
    positions = [
        torch.cat([a + torch.arange(t.emb.shape[1]) for a, t in zip(starts, x.text, strict=True)])
        for x in inputs
    ]
    images = [
        replace(seg, latents=torch.cat([x.images[j].latents for x in inputs]))
        for j, seg in enumerate(first.images)
    ]
    hooks = [x.block_hooks for x in inputs]
    hooks = [RowHooks(rows, hooks)] if any(hooks) else []
    stacked = replace(first, latents=torch.cat([x.latents for x in inputs]), text=text, images=images,
                      attention_mask=None, block_hooks=hooks)  # fmt: skip
    return stacked, positions


def _keep(seg: TextSegment, device: torch.device) -> torch.Tensor:
    """A text segment's keep-mask (B, L), bool: its mask, or every token."""
    if seg.mask is None:
        return torch.ones(seg.emb.shape[:2], dtype=torch.bool, device=device)
    return seg.mask.to(device=device, dtype=torch.bool)


class RowAttention:
    """The attention of a stacked batch, given in place of its mask: ``rows`` = (first row, rows, positions of
    their tokens in the joint sequence, their own mask) per stacked input. Each input's rows attend over their
    own tokens only, with the backend and mask they would have alone, so they compute exactly that (one
    padded, masked attention differs from it by float32 rounding); padding tokens get 0."""

    def __init__(self, rows: list[tuple[int, int, torch.Tensor, torch.Tensor | None]]):
        self.rows = rows

    def __call__(self, attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, S, H, D) each → (B, S, H·D)."""
        out = q.new_zeros(*q.shape[:2], q.shape[2] * q.shape[3])
        for at, r, idx, mask in self.rows:
            own = [rearrange(x[at : at + r, idx], "B S H D -> B H S D") for x in (q, k, v)]
            out[at : at + r, idx] = rearrange(attend(*own, mask), "B H S D -> B S (H D)").to(q.dtype)
        return out


class RowHooks:
    """The block hooks of a stacked input: each input's hooks on its own rows (``txt``: theirs, padded)."""

    def __init__(self, rows: list[int], hooks: list[list]):
        self.rows, self.hooks = rows, hooks

    def __call__(self, index: int, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        out, at = [], 0
        for r, hooks in zip(self.rows, self.hooks, strict=True):
            x = img[at : at + r]
            for hook in hooks:
                x = hook(index, x, txt[at : at + r])
            out.append(x)
            at += r
        return torch.cat(out)
