"""The process mesh (``cfg × ulysses`` ranks) and the collectives the runner uses, all torch.distributed: NCCL on
CUDA, gloo on CPU. Ranks ``c·U … c·U + U - 1`` form the Ulysses (sequence) group of CFG index ``c``; ranks with
the same Ulysses index ``u`` form a CFG group."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from qi_plugins.parallel.errors import ParallelConfigError

CFG_ENV, ULYSSES_ENV = "QI_PARALLEL_CFG", "QI_PARALLEL_ULYSSES"


@dataclass(frozen=True)
class Mesh:
    world: int
    rank: int
    cfg: int  # CFG degree: how many groups share out the guidance sides
    ulysses: int  # sequence-parallel degree: how many ranks share one input's tokens
    cfg_group: Any = None  # this rank's CFG peers (same Ulysses index), None when cfg = 1
    sp_group: Any = None  # this rank's Ulysses group, None when ulysses = 1

    @property
    def cfg_rank(self) -> int:
        return self.rank // self.ulysses

    @property
    def sp_rank(self) -> int:
        return self.rank % self.ulysses


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


def degrees(cfg: Any, ulysses: Any, world: int) -> tuple[int, int]:
    """The (cfg, ulysses) degrees for ``world`` processes: the given ones (else ``QI_PARALLEL_CFG`` /
    ``QI_PARALLEL_ULYSSES``); one missing is the world size over the other; none: cfg 2 on an even world,
    the rest Ulysses. Their product must be the world size."""
    c, u = _degree(cfg, CFG_ENV, "cfg"), _degree(ulysses, ULYSSES_ENV, "ulysses")
    if c is None and u is None:
        c = 2 if world % 2 == 0 else 1
    if c is None:
        c = max(1, world // u)
    if u is None:
        u = max(1, world // c)
    if c * u != world:
        raise ParallelConfigError(
            f"cfg={c} × ulysses={u} needs {c * u} processes, but the process group has {world}; launch "
            f"`torchrun --nproc-per-node {c * u}` or choose degrees whose product is {world}"
        )
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


def make_mesh(cfg: Any, ulysses: Any, device: torch.device) -> Mesh:
    world, rank = init(device)
    c, u = degrees(cfg, ulysses, world)
    cfg_group = sp_group = None
    if world > 1:  # every rank creates every group, in one order
        for k in range(c):
            g = dist.new_group([k * u + j for j in range(u)])
            if k == rank // u:
                sp_group = g
        for j in range(u):
            g = dist.new_group([k * u + j for k in range(c)])
            if j == rank % u:
                cfg_group = g
    return Mesh(world, rank, c, u, cfg_group if c > 1 else None, sp_group if u > 1 else None)


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
