"""The ``parallel=`` compose option: the ``parallel`` step runner with its degrees, for a script started by
torchrun (or ``qi generate --nproc``).

    pipe = qi.compose("qwen-image", model=..., device="cuda", parallel={"cfg": 2, "ulysses": 2})
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qi_core.errors import InvalidInputError

SETTINGS = ("cfg", "ulysses", "ring", "batch")


def parallel_settings(value: Any) -> dict[str, Any] | None:
    """``parallel=`` as the runner's keywords: True (degrees from the launcher's environment, see
    ``docs/parallel.md``), or ``{"cfg": C, "ulysses": U, "ring": R}`` (any of them). None or False: one process."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise InvalidInputError(
            f'parallel must be True or a dict such as {{"cfg": 2, "ulysses": 2}}, got {value!r}'
        )
    unknown = [k for k in value if k not in SETTINGS]
    if unknown:
        raise InvalidInputError(f"parallel has no setting {unknown[0]!r}; settings: {', '.join(SETTINGS)}")
    from qi_plugins.parallel.runner import Parallel

    Parallel(
        **value
    )  # degrees checked now (positive, ulysses and ring not both), the world at the first step
    return dict(value)


def parallel(pipe: Any, value: Any) -> Callable[[], None] | None:
    """Make the ``parallel`` runner with these degrees the pipeline's step runner; returns the undo."""
    from qi_plugins.parallel.runner import Parallel

    settings = parallel_settings(value)
    if settings is None:
        return None
    previous = pipe.step_runner
    pipe.step_runner = Parallel(**settings)
    return lambda: setattr(pipe, "step_runner", previous)
