"""Step caches: step runners that reuse the residual of the denoiser's blocks from the last step they computed
when an early signal of the step barely changed (see ``docs/cache.md``).

* :class:`FirstBlockCache` (FBCache, ParaAttention's "first block cache"): block 0 always runs; its output
  residual (output − input of block 0) is compared with the one of the last computed step (relative L1). Below
  ``threshold``, blocks 1…N−1 are skipped and their residual from the last computed step (image stream after
  the last block − after block 0) is added instead.
* :class:`TeaCache`: block 0's timestep-modulated input is compared with the previous evaluation's (relative
  L1, optionally rescaled by a polynomial); the distances accumulate over skipped steps, and while the sum stays
  below ``threshold`` every block is skipped and their residual from the last computed step is added.

Both need a denoiser with three stages, ``enter(inputs, *, stack) -> states``, ``run_blocks(states, start,
stop)`` and ``exit(states) -> predictions`` (TeaCache also ``modulated_input(state, index)``); the Qwen-Image
DiT has them. Any other denoiser runs as the default ``batched`` runner runs it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from qi_core.errors import InvalidInputError
from qi_core.protocols import DenoiseInput

STAGES = ("enter", "run_blocks", "exit")
FEW_STEPS = 8  # schedules of this many steps or fewer run uncached unless forced


class CacheWarning(UserWarning):
    """A step cache was asked for where it does not help (and did nothing)."""


HOOK_MODES = ("cache", "compute")


def has_stages(denoiser: Any, extra: Sequence[str] = ()) -> bool:
    """Whether ``denoiser`` offers the stages a step cache drives."""
    return all(callable(getattr(denoiser, m, None)) for m in (*STAGES, *extra))


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """``mean|current − previous| / mean|previous|`` in float32 (inf when ``previous`` is all zeros)."""
    cur, prev = current.float(), previous.float()
    scale = float(prev.abs().mean())
    return float((cur - prev).abs().mean()) / scale if scale > 0 else math.inf


@dataclass
class Entry:
    """What a step cache keeps for one input label during one call."""

    signal: torch.Tensor | None = None  # the signal it compares against
    residual: torch.Tensor | None = None  # the reused residual: this label's rows of the image stream
    accumulated: float = 0.0  # TeaCache: distances summed since the last computed step
    in_a_row: int = 0  # skips in a row


@dataclass
class CacheLog:
    """One call's cache: an :class:`Entry` per label and every decision, ``(step, label, skipped, distance)``."""

    entries: dict[Hashable, Entry] = field(default_factory=dict)
    off: bool = False  # too few steps: this call runs uncached
    events: list[tuple[int, Hashable, bool, float]] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        """Evaluations (label × step) that reused the cache."""
        return sum(1 for e in self.events if e[2])

    @property
    def computed(self) -> int:
        """Evaluations that ran every block."""
        return sum(1 for e in self.events if not e[2])

    def skipped_steps(self, label: Hashable) -> list[int]:
        return [step for step, lab, skipped, _ in self.events if lab == label and skipped]

    def summary(self) -> str:
        labels = list(dict.fromkeys(e[1] for e in self.events))
        per = ", ".join(f"{lab}: {len(self.skipped_steps(lab))}" for lab in labels)
        return f"{self.skipped} of {len(self.events)} evaluations reused the cache ({per})"


