"""The parallel plugin's typed errors."""

from __future__ import annotations

from qi_core.errors import InvalidInputError


class ParallelConfigError(InvalidInputError):
    """The parallel degrees do not fit the process group or the model (cfg × ulysses × ring ≠ world size, heads
    not divisible by the Ulysses degree, Ulysses with ring, a denoiser without sequence splits)."""
