"""Memory policies. ``none``: every model lives on the compute device in the compute dtype."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from qi_core.hookspecs import hookimpl

QI_HOOK_API = 1


class Resident:
    """All weights resident on the compute device; using a model costs nothing."""

    name = "none"

    def attach(self, model: Any, *, device: Any, dtype: Any) -> Any:
        to = getattr(model, "to", None)
        if callable(to) and hasattr(model, "parameters"):
            model = model.to(device=device)
        return model

    @contextmanager
    def use(self, model: Any):
        yield model


@hookimpl
def qi_register_memory_policies(register):
    register("none", Resident, aliases=("resident",))