class _StepCache:
    """The machinery both caches share: per label, decide from a signal whether to compute blocks
    ``start`` … N−1 or to add their residual from the last computed step."""

    name = ""
    start = 0  # the first block whose residual is reused (blocks before it always run)
    extra_stages: tuple[str, ...] = ()

    def __init__(self, threshold: float, *, warmup: int = 2, tail: int = 1, max_skips: int | None = 3,
                 hooks: str = "cache", batch: bool = True, force: bool = False):  # fmt: skip
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
            raise InvalidInputError(f"{self.name}: threshold must be a finite number >= 0, got {threshold!r}")
        if not math.isfinite(threshold):
            raise InvalidInputError(f"{self.name}: threshold must be a finite number >= 0, got {threshold!r}")
        for what, v in (("warmup", warmup), ("tail", tail)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidInputError(f"{self.name}: {what} must be an integer >= 0, got {v!r}")
        if max_skips is not None and (isinstance(max_skips, bool) or not isinstance(max_skips, int)
                                      or max_skips < 0):  # fmt: skip
            raise InvalidInputError(
                f"{self.name}: max_skips must be None or an integer >= 0, got {max_skips!r}"
            )
        if hooks not in HOOK_MODES:
            raise InvalidInputError(f"{self.name}: hooks must be one of {HOOK_MODES}, got {hooks!r}")
        self.threshold = float(threshold)
        self.warmup, self.tail, self.max_skips, self.hooks = warmup, tail, max_skips, hooks
        self.batch, self.force = batch, force
        self.last: CacheLog | None = None  # the latest call's cache (skip counts, decisions)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(threshold={self.threshold}, warmup={self.warmup}, tail={self.tail}, "
                f"max_skips={self.max_skips}, hooks={self.hooks!r})")  # fmt: skip

    # -- what a cache compares --------------------------------------------------------------------------
    def probe(self, denoiser: Any, states: list[dict]) -> list[torch.Tensor]:
        """Run the blocks before :attr:`start` and return each state's signal (B, …)."""
        raise NotImplementedError

    def distance(self, entry: Entry, signal: torch.Tensor) -> float:
        """How far ``signal`` is from what the entry remembers (compared with the threshold)."""
        raise NotImplementedError

    def remember(self, entry: Entry, signal: torch.Tensor, distance: float, skipped: bool) -> None:
        raise NotImplementedError

    # -- the step runner --------------------------------------------------------------------------------
    def run(self, denoiser: Any, inputs: Mapping[Hashable, DenoiseInput], *, state: Any, step: int,
            sigma: torch.Tensor) -> dict[Hashable, torch.Tensor]:  # fmt: skip
        if state is None or not has_stages(denoiser, self.extra_stages):
            from qi_plugins.sampling.runners import Batched

            return Batched(self.batch).run(denoiser, inputs, state=state, step=step, sigma=sigma)
        total = len(state.sigmas) if getattr(state, "sigmas", None) is not None else None
        log = state.data.get(self.name)
        if not isinstance(log, CacheLog):  # the call's first evaluation
            log = state.data[self.name] = self.last = CacheLog()
            log.off = total is not None and total <= FEW_STEPS and not self.force
            if log.off:
                warnings.warn(f"{self.name}: {total} steps are too few to cache (a few-step model changes a lot "
                              f"every step); running uncached. Pass force=True to cache anyway",
                              CacheWarning, stacklevel=2)  # fmt: skip
        if log.off:
            from qi_plugins.sampling.runners import Batched

            return Batched(self.batch).run(denoiser, inputs, state=state, step=step, sigma=sigma)
        labels = list(inputs)
        stack = self.batch and len(inputs) > 1 and len(getattr(state, "items", None) or ()) > 1
        runs = [labels] if self.batch else [[label] for label in labels]
        preds: dict[Hashable, torch.Tensor] = {}
        for run in runs:
            preds.update(self._run(denoiser, [inputs[k] for k in run], run, log, step, total, stack))
        return preds

    def _run(self, denoiser: Any, inputs: list[DenoiseInput], labels: list[Hashable], log: CacheLog, step: int,
             total: int | None, stack: bool) -> dict[Hashable, torch.Tensor]:  # fmt: skip
        states = denoiser.enter(inputs, stack=stack)
        signals = self.probe(denoiser, states)
        compute = []
        for s, signal in zip(states, signals, strict=True):
            mine = [labels[k] for k in s["indices"]]
            pieces = signal.split(s["rows"])
            hooked = any(inputs[k].block_hooks for k in s["indices"])
            entries = [log.entries.setdefault(lab, Entry()) for lab in mine]
            decided = [
                self._may_skip(e, p, s, step, total, hooked) for e, p in zip(entries, pieces, strict=True)
            ]
            skip = all(ok for ok, _ in decided)  # a group of stacked inputs runs as one
            for lab, e, p, (_, d) in zip(mine, entries, pieces, decided, strict=True):
                self.remember(e, p, d, skip)
                e.in_a_row = e.in_a_row + 1 if skip else 0
                log.events.append((step, lab, skip, d))
            if skip:
                s["img"] = s["img"] + torch.cat([e.residual for e in entries])
            else:
                s["reference"] = s["img"]
                compute.append(s)
        if compute:
            denoiser.run_blocks(compute, self.start)
        for s in compute:
            residual = (s["img"] - s["reference"]).split(s["rows"])
            for k, r in zip(s["indices"], residual, strict=True):
                log.entries[labels[k]].residual = r
        return dict(zip(labels, denoiser.exit(states), strict=True))

    def _may_skip(self, entry: Entry, signal: torch.Tensor, s: dict, step: int, total: int | None,
                  hooked: bool) -> tuple[bool, float]:  # fmt: skip
        """(whether this label may reuse its residual, the distance)."""
        d = self.distance(entry, signal)
        fits = entry.residual is not None and entry.residual.shape[1:] == s["img"].shape[1:]
        ok = (
            fits
            and step >= self.warmup
            and (total is None or step < total - self.tail)
            and (self.max_skips is None or entry.in_a_row < self.max_skips)
            and not (hooked and self.hooks == "compute")
        )
        return ok and self.accepts(entry, d), d

    def accepts(self, entry: Entry, distance: float) -> bool:
        return distance < self.threshold


