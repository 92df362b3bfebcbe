"""Regional compilation: ``torch.compile`` on each repeated transformer block, not on the whole model.

The blocks share one class and one ``forward``, so the compiled code of one serves every block (parameters are
inputs of the graph, not constants): compiling costs one block's compile, not N. ``dynamic=True`` marks the
sequence sizes symbolic from the first call, so other image sizes, prompt lengths and batch sizes reuse it
(a size of 1 is specialised by torch: the first batch of more than one row compiles once more). A fused LoRA
changes the weights in place, so applying, rescaling or removing it reuses the compiled code too. A LoRA kept
as branches adds forward hooks to the block's layers, which changes the graph: the blocks are compiled again
when the hooks change (:func:`compile_blocks` guards on them; torch itself skips hook guards by default).

    from qi_plugins.cache import compile_blocks
    compile_blocks(pipe)                                   # inductor; mode="max-autotune-no-cudagraphs" …
    compile_blocks(pipe, backend="aot_eager")              # no code generation (tests, debugging)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qi_core.errors import InvalidInputError
from qi_core.protocols import component_module

_MARK = "_qi_compiled_blocks"


def repeated_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's repeated blocks: its ``transformer_blocks``, else its largest ``ModuleList`` of modules of
    one class."""
    blocks = getattr(model, "transformer_blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks):
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
             and len({type(b) for b in m}) == 1]  # fmt: skip
    if not lists:
        raise InvalidInputError(f"{type(model).__name__} has no list of repeated blocks to compile")
    return max(lists, key=len)


def _model(target: Any, role: str) -> nn.Module:
    components = getattr(target, "components", None)
    if isinstance(components, dict):  # a pipeline
        if role not in components:
            raise InvalidInputError(f"compile_blocks: the pipeline has no component {role!r} "
                                    f"(components: {', '.join(components)})")  # fmt: skip
        target = components[role]
    module = target if isinstance(target, nn.Module) else component_module(target)
    if module is None:
        raise InvalidInputError(f"compile_blocks: {type(target).__name__} is not a torch module")
    return module


def _no_duck_shapes() -> Any:
    """Sizes that happen to be equal stay separate symbols while compiling: with duck shapes (torch's default)
    a token count equal to a fixed size (the tiny model's 16 image tokens and its half head dim of 16) is
    unified with it and specialised, so the next image size would compile again."""
    from torch.fx.experimental import _config

    return _config.patch(use_duck_shape=False)


class _Guarded:
    """A block's compiled forward, called with dynamo guarding on the forward hooks of the block's modules (torch
    skips those guards by default, so a LoRA branch hooked on after compiling would be ignored) and without
    duck shapes."""

    def __init__(self, compiled: Callable[..., Any]):
        self.compiled = compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with _no_duck_shapes(), torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
            return self.compiled(*args, **kwargs)


def compile_blocks(target: Any, *, role: str = "dit", backend: str | Callable[..., Any] = "inductor",
                   mode: str | None = None, dynamic: bool | None = True, fullgraph: bool = False,
                   options: dict[str, Any] | None = None) -> nn.ModuleList:  # fmt: skip
    """Compile each repeated block of ``target`` (a pipeline, whose ``role`` component is used, or a module)
    in place with ``torch.compile(backend=, mode=, dynamic=, fullgraph=, options=)``; returns the blocks.
    The rest of the model stays eager. Calling it again recompiles with the new settings;
    :func:`uncompile_blocks` undoes it."""
    model = _model(target, role)
    blocks = repeated_blocks(model)
    uncompile_blocks(model)
    kwargs: dict[str, Any] = dict(backend=backend, dynamic=dynamic, fullgraph=fullgraph)
    if mode is not None:
        kwargs["mode"] = mode
    if options is not None:
        kwargs["options"] = options
    for block in blocks:
        block.compile(**kwargs)
        block._compiled_call_impl = _Guarded(block._compiled_call_impl)
    setattr(model, _MARK, kwargs)
    return blocks


def uncompile_blocks(target: Any, *, role: str = "dit") -> None:
    """Make the blocks eager again (no-op when they are not compiled)."""
    model = _model(target, role)
    if getattr(model, _MARK, None) is None:
        return
    for block in repeated_blocks(model):
        block._compiled_call_impl = None
    setattr(model, _MARK, None)


def compiled(target: Any, *, role: str = "dit") -> dict[str, Any] | None:
    """The ``torch.compile`` settings the blocks were compiled with, or None."""
    return getattr(_model(target, role), _MARK, None)
