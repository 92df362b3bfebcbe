"""Attention backends: ``attend(q, k, v, mask) -> out`` over (B, H, S, D) tensors, ``mask`` a boolean keep-mask
or an additive float mask broadcastable to (B, H, S, S), or None."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """torch's fused scaled-dot-product attention (flash / memory-efficient / math, chosen by torch)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
