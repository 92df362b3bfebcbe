"""Preset LoRAs: a LoRA plus the call settings (and schedule) it was distilled for, fetched from a hub.

Few-step LoRAs (Lightning, Distill-LoRA) only work with their own step count, ``cfg_scale=1`` and sometimes
their own sigma schedule. A :class:`PresetLoRA` applies all of it and ``remove`` undoes all of it.
"""

from __future__ import annotations

from typing import Any

from qi_core.errors import InvalidInputError
from qi_core.protocols import Adapter
from qi_plugins.lora.adapter import LoRA
from qi_plugins.lora.sources import fetch_file


class PresetLoRA(Adapter):
    """A LoRA with the defaults it expects. Subclasses set the class attributes below.

    ``lora``: a local file or state dict replacing the hub file; ``steps``: the step count to set (and to pick
    the file for); ``scale``/``fuse``: as :class:`~qi_plugins.lora.adapter.LoRA`; ``model_id``/``file``:
    another hub file; ``downloader``: ``download(model_id, local_dir, patterns)`` replacing the hub client.
    """

    name = ""
    model_id = ""  # hub repository of the default LoRA file
    file = ""  # file in that repository; "{steps}" is filled in
    steps_choices: tuple[int, ...] = ()  # step counts the LoRA was distilled for (empty = any)
    default_steps = 8
    scheduler: str | None = None  # registered schedule the LoRA expects; None keeps the pipeline's
    call_defaults: dict[str, Any] = {"cfg_scale": 1.0}  # besides num_inference_steps

    def __init__(self, lora: Any = None, *, steps: int | None = None, scale: float = 1.0, fuse: bool = True,
                 model_id: str | None = None, file: str | None = None, downloader: Any = None):  # fmt: skip
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise InvalidInputError(f"{self.name} steps must be a positive integer, got {steps!r}")
        self.lora, self.steps, self.scale, self.fuse = lora, steps, scale, fuse
        self.model_id_override, self.file_override, self.downloader = model_id, file, downloader
        self._lora: Any = None
        self._saved: tuple[Any, dict[str, Any]] | None = None

    def hub_file(self, pipe: Any, steps: int) -> tuple[str, str]:
        """(hub id, file) of the LoRA for this pipeline and step count."""
        return self.model_id, self.file

    def pick_steps(self, pipe: Any) -> int:
        return self.steps if self.steps is not None else self.default_steps

    def source(self, pipe: Any, steps: int) -> Any:
        from qi_core.composer import model_hub

        if self.lora is not None:
            return self.lora
        if self.steps_choices and steps not in self.steps_choices and self.file_override is None:
            raise InvalidInputError(
                f"{self.name} LoRAs exist for {' or '.join(map(str, self.steps_choices))} steps, not {steps}; "
                f"pass steps={self.steps_choices[0]}, or lora=/file= for another LoRA"
            )
        model_id, file = self.hub_file(pipe, steps)
        model_id = self.model_id_override or model_id
        file = (self.file_override or file).format(steps=steps)
        return fetch_file(model_id, file, self.downloader, model_hub(pipe))

    def apply(self, pipe: Any) -> None:
        from qi_core.composer import get_scheduler

        if self._lora is not None:
            raise InvalidInputError(f"adapter {self.name!r} is already applied; remove(pipe) it first")
        steps = self.pick_steps(pipe)
        scheduler = get_scheduler(self.scheduler) if self.scheduler else pipe.scheduler
        lora = LoRA(self.source(pipe, steps), scale=self.scale, fuse=self.fuse, name=self.name)
        lora.apply(pipe)  # first: a missing or mismatched LoRA leaves the pipeline untouched
        self._lora = lora
        self._saved = (pipe.scheduler, dict(pipe.defaults))
        pipe.scheduler = scheduler
        pipe.defaults.update(self.call_defaults, num_inference_steps=steps)

    def remove(self, pipe: Any) -> None:
        if self._lora is None:
            return
        self._lora.remove(pipe)
        pipe.scheduler, pipe.defaults = self._saved
        self._lora, self._saved = None, None
        if self in getattr(pipe, "adapters", []):
            pipe.adapters.remove(self)
