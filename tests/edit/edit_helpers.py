"""Shared by the edit tests: one composed pipeline per session, golden call arguments."""

from __future__ import annotations

from functools import cache

import torch
from conftest import GOLDEN_MODEL
from conftest import golden_call as call_args  # noqa: F401

import qi_core as qi

QUIET = {"progress_bar_cmd": lambda x: x}


@cache
def edit_pipe(name: str = "qwen-image-edit"):
    return qi.compose(name, model=GOLDEN_MODEL, device="cpu", torch_dtype=torch.float32, progress=False)


def run_traced(pipe, **kwargs) -> tuple[object, dict[str, torch.Tensor]]:
    """Run ``pipe`` and return its output and every traced intermediate."""
    got: dict[str, torch.Tensor] = {}
    pipe.tracer = lambda k, v: got.__setitem__(k, v.detach().clone())
    try:
        out = pipe(**kwargs, **QUIET)
    finally:
        pipe.tracer = None
    return out, got
