"""Memory policies, per model: ``none``, ``offload``, ``stream``, ``disk``, ``fp8``, and the presets
``low-vram`` (DiT layers streamed with a 4 GiB budget, other models offloaded) and ``lowest-vram`` (DiT layers
read from disk). See :mod:`qi_plugins.memory.policies`.
"""

from __future__ import annotations

from qi_core.hookspecs import hookimpl

QI_HOOK_API = 1
QI_REQUIRES = ()
_P = "qi_plugins.memory.policies"


def _preset(name: str):
    def make(role=None, **settings):
        from qi_plugins.memory.policies import preset

        return preset(name)(role, **settings)

    return make


@hookimpl
def qi_register_memory_policies(register):
    register("none", f"{_P}:Resident", aliases=("resident",))
    register("offload", f"{_P}:ComponentOffload", aliases=("component-offload",))
    register("stream", f"{_P}:LayerStream", aliases=("layer-stream",))
    register("disk", f"{_P}:Disk")
    register("fp8", f"{_P}:FP8Storage")
    register("low-vram", _preset("low-vram"))
    register("lowest-vram", _preset("lowest-vram"))
