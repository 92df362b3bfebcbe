"""The training contract's data: what the frozen encoders make of training samples.

A :class:`Conditioning` holds the clean target latents plus everything a :class:`~qi_core.protocols.DenoiseInput`
carries except the noisy latents and the timestep. The training plugin builds it by running a sample through the
stages an inference call runs (:meth:`Pipeline.condition`), so a plugin's conditioning trains exactly as it
generates. Training tasks (:class:`~qi_core.protocols.TrainingTask`) take batches of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from qi_core.protocols import DenoiseInput, ImageSegment, TextSegment


@dataclass
class Conditioning:
    """Encoded training samples (batch B), ready for a denoiser once noisy latents and timesteps are added."""

    latents: torch.Tensor  # (B·F, C, h, w) clean target latents x0
    text: list[TextSegment]  # (B, L, D) segments, padded to the longest prompt (mask 0 on padding)
    images: list[ImageSegment] = field(default_factory=list)  # extra image tokens from injectors
    extra_timesteps: list[float] = field(default_factory=list)
    attention_mask: torch.Tensor | None = None  # additive (B, 1, S, S) or None
    block_hooks: list[Any] = field(default_factory=list)  # only for B = 1 and never cached
    extras: dict[str, Any] = field(default_factory=dict)
    target_frames: int = 1
    params: list[dict[str, Any]] = field(default_factory=list)  # per sample: JSON-able call parameters
    where: list[str] = field(default_factory=list)  # per sample: the metadata row (for error messages)

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0] // self.target_frames

    def denoise_input(self, latents: torch.Tensor, timestep: torch.Tensor) -> DenoiseInput:
        """The denoiser's input for ``latents`` (B·F, C, h, w) at ``timestep`` (B,)."""
        return DenoiseInput(
            latents=latents, timestep=timestep, text=list(self.text), images=list(self.images),
            extra_timesteps=list(self.extra_timesteps), attention_mask=self.attention_mask,
            block_hooks=list(self.block_hooks), target_frames=self.target_frames, extras=dict(self.extras),
        )  # fmt: skip

    def to(self, device: Any, dtype: torch.dtype | None = None) -> Conditioning:
        def mv(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            cast = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
            return t.to(device=device, dtype=cast)

        return Conditioning(
            latents=mv(self.latents),
            text=[TextSegment(mv(s.emb), mv(s.mask), s.rope_offset) for s in self.text],
            images=[ImageSegment(mv(s.latents), s.frame, s.modulation, s.rope_from_target) for s in self.images],
            extra_timesteps=list(self.extra_timesteps), attention_mask=mv(self.attention_mask),
            block_hooks=list(self.block_hooks), extras={k: mv(v) for k, v in self.extras.items()},
            target_frames=self.target_frames, params=list(self.params), where=list(self.where),
        )  # fmt: skip
