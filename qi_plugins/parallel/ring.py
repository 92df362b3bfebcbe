"""Ring attention: sequence parallelism over the joint sequence that keeps every head on every rank, exact for
uneven lengths.

The split is Ulysses' (:mod:`qi_plugins.parallel.ulysses`): each of the P ranks of a ring keeps a contiguous part
of the text stream and of the image stream (sizes differing by at most one), runs the per-token work on it, has
block hooks see the gathered streams, and gathers the image stream before the output layers. Only attention
differs: each rank keeps the queries of its own tokens, all heads, and the keys and values travel round the ring.
At step s a rank attends its queries to the k/v block of rank ``r - s`` while it passes that block on to rank
``r + 1`` and receives the next one from rank ``r - 1`` (``batch_isend_irecv``, uneven block sizes: every rank
knows every part's length), so after P steps its queries have met every key. Each step gives the block's
attention output and its log-sum-exp; the running output is merged with it by log-sum-exp weights, in float32
(float64 for float64 inputs), which is the softmax over the whole sequence up to rounding. Nothing is padded.

The mask (text padding, EliGen's regions: a boolean keep-mask or an additive float mask broadcast to
(B, H, S, S) over the joint order ``[text…, image…]``) is cut once per input: this rank's query rows, and for
each block the columns of the tokens it carries.

Memory and traffic: a rank holds its own k/v and one block in flight (2 · B · S/P · H · D each), and the scores of
one block at a time (B · H · S/P · S/P in float32); every step sends one k/v block to the next rank, P − 1 steps
per attention. The softmax is computed here (the merge needs each block's log-sum-exp, which an attention
backend does not return), so the registered attention backend is not used under ring attention.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from qi_plugins.parallel.ulysses import Part, UlyssesSplit

Block = tuple[int, torch.Tensor, torch.Tensor]  # (owner rank, k, v), k and v (B, S_j, H, D)


class RingSplit(UlyssesSplit):
    """The split a denoiser's ``sequence_split`` takes, with ring attention in place of Ulysses' exchange."""

    def __init__(self, group: Any, rank: int, size: int):
        super().__init__(group, rank, size)
        self.next = self.prev = rank
        if group is not None:  # global ranks of the neighbours, for point-to-point operations
            self.next = dist.get_global_rank(group, (rank + 1) % size)
            self.prev = dist.get_global_rank(group, (rank - 1) % size)

    def new_part(self, txt_sizes: list[int], img_sizes: list[int], mask: Any) -> RingPart:
        return RingPart(self, txt_sizes, img_sizes, mask)


class RingPart(Part):
    """One rank's part of one input's joint sequence, attending by ring (see the module)."""

    def __init__(self, split: Any, txt_sizes: list[int], img_sizes: list[int], mask: Any):
        super().__init__(split, txt_sizes, img_sizes, mask)
        n_txt, at_t, at_i = sum(txt_sizes), 0, 0
        self.positions = []  # joint positions of each rank's tokens, [its text…, its image…]
        for t, i in zip(txt_sizes, img_sizes, strict=True):
            self.positions.append(
                torch.cat([torch.arange(at_t, at_t + t), n_txt + torch.arange(at_i, at_i + i)])
            )
            at_t, at_i = at_t + t, at_i + i
        self._bias: dict[int, torch.Tensor] = {}  # bias(j), cut once per part

    def attention(self, attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """This rank's queries over the whole joint sequence, ``attend`` unused (see the module): (B, S_r, H, D)
        each → (B, S_r, H·D)."""
        return self.merge(q, self.blocks(k, v))

    def blocks(self, k: torch.Tensor, v: torch.Tensor) -> Iterator[Block]:
        """Every rank's k/v block, this rank's first: each one is passed on to the next rank while the caller
        attends to it; the next arrives from the previous rank."""
        split = self.split
        P, r, B, _, H, D = split.size, split.rank, *k.shape
        kv, owner = torch.stack([k, v]), r
        for step in range(P):
            ops = []  # an empty block (fewer tokens than ranks) is not sent: both ends know its length
            if step < P - 1:
                src = (r - step - 1) % P  # whose block arrives next
                incoming = kv.new_empty((2, B, self.lengths[src], H, D))
                if kv.shape[2]:
                    ops.append(dist.P2POp(dist.isend, kv, split.next, split.group))
                if incoming.shape[2]:
                    ops.append(dist.P2POp(dist.irecv, incoming, split.prev, split.group))
            pending = dist.batch_isend_irecv(ops) if ops else []
            yield owner, kv[0], kv[1]
            for work in pending:
                work.wait()
            if step < P - 1:
                kv, owner = incoming, src

    def merge(self, q: torch.Tensor, blocks: Iterable[Block]) -> torch.Tensor:
        """Softmax attention of ``q`` (B, S_r, H, D) over the k/v ``blocks`` (any order, together the whole joint
        sequence), merged by log-sum-exp: (B, S_r, H·D) in ``q``'s dtype."""
        B, S_r, H, D = q.shape
        work = torch.promote_types(q.dtype, torch.float32)
        qt = q.transpose(1, 2).to(work)  # (B, H, S_r, D)
        out = lse = None
        for j, k, v in blocks:
            if not k.shape[1]:
                continue
            o_j, lse_j = block_attention(qt, k.transpose(1, 2).to(work), v.transpose(1, 2).to(work),
                                         self.bias(j, work, q.device))  # fmt: skip
            out, lse = (o_j, lse_j) if out is None else merge_lse(out, lse, o_j, lse_j)
        return out.transpose(1, 2).reshape(B, S_r, H * D).to(q.dtype)

    def bias(self, j: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """The additive mask of this rank's queries against rank ``j``'s tokens (None: no mask), cut once."""
        if self.mask is None:
            return None
        if j not in self._bias:
            m = self.mask
            m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)).to(device)
            if m.shape[-2] > 1:  # one row per query: this rank's
                m = m.index_select(-2, self.positions[self.split.rank].to(device))
            if m.shape[-1] > 1:
                m = m.index_select(-1, self.positions[j].to(device))
            if m.dtype == torch.bool:  # a keep-mask
                m = torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(~m, float("-inf"))
            self._bias[j] = m.to(dtype)
        return self._bias[j]


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Softmax attention of ``q`` (B, H, S_q, D) over one block ``k``/``v`` (B, H, S_k, D), scaled by
    1/sqrt(D) as SDPA: (output, log-sum-exp (B, H, S_q, 1)). A query that may attend to nothing in the block
    gets output 0 and log-sum-exp −inf."""
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if bias is not None:
        s = s + bias
    m = s.amax(dim=-1, keepdim=True)
    m = m.masked_fill(m == float("-inf"), 0.0)
    p = torch.exp(s - m)
    total = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, v) / total.masked_fill(total == 0, 1.0)
    return out, m + torch.log(total)


def merge_lse(out: torch.Tensor, lse: torch.Tensor, out_j: torch.Tensor, lse_j: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Two softmax attentions of the same queries over disjoint key sets, as one over their union."""
    both = torch.logaddexp(lse, lse_j)
    at = both.masked_fill(both == float("-inf"), 0.0)  # nothing to attend to in either: output 0
    return out * torch.exp(lse - at) + out_j * torch.exp(lse_j - at), both
