"""Developer tools: ``qi new-plugin NAME DIR`` renders the third-party plugin template.

Registration is cheap: the renderer loads when the command runs.
"""

from __future__ import annotations

from qi_core.hookspecs import hookimpl

QI_HOOK_API = 1
QI_REQUIRES = ()


@hookimpl
def qi_register_commands(register):
    register(
        "new-plugin",
        "qi_plugins.devtools.template_cli:configure",
        help="render a new third-party plugin (pyproject, hook implementations, test, README) into DIR",
    )
