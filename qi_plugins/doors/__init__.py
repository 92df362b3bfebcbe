"""The doors to the pipelines: ``qi generate``, whose flags are generated from each pipeline's declared call
parameters, with batches, reproducible outputs and re-runs from a written image.

Registration is cheap: the command's module loads when ``qi generate`` is built.
"""

from __future__ import annotations

from qi_core.hookspecs import hookimpl

QI_HOOK_API = 1
QI_REQUIRES = ()


@hookimpl
def qi_register_commands(register):
    register("generate", "qi_plugins.doors.generate:configure", help="generate images with any pipeline")
