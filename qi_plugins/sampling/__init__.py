"""The denoising loop's generic parts: guiders (``cfg``, ``cfg-renorm``), samplers (``euler``, ``heun``), the
default step runner (``batched``) and attention backend (``sdpa``).

They are registered through the same hooks as any third-party part, so a plugin can replace or add to each one
(see ``docs/hooks.md``). Registration is cheap: the modules holding the maths import torch on first use.
"""

from __future__ import annotations

from qi_core.hookspecs import hookimpl

QI_HOOK_API = 1
QI_REQUIRES = ()
_P = "qi_plugins.sampling"


@hookimpl
def qi_register_guiders(register):
    register("cfg", f"{_P}.guiders:CFG")
    register("cfg-renorm", f"{_P}.guiders:CFGRenorm", aliases=("true-cfg",))


@hookimpl
def qi_register_samplers(register):
    register("euler", f"{_P}.samplers:Euler")
    register("heun", f"{_P}.samplers:Heun")


@hookimpl
def qi_register_step_runners(register):
    register("batched", f"{_P}.runners:Batched")


@hookimpl
def qi_register_attention(register):
    register("sdpa", f"{_P}.attention:sdpa")
