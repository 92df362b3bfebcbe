"""Multi-process inference: CFG-parallel and sequence parallel (Ulysses or ring attention), combinable
(``cfg × ulysses`` or ``cfg × ring`` ranks).

Registers the ``parallel`` step runner (:class:`qi_plugins.parallel.runner.Parallel`) and the compose option
``parallel={"cfg": 2, "ulysses": 2}`` that chooses it. Launched with
``torchrun --nproc-per-node N``; the degrees come from ``Parallel(cfg=, ulysses=, ring=)``, else
``QI_PARALLEL_CFG`` / ``QI_PARALLEL_ULYSSES`` / ``QI_PARALLEL_RING``, else the world size (see
``docs/parallel.md``). Registration only names the factory; torch and torch.distributed are imported on first use.
"""

from __future__ import annotations

from qi_core.hookspecs import hookimpl

QI_HOOK_API = 1
QI_REQUIRES = ("sampling",)  # the default runner's logic runs each rank's share


@hookimpl
def qi_register_step_runners(register):
    register("parallel", "qi_plugins.parallel.runner:Parallel")


@hookimpl
def qi_register_options(register):
    register("parallel", "qi_plugins.parallel.options:parallel", check="qi_plugins.parallel.options:parallel_settings",
             help='the parallel step runner (under torchrun): True, or {"cfg": C, "ulysses": U, "ring": R}')  # fmt: skip
