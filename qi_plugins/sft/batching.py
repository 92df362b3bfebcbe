"""Batching encoded samples: same-size :class:`~qi_core.conditioning.Conditioning` samples become one batch,
prompts of different lengths padded (mask 0)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from qi_core.conditioning import Conditioning
from qi_core.errors import InvalidInputError
from qi_core.protocols import ImageSegment, TextSegment


def collate(items: list[Conditioning]) -> Conditioning:
    """One batch from same-size samples; prompts of different lengths are padded (mask 0)."""
    if len(items) == 1:
        return items[0]
    where = [w for c in items for w in c.where]
    first = items[0]

    def fail(what: str) -> InvalidInputError:
        return InvalidInputError(
            f"samples {', '.join(where)} cannot share a batch: {what}; use --batch_size 1 or make them agree"
        )

    shapes = {tuple(c.latents.shape[1:]) for c in items}
    if len(shapes) > 1:
        raise fail(f"target latents differ in shape {sorted(shapes)}")
    if any(c.block_hooks for c in items):
        raise fail("an injector adds per-sample block hooks")
    for attr in ("target_frames", "extra_timesteps"):
        if any(getattr(c, attr) != getattr(first, attr) for c in items):
            raise fail(f"{attr} differ")
    if any(len(c.text) != len(first.text) or len(c.images) != len(first.images) for c in items):
        raise fail("they have different numbers of text or image segments")
    text = []
    for i in range(len(first.text)):
        segs = [c.text[i] for c in items]
        if any(s.rope_offset != segs[0].rope_offset for s in segs):
            raise fail(f"text segment {i} starts at different RoPE offsets")
        n = max(s.emb.shape[1] for s in segs)
        embs, masks = [], []
        for s in segs:
            pad = n - s.emb.shape[1]
            mask = s.mask if s.mask is not None else torch.ones(s.emb.shape[:2], dtype=torch.long)
            embs.append(F.pad(s.emb, (0, 0, 0, pad)))
            masks.append(F.pad(mask.to(s.emb.device), (0, pad)))
        text.append(TextSegment(torch.cat(embs), torch.cat(masks), segs[0].rope_offset))
    images = []
    for j in range(len(first.images)):
        segs = [c.images[j] for c in items]
        if len({tuple(s.latents.shape[1:]) for s in segs}) > 1:
            raise fail(f"image segment {j} differs in size")
        if any((s.frame, s.modulation, s.rope_from_target) != (segs[0].frame, segs[0].modulation,
                                                               segs[0].rope_from_target) for s in segs):  # fmt: skip
            raise fail(f"image segment {j} has different RoPE frames or modulation")
        images.append(ImageSegment(torch.cat([s.latents for s in segs]), segs[0].frame, segs[0].modulation,
                                   segs[0].rope_from_target))  # fmt: skip
    masks = [c.attention_mask for c in items]
    if any(m is not None for m in masks):
        if any(m is None for m in masks) or len({tuple(m.shape) for m in masks}) > 1:
            raise fail("their attention masks differ in shape (prompts of different lengths)")
        attention = torch.cat(masks)
    else:
        attention = None
    extras: dict[str, Any] = {}
    for k, v in first.extras.items():
        vals = [c.extras.get(k) for c in items]
        if isinstance(v, torch.Tensor):
            extras[k] = torch.cat(vals)
        elif any(x != v for x in vals):
            raise fail(f"extra input {k!r} differs")
        else:
            extras[k] = v
    return Conditioning(
        latents=torch.cat([c.latents for c in items]), text=text, images=images,
        extra_timesteps=list(first.extra_timesteps), attention_mask=attention, extras=extras,
        target_frames=first.target_frames, params=[p for c in items for p in c.params], where=where,
    )  # fmt: skip
