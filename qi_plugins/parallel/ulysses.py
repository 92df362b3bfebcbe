"""Ulysses sequence parallelism over the joint sequence, exact for uneven lengths.

Each rank of a Ulysses group of P ranks keeps a contiguous part of the text stream and of the image stream
(target, then appended image tokens), each stream cut on its own into parts whose sizes differ by at most one
(a stream too short to give every rank ``MIN_PART`` tokens goes to fewer ranks, the others hold none of it): so the per-stream operations (norms, modulation, MLPs, RoPE, the per-token modulation index of edit's
zero-t tokens) run unchanged on the part. Around attention, q/k/v (after RoPE) go to the rank owning their
heads with one ``all_to_all_single`` of uneven splits: every rank then holds H/P heads of every token, in
rank-major order ``[txt_0, img_0, txt_1, img_1, …]``, which one index puts back into the joint order
``[txt…, img…]``; attention runs with the registered backend and the full mask (text padding, EliGen's
regions) exactly as on one process, and the result goes back with the inverse exchange. No token is padded.
Block hooks (ControlNet residuals) see the whole streams: they are gathered before the hooks and each rank
keeps its part of the result. The image stream is gathered once, before the output layers.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from qi_core.protocols import DenoiseInput
from qi_plugins.parallel.comm import all_to_all, gather_tokens
from qi_plugins.parallel.errors import ParallelConfigError

#: The fewest tokens of a stream a rank computes, unless it computes none. A BLAS may multiply a matrix of
#: fewer than 4 rows with other kernels than the same rows inside a larger one (MKL does), so such a part would
#: not sum like one process; and a part that small costs more to exchange than it saves.
MIN_PART = 4


def balanced(n: int, parts: int, minimum: int = 1) -> list[int]:
    """``n`` tokens cut into ``parts`` contiguous runs whose sizes differ by at most one (the first ``n % k``
    one longer), over as many ranks ``k`` as can each take ``minimum``; the other ranks get none."""
    k = max(1, min(parts, n // max(1, minimum)))
    return [n // k + (r < n % k) if r < k else 0 for r in range(parts)]


class UlyssesSplit:
    """The split a denoiser's ``sequence_split`` takes: ``part(inp, n_txt, n_img, mask)`` for each input it
    enters. ``wrap(inp)`` is the input with its block hooks run on the gathered streams."""

    def __init__(self, group: Any, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size

    def wrap(self, inp: DenoiseInput) -> DenoiseInput:
        return replace(inp, block_hooks=[WholeStreamHooks(inp.block_hooks)]) if inp.block_hooks else inp

    def part(self, inp: DenoiseInput, n_txt: int, n_img: int, mask: Any) -> Part:
        if callable(mask):
            raise ParallelConfigError(
                "a sequence split runs each input on its own; its mask must be a tensor or None"
            )
        cut = lambda n: balanced(n, self.size, MIN_PART)  # noqa: E731
        part = self.new_part(cut(n_txt), cut(n_img), mask)
        for hook in inp.block_hooks:
            if isinstance(hook, WholeStreamHooks):
                hook.part = part
        return part

    def new_part(self, txt_sizes: list[int], img_sizes: list[int], mask: Any) -> Part:
        """This rank's part of an input, the streams cut into ``txt_sizes`` and ``img_sizes``."""
        return Part(self, txt_sizes, img_sizes, mask)


class Part:
    """One rank's part of one input's joint sequence: ``text`` and ``image`` slices, ``attention`` (given to
    the blocks in place of the mask) and ``gather_image``."""

    def __init__(self, split: UlyssesSplit, txt_sizes: list[int], img_sizes: list[int], mask: Any):
        self.split, self.txt_sizes, self.img_sizes, self.mask = split, txt_sizes, img_sizes, mask
        r = split.rank
        self.text = slice(sum(txt_sizes[:r]), sum(txt_sizes[: r + 1]))
        self.image = slice(sum(img_sizes[:r]), sum(img_sizes[: r + 1]))
        self.lengths = [t + i for t, i in zip(txt_sizes, img_sizes, strict=True)]  # tokens per rank
        starts = [sum(self.lengths[:j]) for j in range(split.size)]
        rng = range(split.size)
        txt = [torch.arange(starts[j], starts[j] + txt_sizes[j]) for j in rng]
        img = [torch.arange(starts[j] + txt_sizes[j], starts[j] + self.lengths[j]) for j in rng]
        self.order = torch.cat(txt + img)  # joint position → position in the rank-major layout
        self.inverse = torch.argsort(self.order)

    def attention(self, attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``attend`` over the whole joint sequence for this rank's tokens: (B, S_r, H, D) each → (B, S_r, H·D)."""
        P, group = self.split.size, self.split.group
        B, S_r, H, D = q.shape
        if H % P:
            raise ParallelConfigError(
                f"ulysses={P} must divide the attention heads ({H}); choose a Ulysses degree that divides {H}, "
                f"or ring attention (ring={P})"
            )
        Hp, dev = H // P, q.device
        # q/k/v, head group j to rank j: (P, 3, B, S_r, Hp, D)
        send = torch.stack([q, k, v]).unflatten(3, (P, Hp)).permute(3, 0, 1, 2, 4, 5).reshape(-1)
        unit = 3 * B * Hp * D
        sizes = [unit * n for n in self.lengths]  # what each rank sends here: its tokens, this rank's heads
        recv = all_to_all(send, [unit * S_r] * P, sizes, group)
        parts = [x.view(3, B, n, Hp, D) for x, n in zip(recv.split(sizes), self.lengths, strict=True)]
        if self.order.device != dev:  # the index tensors on the device, once per part
            self.order, self.inverse = self.order.to(dev), self.inverse.to(dev)
        qkv = torch.cat(parts, dim=2)[:, :, self.order].transpose(2, 3)  # (3, B, Hp, S, D), joint order
        mask = self.mask
        if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[1] == H:
            mask = mask[:, self.split.rank * Hp : (self.split.rank + 1) * Hp]
        out = attend(qkv[0], qkv[1], qkv[2], mask)  # (B, Hp, S, D)
        out = out[:, :, self.inverse].transpose(1, 2)  # (B, S, Hp, D), rank-major
        unit = B * Hp * D
        send = torch.cat([x.reshape(-1) for x in out.split(self.lengths, dim=1)])
        back = all_to_all(send, [unit * n for n in self.lengths], [unit * S_r] * P, group)
        return back.view(P, B, S_r, Hp, D).permute(1, 2, 0, 3, 4).reshape(B, S_r, H * D).to(q.dtype)

    def gather_image(self, img: torch.Tensor) -> torch.Tensor:
        return gather_tokens(img, self.img_sizes, self.split.group)

    def gather_text(self, txt: torch.Tensor) -> torch.Tensor:
        return gather_tokens(txt, self.txt_sizes, self.split.group)


class WholeStreamHooks:
    """An input's block hooks, run on the whole image and text streams (gathered); each rank keeps its part of
    the result, so a hook computes what it does on one process (ControlNet residuals on the target tokens)."""

    def __init__(self, hooks: list):
        self.hooks, self.part = list(hooks), None

    def __call__(self, index: int, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        part = self.part
        img, txt = part.gather_image(img), part.gather_text(txt)
        for hook in self.hooks:
            img = hook(index, img, txt)
        return img[:, part.image]
