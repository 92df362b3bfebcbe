"""The training losses: ``sft`` (flow matching, DiffSynth-Studio's ``FlowMatchSFTLoss``) and ``direct_distill``
(DiffSynth-Studio's ``DirectDistillLoss``).

Both take a batch of :class:`~qi_core.conditioning.Conditioning` (clean latents x0 plus the denoiser's
conditioning) and one ``torch.Generator`` per sample. Flow matching: ``x_t = (1 − σ)·x0 + σ·noise``, velocity
target ``noise − x0``, loss ``mse(v, target) · w(t)`` with the schedule's training weight.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from qi_core.conditioning import Conditioning
from qi_core.errors import InvalidInputError
from qi_core.pipeline import timestep_at
from qi_plugins.sft.encoding import encode_sample


def generators_for(batch: Conditioning, generator: Any) -> list[torch.Generator]:
    """One generator per sample; a single generator is shared (drawn from sample by sample)."""
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * batch.batch_size
    if len(gens) != batch.batch_size:
        raise InvalidInputError(f"{len(gens)} generators for a batch of {batch.batch_size} samples")
    return gens


def frames(x: torch.Tensor, batch: Conditioning, i: int) -> torch.Tensor:
    f = batch.target_frames
    return x[i * f : (i + 1) * f]


class SFT:
    """Supervised flow-matching fine-tuning (``--task sft``)."""

    name = "sft"
    required_columns = ("image", "prompt")

    def __init__(self) -> None:
        self.min_boundary, self.max_boundary = 0.0, 1.0
        self._grid: tuple[Any, tuple[torch.Tensor, ...]] | None = None

    def configure(self, args: Any) -> None:
        self.min_boundary, self.max_boundary = args.min_timestep_boundary, args.max_timestep_boundary

    def encode(self, pipe: Any, sample: dict[str, Any], **kw: Any) -> Conditioning:
        return encode_sample(pipe, sample, **kw)

    def grid(self, pipe: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sigmas, timesteps, weights) of the training grid, computed once per scheduler."""
        if self._grid is None or self._grid[0] is not pipe.scheduler:
            self._grid = (pipe.scheduler, pipe.scheduler.training_schedule())  # its own grid
        return self._grid[1]

    def draw(self, pipe: Any, x0: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
        """The seed's draw order: timestep index, then the noise, from the sample's generator."""
        sigmas, timesteps, weights = self.grid(pipe)
        n = len(timesteps)
        tid = torch.randint(int(self.min_boundary * n), int(self.max_boundary * n), (1,), generator=g)
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float32).to(x0.device, x0.dtype)
        # the seed casts the timestep to the model dtype and looks sigma and weight up by the nearest timestep
        t = timesteps[tid].to(pipe.dtype)
        idx = torch.argmin((timesteps - t.float()).abs())
        return {
            "timestep_id": tid,
            "timestep": t,
            "noise": noise,
            "sigma": sigmas[idx],
            "weight": weights[idx],
        }

    def loss(self, pipe: Any, batch: Conditioning, generator: Any) -> torch.Tensor:
        x0 = batch.latents
        draws = [
            self.draw(pipe, frames(x0, batch, i), g) for i, g in enumerate(generators_for(batch, generator))
        ]
        f = batch.target_frames
        sigma = torch.stack([d["sigma"] for d in draws]).repeat_interleave(f).to(x0.device, torch.float32)
        sigma = sigma.view(-1, *([1] * (x0.ndim - 1)))
        noise = torch.cat([d["noise"] for d in draws])
        noisy = ((1 - sigma) * x0 + sigma * noise).to(x0.dtype)
        target = noise - x0
        timestep = torch.cat([d["timestep"] for d in draws]).to(x0.device)
        with pipe.using("dit") as dit:
            pred = (dit or pipe.components["dit"])(batch.denoise_input(noisy, timestep))
        losses = [
            F.mse_loss(frames(pred, batch, i).float(), frames(target, batch, i).float())
            * d["weight"].to(x0.device)
            for i, d in enumerate(draws)
        ]
        loss = torch.stack(losses).mean()
        if batch.batch_size == 1:  # golden names (DiffSynth's FlowMatchSFTLoss intermediates)
            for name, value in (("timestep_id", draws[0]["timestep_id"]), ("timestep", timestep),
                                ("noise", noise), ("noisy_latents", noisy), ("training_target", target),
                                ("noise_pred", pred), ("training_weight", draws[0]["weight"].reshape(1)),
                                ("loss", loss.reshape(1))):  # fmt: skip
                pipe.trace(name, value)
        return loss


class DirectDistill:
    """Few-step distillation (``--task direct_distill``): run the student's whole trajectory from the row's
    seeded noise, with gradients, and match the teacher's image (the row's ``image``)."""

    name = "direct_distill"
    required_columns = ("image", "prompt")
    needs = ("seed", "num_inference_steps")

    def configure(self, args: Any) -> None:
        pass

    def encode(self, pipe: Any, sample: dict[str, Any], *, extra_inputs: tuple[str, ...] = (), **kw: Any):
        missing = [k for k in self.needs if k not in extra_inputs]
        if missing:
            raise InvalidInputError(
                f"direct_distill needs the columns {', '.join(missing)} in --extra_inputs (the seed's distill "
                "metadata: image,prompt,seed,rand_device,num_inference_steps,cfg_scale)"
            )
        for k in self.needs:
            try:
                sample = {**sample, k: int(sample[k])}  # csv cells are strings
            except (KeyError, TypeError, ValueError):
                raise InvalidInputError(
                    f"{sample.get('_where', 'sample')}: {k} must be an integer, got {sample.get(k)!r}"
                ) from None
        return encode_sample(pipe, sample, extra_inputs=extra_inputs, **kw)

    def loss(self, pipe: Any, batch: Conditioning, generator: Any) -> torch.Tensor:
        p = batch.params
        steps = {int(q["num_inference_steps"]) for q in p}
        if len(steps) != 1:
            raise InvalidInputError(
                f"direct_distill: the samples {', '.join(batch.where)} ask for different num_inference_steps "
                f"{sorted(steps)}; use --batch_size 1"
            )
        n = steps.pop()
        x0 = batch.latents
        # the seed's training call: set_timesteps(n) without a resolution, i.e. μ = 0.8
        sigmas, timesteps = pipe.scheduler.schedule(n, height=p[0]["height"], width=p[0]["width"],
                                                    exponential_shift_mu=0.8)  # fmt: skip
        noise = []
        for q in p:
            g = torch.Generator(q.get("rand_device", "cpu")).manual_seed(int(q["seed"]))
            shape = (batch.target_frames, *x0.shape[1:])
            noise.append(torch.randn(shape, generator=g, device=q.get("rand_device", "cpu"), dtype=x0.dtype))
        latents = torch.cat(noise).to(x0.device)
        with pipe.using("dit") as dit:
            dit = dit or pipe.components["dit"]

            def velocity(x: torch.Tensor, i: int, sigma: torch.Tensor) -> torch.Tensor:
                t = timestep_at(pipe.scheduler, sigmas, timesteps, i, sigma).to(x0.device, x0.dtype)
                return dit(batch.denoise_input(x, t.expand(batch.batch_size)))

            # the student's trajectory through the pipeline's sampler (with gradients), down to σ = 0
            sampler = pipe.part("sampler", pipe.sampler)
            latents = sampler.sample(velocity, latents, torch.cat([sigmas, sigmas.new_zeros(1)]), state=None)
        return F.mse_loss(latents.float(), x0.float())
