"""Shared helpers of the control-plugin tests: golden call arguments, recipes per case, DiT-call recording."""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from conftest import GOLDEN, GOLDEN_MODEL, golden_call, golden_case

import qi_core as qi

# golden case → (recipe, component overrides)
CASES = {
    "eligen": "qwen-image-eligen",
    "eligen_negative": "qwen-image-eligen",
    "controlnet": "qwen-image-blockwise-controlnet-canny",
    "controlnet_multi": "qwen-image-blockwise-controlnet-depth",
    "controlnet_inpaint": "qwen-image-blockwise-controlnet-inpaint",
    "context_image": "qwen-image-in-context-control-union",
}


def components_for(case: dict) -> dict[str, Any]:
    files = case["models"].get("blockwise_controlnets")
    if files:  # ControlNets in controlnet_id order, as DiffSynth's model list
        return {"blockwise_controlnet": [GOLDEN / f for f in files]}
    return {"lora": []}  # the golden runs fuse no LoRA


def compose_for(name: str, case: dict):
    return qi.compose(CASES[name], model=GOLDEN_MODEL, progress=False, components=components_for(case))


class Recorder:
    """Wraps ``pipe.dit``: records every DenoiseInput (shallow copy of its fields) and the output."""

    def __init__(self, dit):
        self.dit = dit
        self.calls: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.dit, name)

    def __call__(self, inp):
        return self.forward_many([inp])[0]

    def forward_many(self, inputs):  # the pipeline may run the CFG sides together
        many = getattr(self.dit, "forward_many", None)
        outs = many(inputs) if many is not None else [self.dit(inp) for inp in inputs]
        for inp, out in zip(inputs, outs, strict=True):
            self._record(inp, out)
        return outs

    def _record(self, inp, out) -> None:
        self.calls.append(
            {
                "text": list(inp.text),
                "images": list(inp.images),
                "attention_mask": inp.attention_mask,
                "block_hooks": list(inp.block_hooks),
                "extras": dict(inp.extras),
                "extra_timesteps": list(inp.extra_timesteps),
                "latents": inp.latents,
                "timestep": inp.timestep,
                "target_frames": inp.target_frames,
                "out": out.detach().clone(),
            }
        )


def run(pipe, args: dict[str, Any], record: bool = False, output_type: str = "np"):
    """Call ``pipe`` silently; returns (output, traced tensors, recorded DiT calls)."""
    got: dict[str, torch.Tensor] = {}
    pipe.tracer = lambda k, v: got.__setitem__(k, v.detach().clone())
    rec = None
    if record:
        rec = Recorder(pipe.components["dit"])
        pipe.components["dit"] = rec
    try:
        out = pipe(**args, output_type=output_type, progress_bar_cmd=lambda x: x)
    finally:
        pipe.tracer = None
        if rec is not None:
            pipe.components["dit"] = rec.dit
    return out, got, (rec.calls if rec else [])


@cache
def golden_run(name: str):
    """One recorded run per golden case and test session: (pipe, case, want, folder, output, traced, calls)."""
    case, want, folder = golden_case(name)
    pipe = compose_for(name, case)
    image, got, calls = run(pipe, golden_call(case, folder), record=True)
    return pipe, case, want, folder, image, got, calls
