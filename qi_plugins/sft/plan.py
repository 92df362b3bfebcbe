"""The order of an epoch: optimizer steps → micro-batches → samples, the same on every process.

A *global micro-batch* holds ``batch_size × processes`` samples of one bucket (same training size); process
``r`` takes slice ``r``. Every sample carries its *position* in the epoch, and its timestep and noise are drawn
from a generator seeded by ``(seed, epoch, position)`` — not from a process's RNG — so a 2-process run and a
1-process run with twice the batch draw the same noise for the same samples, and a resumed run continues
exactly where the killed one stopped (the plan is a pure function of the seed and the epoch).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

Sample = tuple[int, int]  # (dataset index, position in the epoch)
MicroBatch = list[Sample]  # one global micro-batch (all processes)
Step = list[MicroBatch]  # the micro-batches of one optimizer step


@dataclass(frozen=True)
class PlanSpec:
    """How samples are grouped."""

    batch_size: int = 1  # samples per micro-batch per process
    processes: int = 1  # data-parallel processes
    accumulation: int = 1  # micro-batches per optimizer step
    seed: int = 0  # data order seed
    shuffle: bool = True  # shuffle each epoch

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.processes


def mix(*parts: int | str) -> int:
    """A 63-bit seed from several integers, stable across processes and Python versions."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_seed(seed: int, epoch: int, position: int) -> int:
    return mix("sample", seed, epoch, position)


def epoch_plan(buckets: Sequence[tuple], spec: PlanSpec, epoch: int) -> list[Step]:
    """Every optimizer step of ``epoch``. ``buckets[i]`` is sample i's size signature."""
    order = list(range(len(buckets)))
    if spec.shuffle:
        random.Random(mix("order", spec.seed, epoch)).shuffle(order)
    groups: dict[tuple, list[int]] = {}
    for i in order:  # insertion order = first appearance in the shuffled order
        groups.setdefault(buckets[i], []).append(i)
    gb = spec.global_batch
    chunks: list[list[int]] = []
    for idxs in groups.values():
        for s in range(0, len(idxs), gb):
            chunk = idxs[s : s + gb]
            if len(chunk) < gb and spec.processes > 1:
                # every process must run the same number of micro-batches: fill from the same bucket
                chunk = chunk + [idxs[k % len(idxs)] for k in range(gb - len(chunk))]
            chunks.append(chunk)
    rank = {i: r for r, i in enumerate(order)}
    chunks.sort(key=lambda c: rank[c[0]])
    micro = [[(i, k * gb + j) for j, i in enumerate(chunk)] for k, chunk in enumerate(chunks)]
    return [micro[s : s + spec.accumulation] for s in range(0, len(micro), spec.accumulation)]


def local(micro: MicroBatch, spec: PlanSpec, process: int) -> MicroBatch:
    """This process's slice of a global micro-batch (all of it for one process)."""
    if spec.processes == 1:
        return micro
    b = spec.batch_size
    return micro[process * b : (process + 1) * b]


class PlanSampler:
    """``batch_sampler`` for a DataLoader: this process's dataset indices, micro-batch by micro-batch, from
    optimizer step ``start`` of the plan."""

    def __init__(self, steps: list[Step], spec: PlanSpec, process: int, start: int = 0):
        self.batches = [[i for i, _ in local(m, spec, process)] for step in steps[start:] for m in step]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