class FirstBlockCache(_StepCache):
    """FBCache: block 0 always runs; when its output residual moved less than ``threshold`` (relative L1)
    since the last computed step, blocks 1…N−1 are skipped and their residual from that step is reused.

    ``threshold``: 0 computes every step (bit for bit the ``batched`` runner); 0.05–0.12 is the usual range
    on 30–50-step runs. ``warmup``: the first steps always computed; ``tail``: the last steps always
    computed; ``max_skips``: reuses in a row before a step is computed again (None: no limit). ``hooks``:
    inputs with block hooks (ControlNets) are cached like any other — their residual includes the hooks'
    contribution at the last computed step — with ``"cache"``, always computed with ``"compute"``.
    ``batch``: the inputs go through each block together (as the ``batched`` runner's ``batch``). ``force``: cache
    schedules of 8 steps or fewer too (by default they run uncached, with a :class:`CacheWarning`)."""

    name = "first-block-cache"
    start = 1

    def __init__(self, threshold: float = 0.08, *, warmup: int = 2, tail: int = 1, max_skips: int | None = 3,
                 hooks: str = "cache", batch: bool = True, force: bool = False):  # fmt: skip
        super().__init__(threshold, warmup=warmup, tail=tail, max_skips=max_skips, hooks=hooks, batch=batch,
                         force=force)  # fmt: skip

    def probe(self, denoiser: Any, states: list[dict]) -> list[torch.Tensor]:
        before = [s["img"] for s in states]
        denoiser.run_blocks(states, 0, 1)
        return [s["img"] - b for s, b in zip(states, before, strict=True)]

    def distance(self, entry: Entry, signal: torch.Tensor) -> float:
        if entry.signal is None or entry.signal.shape != signal.shape:
            return math.inf
        return relative_l1(signal, entry.signal)

    def remember(self, entry: Entry, signal: torch.Tensor, distance: float, skipped: bool) -> None:
        if not skipped:  # compared with the last computed step, so slow drift adds up
            entry.signal = signal


class TeaCache(_StepCache):
    """TeaCache: block 0's timestep-modulated input is compared with the previous evaluation's (relative L1,
    mapped through the polynomial ``coefficients``, highest power first, when given); the distances add up over
    the steps since the last computed one, and while the sum stays below ``threshold`` every block is skipped
    and their residual from that step reused. ``coefficients`` are fitted per model (TeaCache's FLUX ones do not
    carry over); None uses the raw distance. Other options as :class:`FirstBlockCache`."""

    name = "teacache"
    start = 0
    extra_stages = ("modulated_input",)

    def __init__(self, threshold: float = 0.3, *, warmup: int = 2, tail: int = 1, max_skips: int | None = 3,
                 hooks: str = "cache", batch: bool = True, force: bool = False,
                 coefficients: Sequence[float] | None = None):  # fmt: skip
        super().__init__(threshold, warmup=warmup, tail=tail, max_skips=max_skips, hooks=hooks, batch=batch,
                         force=force)  # fmt: skip
        self.coefficients = tuple(float(c) for c in coefficients) if coefficients is not None else None

    def probe(self, denoiser: Any, states: list[dict]) -> list[torch.Tensor]:
        return [denoiser.modulated_input(s, 0) for s in states]

    def distance(self, entry: Entry, signal: torch.Tensor) -> float:
        if entry.signal is None or entry.signal.shape != signal.shape:
            return math.inf
        d = relative_l1(signal, entry.signal)
        if self.coefficients is not None and math.isfinite(d):
            d = abs(sum(c * d**k for k, c in enumerate(reversed(self.coefficients))))
        return entry.accumulated + d

    def remember(self, entry: Entry, signal: torch.Tensor, distance: float, skipped: bool) -> None:
        entry.signal = signal  # compared with the previous evaluation; the distances accumulate
        entry.accumulated = distance if skipped else 0.0
