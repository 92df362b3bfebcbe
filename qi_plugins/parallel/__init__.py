"""Multi-process inference: CFG-parallel and Ulysses sequence parallel, combinable (``cfg × ulysses`` ranks).

Registers the ``parallel`` step runner (:class:`qi_plugins.parallel.runner.Parallel`). Launched with
``torchrun --nproc-per-node N``; the degrees come from ``Parallel(cfg=, ulysses=)``, else ``QI_PARALLEL_CFG`` /
``QI_PARALLEL_ULYSSES``, else the world size (see ``docs/parallel.md``). Registration only names the factory;
torch and torch.distributed are imported on first use.
"""

from __future__ import annotations

from qi_core.hookspecs import hookimpl

QI_HOOK_API = 1
QI_REQUIRES = ("sampling",)  # the default runner's logic runs each rank's share


@hookimpl
def qi_register_step_runners(register):
    register("parallel", "qi_plugins.parallel.runner:Parallel")
