"""The process mesh (``cfg × sequence`` ranks) and the collectives the runner uses, all torch.distributed: NCCL on
CUDA, gloo on CPU. The sequence degree is the Ulysses or the ring degree (S = ulysses · ring, one of them 1):
ranks ``c·S … c·S + S - 1`` form the sequence group of CFG index ``c``; ranks with the same sequence index form
a CFG group."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from qi_plugins.parallel.errors import ParallelConfigError

CFG_ENV, ULYSSES_ENV, RING_ENV = "QI_PARALLEL_CFG", "QI_PARALLEL_ULYSSES", "QI_PARALLEL_RING"


@dataclass(frozen=True)
class Mesh:
    world: int
    rank: int
    cfg: int  # CFG degree: how many groups share out the guidance sides
    ulysses: int  # Ulysses degree: how many ranks share one input's tokens, exchanging heads
    cfg_group: Any = None  # this rank's CFG peers (same sequence index), None when cfg = 1
    sp_group: Any = None  # this rank's sequence group (Ulysses or ring), None when both degrees are 1
    ring: int = 1  # ring degree: how many ranks share one input's tokens, passing k/v round

    @property
    def sp(self) -> int:
        """The sequence-parallel degree: ranks that share one input's tokens."""
        return self.ulysses * self.ring

    @property
    def cfg_rank(self) -> int:
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp


def _degree(value: Any, env: str, what: str) -> int | None:
    if value is None:
        value = os.environ.get(env) or None
    return None if value is None else positive(value, what)


def positive(value: Any, what: str) -> int:
    """``value`` as a degree: a positive integer (``"2"`` from the environment too), else an error."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ParallelConfigError(f"{what} degree must be a positive integer, got {value!r}") from None
    if n < 1 or isinstance(value, bool) or (isinstance(value, float) and value != n):
        raise ParallelConfigError(f"{what} degree must be a positive integer, got {value!r}")
    return n


def mesh_degrees(cfg: Any, ulysses: Any, ring: Any, world: int) -> tuple[int, int, int]:
    """The (cfg, ulysses, ring) degrees for ``world`` processes: the given ones (else ``QI_PARALLEL_CFG`` /
    ``QI_PARALLEL_ULYSSES`` / ``QI_PARALLEL_RING``). Ring is never chosen for you (default 1); with ring > 1 a
    missing Ulysses degree is 1. Then one of cfg and ulysses missing is what the world size leaves for it; none:
    cfg 2 when an even number of ranks is left, the rest Ulysses. The product must be the world size, and
    Ulysses and ring do not combine (one of them is 1)."""
    c, u = _degree(cfg, CFG_ENV, "cfg"), _degree(ulysses, ULYSSES_ENV, "ulysses")
    r = _degree(ring, RING_ENV, "ring") or 1
    one_sequence_split(u, r)
    if r > 1 and u is None:
        u = 1
    rest = max(1, world // r)
    if c is None and u is None:
        c = 2 if rest % 2 == 0 else 1
    if c is None:
        c = max(1, rest // u)
    if u is None:
        u = max(1, rest // c)
    if c * u * r != world:
        what = " × ".join(
            [f"cfg={c}", *([f"ulysses={u}"] if r == 1 else []), *([f"ring={r}"] if r > 1 else [])]
        )
        raise ParallelConfigError(
            f"{what} needs {c * u * r} processes, but the process group has {world}; launch "
            f"`torchrun --nproc-per-node {c * u * r}` or choose degrees whose product is {world}"
        )
    return c, u, r


def one_sequence_split(ulysses: int | None, ring: int | None) -> None:
    """Refuse Ulysses and ring together (both degrees above 1)."""
    if (ulysses or 1) > 1 and (ring or 1) > 1:
        raise ParallelConfigError(
            f"ulysses={ulysses} with ring={ring}: Ulysses and ring attention do not combine; split the sequence "
            "with one of them (ring also works when the heads do not divide by the degree)"
        )


def degrees(cfg: Any, ulysses: Any, world: int) -> tuple[int, int]:
    """The (cfg, ulysses) degrees without ring attention: :func:`mesh_degrees` with ring 1."""
    c, u, _ = mesh_degrees(cfg, ulysses, 1, world)
    return c, u


def init(device: torch.device) -> tuple[int, int]:
    """(world size, rank): the process group's, starting it from torchrun's environment when it is not yet
    (NCCL for CUDA tensors, gloo otherwise); (1, 0) outside a launcher."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 1, 0
    if device.type == "cuda":  # compose each rank on its own GPU: device=f"cuda:{LOCAL_RANK}"
        if device.index is not None:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_world_size(), dist.get_rank()


def make_mesh(cfg: Any, ulysses: Any, device: torch.device, ring: Any = None) -> Mesh:
    world, rank = init(device)
    c, u, r = mesh_degrees(cfg, ulysses, ring, world)
    s = u * r  # the sequence group's size
    cfg_group = sp_group = None
    if world > 1:  # every rank creates every group, in one order
        for k in range(c):
            g = dist.new_group([k * s + j for j in range(s)])
            if k == rank // s:
                sp_group = g
        for j in range(s):
            g = dist.new_group([k * s + j for k in range(c)])
            if j == rank % s:
                cfg_group = g
    return Mesh(world, rank, c, u, cfg_group if c > 1 else None, sp_group if s > 1 else None, r)


def gather_tokens(x: torch.Tensor, sizes: list[int], group: Any) -> torch.Tensor:
    """Every rank's ``x`` (B, sizes[r], ...) joined along the token axis, in rank order. The transport pads
    each part to the longest (gloo's all_gather wants equal sizes); the padding is cut off again."""
    m = max(sizes)
    pad = x.new_zeros((x.shape[0], m, *x.shape[2:]))
    pad[:, : x.shape[1]] = x
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad, group=group)
    return torch.cat([p[:, :n] for p, n in zip(parts, sizes, strict=True)], dim=1)


def all_to_all(send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], group: Any) -> torch.Tensor:
    """1-D ``send`` cut into ``send_sizes`` (part r to rank r) → what every rank sent here, ``recv_sizes``."""
    recv = send.new_empty(sum(recv_sizes))
    dist.all_to_all_single(recv, send.contiguous(), recv_sizes, send_sizes, group=group)
    return recv


def share_predictions(mine: dict, owner: dict, shapes: dict, dtype: torch.dtype, device: torch.device,
                      mesh: Mesh) -> dict:  # fmt: skip
    """Every label's prediction on every rank of the CFG group: each rank's own, flattened in label order, one
    all_gather (padded to the largest share); shapes are known from the inputs, so nothing else is sent."""
    labels = list(owner)
    numel = {label: int(torch.Size(shapes[label]).numel()) for label in labels}
    share = [sum(numel[lb] for lb in labels if owner[lb] == c) for c in range(mesh.cfg)]
    buf = torch.zeros(max(share), dtype=dtype, device=device)
    flat = [mine[lb].reshape(-1).to(dtype) for lb in labels if owner[lb] == mesh.cfg_rank]
    if flat:
        buf[: share[mesh.cfg_rank]] = torch.cat(flat)
    parts = [torch.empty_like(buf) for _ in range(mesh.cfg)]
    dist.all_gather(parts, buf, group=mesh.cfg_group)
    out, at = {}, [0] * mesh.cfg
    for lb in labels:
        c = owner[lb]
        out[lb] = mine[lb] if c == mesh.cfg_rank else parts[c][at[c] : at[c] + numel[lb]].view(shapes[lb])
        at[c] += numel[lb]
    return out
