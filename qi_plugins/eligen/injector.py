"""The ``eligen`` injector: regional prompts through extra text segments and a joint attention mask.

Sequence seen by the denoiser: ``[entity 1 | … | entity n | global prompt | target tokens | extra images]``.
Every text segment starts at the same RoPE offset (the DiT's default, ``TextSegment.rope_offset=None``).
Additive mask (0 / -inf), DiffSynth-Studio's ``process_entity_masks``:

* entity text k ↔ image token: allowed iff the token's 2x2 latent patch touches mask k;
* global text ↔ every image token;
* text blocks never see other text blocks; image ↔ image is unrestricted.

Everything reaches the denoiser through ``DenoiseInput.text`` and ``DenoiseInput.attention_mask``; the DiT adds
-inf for padded text keys on top (``QwenImageDiT.joint_mask``). The mask covers the image segments present when
this injector runs, so it must come after injectors that append images (recipes list it last).

Axes: n entities · (h, w) latent size · (P, Q) = 2x2 patch · N image tokens · S joint sequence length.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from qi_core.errors import InvalidInputError
from qi_core.images import image_to_tensor, load_image
from qi_core.params import CallParams, ImageList, param
from qi_core.protocols import Injector, TextSegment

ENTITY_MAX_TOKENS = (
    1024  # DiffSynth tokenises entity prompts with max_length 1024 + 34 (the global prompt: 4096)
)


class EliGen(Injector):
    name = "eligen"

    class Params(CallParams):
        eligen_entity_prompts: list[str] | None = param(
            None, "a list of strings: one prompt per region (entity)"
        )
        eligen_entity_masks: ImageList = param(None, "one mask per entity prompt, white = its region; the output's "
                                            "aspect ratio", kind="masks")  # fmt: skip
        eligen_enable_on_negative: bool = param(False, "also apply the regions on the negative side")

    def validate(self, pipe, state) -> None:
        p = state.params
        prompts, masks = p["eligen_entity_prompts"], p["eligen_entity_masks"]
        if not isinstance(p["eligen_enable_on_negative"], bool):
            raise InvalidInputError(
                f"eligen_enable_on_negative must be True or False, got {p['eligen_enable_on_negative']!r}"
            )
        if _empty(prompts) and _empty(masks):
            return
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise InvalidInputError(
                f"eligen_entity_prompts must be a non-empty list of strings (one per region), got {prompts!r}"
            )
        bad = [k for k, s in enumerate(prompts) if not isinstance(s, str)]
        if bad:
            raise InvalidInputError(
                f"eligen_entity_prompts[{bad[0]}] must be a string, got {prompts[bad[0]]!r}"
            )
        if masks is None or isinstance(masks, (str, Image.Image)) or not isinstance(masks, (list, tuple)):
            raise InvalidInputError(
                f"eligen_entity_masks must be a list with one mask image per entity prompt "
                f"({len(prompts)} here), got {type(masks).__name__}"
            )
        if len(masks) != len(prompts):
            raise InvalidInputError(
                f"got {len(prompts)} eligen_entity_prompts but {len(masks)} eligen_entity_masks; "
                "pass exactly one mask (white = the entity's region) per entity prompt"
            )
        W, H = p["width"], p["height"]
        images = []
        for k, m in enumerate(masks):
            image = load_image(m, f"eligen_entity_masks[{k}]")
            mw, mh = image.size
            if mw * H != mh * W:
                raise InvalidInputError(
                    f"eligen_entity_masks[{k}] is {mw}x{mh} (WxH) but the output is {W}x{H}; a mask must have the "
                    f"output's aspect ratio (best: exactly {W}x{H}), e.g. mask.resize(({W}, {H}), Image.NEAREST)"
                )
            images.append(image)
        state.data[self.name] = {"prompts": list(prompts), "masks": images, "attention": {}}

    def prepare(self, pipe, state) -> None:
        d = state.data.get(self.name)
        if d is None:
            return
        f = pipe.components["vae"].scale_factor
        h, w = state.params["height"] // f, state.params["width"] // f
        masks = torch.stack([latent_mask(m, h, w, state.dtype) for m in d["masks"]], dim=1)  # (1, n, 1, h, w)
        d["entity_masks"] = masks.to(state.device)
        pipe.trace("entity_masks", d["entity_masks"])
        with pipe.using("text_encoder") as te:
            segments = [te.encode_prompt(s, max_tokens=ENTITY_MAX_TOKENS) for s in d["prompts"]]
        for k, seg in enumerate(segments):
            seg.emb = seg.emb.to(state.device, state.dtype)
            pipe.trace(f"entity_prompt_emb_{k}", seg.emb)
            if seg.mask is not None:
                pipe.trace(f"entity_prompt_emb_mask_{k}", seg.mask)
        d["segments"] = segments

    def denoise_input(self, pipe, state, side, step, inp) -> None:
        d = state.data.get(self.name)
        if d is None:
            return
        if side == "negative":
            if not state.params["eligen_enable_on_negative"]:
                return
            # DiffSynth: every entity prompt is replaced by the negative prompt, with the same masks
            neg = inp.text[-1]
            entities = [TextSegment(emb=neg.emb, mask=neg.mask) for _ in d["segments"]]
        else:
            entities = list(d["segments"])
        if inp.attention_mask is not None:
            raise InvalidInputError(
                "EliGen builds the joint attention mask itself and cannot be combined with another injector "
                "that sets DenoiseInput.attention_mask"
            )
        p = int(pipe.size_multiple // pipe.components["vae"].scale_factor)
        grids = [(inp.target_frames, inp.latents.shape[-2] // p, inp.latents.shape[-1] // p)]
        grids += [(1, s.latents.shape[-2] // p, s.latents.shape[-1] // p) for s in inp.images]
        lens = [s.emb.shape[1] for s in entities]
        key = (side, tuple(lens), sum(x.emb.shape[1] for x in inp.text), tuple(grids))
        if key not in d["attention"]:
            region = image_regions(d["entity_masks"][0, :, 0], grids, p)
            d["attention"][key] = attention_mask(lens, key[2], region, inp.latents.dtype)
        B = inp.latents.shape[0] // inp.target_frames
        inp.text = [*entities, *inp.text]
        inp.attention_mask = d["attention"][key].expand(B, -1, -1, -1)


def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, (list, tuple)) and len(v) == 0)


def latent_mask(mask: Image.Image, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    """NEAREST resize to the latent grid, [-1, 1], mean over RGB > 0 (pixel mean > 127.5) → (1, 1, h, w)."""
    x = image_to_tensor(mask.convert("RGB").resize((w, h), resample=Image.NEAREST), dtype)
    return (x.mean(dim=1, keepdim=True) > 0).to(dtype)


def image_regions(masks: torch.Tensor, grids: list[tuple[int, int, int]], p: int = 2) -> torch.Tensor:
    """Which image tokens each entity sees: latent masks (n, h, w) → (n, N) bool over every image segment.

    A target token sees entity k when any pixel of its p x p latent patch is inside mask k; target frames repeat
    the pattern. An extra image segment on the target's grid repeats it too (DiffSynth tiles the mask over
    appended images); one on another grid gets the patch mask resized (nearest) to its grid."""
    patch = rearrange(masks > 0, "n (h P) (w Q) -> n h w (P Q)", P=p, Q=p).any(dim=-1)  # (n, h/p, w/p)
    frames, gh, gw = grids[0]
    parts = [patch.flatten(1).repeat(1, frames)]
    for _, h2, w2 in grids[1:]:
        if (h2, w2) == (gh, gw):
            parts.append(patch.flatten(1))
        else:
            resized = F.interpolate(patch[:, None].float(), size=(h2, w2), mode="nearest")[:, 0] > 0.5
            parts.append(resized.flatten(1))
    return torch.cat(parts, dim=1)


def attention_mask(
    entity_lens: list[int], global_len: int, region: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Additive joint mask (1, 1, S, S) over [entity texts…, global text, image tokens] (S = Σ lens + N)."""
    n_img = region.shape[1]
    lens = [*entity_lens, global_len]
    starts = [sum(lens[:i]) for i in range(len(lens) + 1)]
    L = starts[-1]
    allowed = torch.ones(L + n_img, L + n_img, dtype=torch.bool, device=region.device)
    allowed[:L, :L] = False  # text blocks see only themselves …
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        allowed[a:b, a:b] = True
    for k, (a, b) in enumerate(zip(starts[:-2], starts[1:-1], strict=True)):  # … and entity k only its region
        allowed[a:b, L:] = region[k][None]
        allowed[L:, a:b] = region[k][:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=region.device).masked_fill(~allowed, float("-inf"))
    return mask[None, None]
