"""Which torch devices and seeds a run can use here, checked before any model is loaded."""

from __future__ import annotations

from typing import Any

from qi_core.errors import InvalidInputError

KINDS = ("cpu", "cuda", "mps")  # device types qi runs on
CHOICES = "cpu, cuda, cuda:N, mps"
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes a 64-bit seed


#: dtype names users write (command lines, configs) → torch dtype attribute names
DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "float8_e4m3fn": "float8_e4m3fn", "fp8": "float8_e4m3fn",
}  # fmt: skip


def parse_dtype(value: Any, allowed: tuple[str, ...] | None = None) -> Any:
    """A torch dtype from a name (``"bfloat16"``, ``"bf16"`` …) or a dtype; None stays None. ``allowed`` limits
    the canonical names accepted (e.g. compute dtypes only)."""
    import torch

    if value is None or isinstance(value, torch.dtype):
        return value
    name = DTYPE_NAMES.get(str(value).strip().lower())
    choices = allowed or tuple(dict.fromkeys(DTYPE_NAMES.values()))
    if name is None or name not in choices:
        raise InvalidInputError(f"unknown dtype {value!r}; use one of {', '.join(choices)}")
    return getattr(torch, name)


def available() -> list[str]:
    """The devices usable on this machine, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def default_device() -> str:
    """``cuda`` when this machine has CUDA, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: Any) -> str:
    """``device`` as a torch device string, or InvalidInputError naming the valid choices and what this
    machine has (``--device gpu``, or ``cuda`` where torch has no CUDA, fail here, not in the middle of a load)."""
    import torch

    here = ", ".join(available())
    if isinstance(device, torch.device):
        spec = str(device)
    elif isinstance(device, str):
        spec = device.strip()
    else:
        raise InvalidInputError(f"device must be a string such as 'cpu' or 'cuda:0', got {device!r}")
    try:
        dev = torch.device(spec)
    except RuntimeError:  # torch's message lists ~20 backends qi does not run on
        dev = None
    if dev is None or dev.type not in KINDS:
        raise InvalidInputError(f"unknown device {spec!r}; use one of {CHOICES} (available here: {here})")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU found"
            )
            raise InvalidInputError(
                f"device {spec!r} needs CUDA, which is not available here ({why}); use one of: {here}"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise InvalidInputError(
                f"device {spec!r} does not exist: this machine has {n} CUDA device(s); use one of: {here}"
            )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidInputError(
            f"device {spec!r} needs Apple MPS, which is not available here; use one of: {here}"
        )
    return str(dev)


def check_seed(seed: Any) -> int | None:
    """``seed`` (None = random) if it fits the 64-bit generator seed, else InvalidInputError with the range."""
    if seed is None:
        return None
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InvalidInputError(f"seed must be an integer in [0, 2^64 − 1], got {seed!r}")
    if not 0 <= seed <= SEED_MAX:
        raise InvalidInputError(f"seed must be in [0, 2^64 − 1] = [0, {SEED_MAX}], got {seed}")
    return seed
