"""Regional compilation (``compile_blocks``): the repeated block compiles once for every image size, prompt
length and fused-LoRA change (apply, rescale, remove); LoRA branches hooked on after compiling are seen (one
more compile) and rescaling them compiles nothing; the compiled blocks compute what the eager ones do.

Backends: ``aot_eager`` (AOTAutograd's traced aten graph, no code generation) and a counting backend that runs
the captured graph as is (``eager`` plus a counter): fast on CPU, the same graph capture as inductor.

Tolerance: the eager DiT runs its linears through ``qwen_image.kernels`` (oneDNN, fused GELU) while compiled
code leaves the kernel choice to the compiler (``F.linear``), so the two differ by float32 summation order.
They are the same maths: against the eager DiT with ``kernels.disabled()`` (the same kernels) the compiled
output is compared exactly, and against the default kernels within ``check_float32_gap`` of
``tests/tolerance.py`` for a whole pipeline call (prompt encoding, the DiT evaluations, the VAE decoder)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import GOLDEN_MODEL
from tolerance import check_float32_gap, pipeline_terms
from torch._dynamo.utils import counters

import qi_core as qi
from qi_core.errors import InvalidInputError
from qi_plugins.cache import compile_blocks, uncompile_blocks
from qi_plugins.cache.compiling import compiled
from qi_plugins.lora.adapter import load_lora
from qi_plugins.lora.formats import to_format
from qi_plugins.lora.tiny import tiny_lora
from qi_plugins.qwen_image import kernels

pytestmark = pytest.mark.usefixtures("single_thread")
STEPS = 2
CALL = dict(prompt="a red cube on a table", negative_prompt="blurry", cfg_scale=4.0, seed=3, output_type="np",
            num_inference_steps=STEPS, progress_bar_cmd=lambda x: x)  # fmt: skip
SIZES = ((64, 64), (64, 96), (96, 64))


@pytest.fixture
def pipe():
    torch._dynamo.reset()
    p = qi.compose("qwen-image", model=GOLDEN_MODEL, device="cpu", torch_dtype=torch.float32, progress=False)
    yield p
    uncompile_blocks(p)
    torch._dynamo.reset()


class Counting:
    """A backend that runs the captured graph as is and counts the compiles."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def eager(pipe, **kw):
    """The uncompiled output with the kernels compiled code uses, and with the default kernels."""
    with kernels.disabled():
        same_kernels = pipe(**{**CALL, **kw})
    return same_kernels, pipe(**{**CALL, **kw})


def check(out, refs, what):
    same_kernels, default = refs
    assert np.array_equal(out, same_kernels), what
    gap = check_float32_gap(out, default, terms=pipeline_terms(STEPS), what=what)
    print(f"{what}: compiled vs eager (default kernels) max abs diff {gap:.3g}")


LONGER = "a much longer prompt, with many more words than the first one had"


def lora_state(pipe, seed=1):
    return to_format(tiny_lora(pipe.dit, seed), "diffsynth")


def test_one_compile_for_every_size_prompt_length_and_fused_lora_change(pipe):
    refs = {hw: eager(pipe, height=hw[0], width=hw[1]) for hw in SIZES}
    longer = eager(pipe, **{"prompt": LONGER}, height=64, width=64)
    lora = load_lora(pipe, lora_state(pipe), 1.0)
    with_lora = {}
    for scale in (1.0, 0.5):
        lora.set_scale(scale)
        with_lora[scale] = eager(pipe, height=64, width=96)
    lora.remove(pipe)

    counters.clear()
    compile_blocks(pipe, backend="aot_eager")  # AOTAutograd's aten graph (RoPE in real arithmetic)
    assert compiled(pipe)["dynamic"] is True
    for hw in SIZES:
        check(pipe(**CALL, height=hw[0], width=hw[1]), refs[hw], f"size {hw}")
    check(pipe(**{**CALL, "prompt": LONGER}, height=64, width=64), longer, "another prompt length")
    lora = load_lora(pipe, lora_state(pipe), 1.0)
    check(pipe(**CALL, height=64, width=96), with_lora[1.0], "fused LoRA")
    lora.set_scale(0.5)
    check(pipe(**CALL, height=64, width=96), with_lora[0.5], "fused LoRA at scale 0.5")
    lora.remove(pipe)
    check(pipe(**CALL, height=64, width=64), refs[(64, 64)], "LoRA removed")
    # one graph: the two blocks share it, and every size, prompt length and weight change reuses it
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


def test_lora_branches_are_seen_and_rescaled_without_a_compile(pipe):
    """Branches are forward hooks on the block's linears: torch skips hook guards by default, so without
    ``compile_blocks``'s guard the compiled block would silently ignore a LoRA attached after compiling."""
    plain = eager(pipe, height=64, width=64)
    lora = load_lora(pipe, lora_state(pipe), 1.0, fuse=False)
    branched = {}
    for scale in (1.0, 0.3):
        lora.set_scale(scale)
        branched[scale] = eager(pipe, height=64, width=64)
    lora.remove(pipe)
    assert not np.array_equal(branched[1.0][0], plain[0])

    backend = Counting()
    compile_blocks(pipe, backend=backend)
    check(pipe(**CALL, height=64, width=64), plain, "no LoRA")
    lora = load_lora(pipe, lora_state(pipe), 1.0, fuse=False)
    check(pipe(**CALL, height=64, width=64), branched[1.0], "LoRA branches")
    assert backend.graphs == 2  # the hooks changed the graph: one more compile, shared by both blocks
    lora.set_scale(0.3)
    check(pipe(**CALL, height=64, width=64), branched[0.3], "LoRA branches at scale 0.3")
    lora.remove(pipe)
    check(pipe(**CALL, height=64, width=64), plain, "LoRA branches removed")
    assert backend.graphs == 2  # the scale is an input, and the graph without hooks is still cached


def test_uncompile_and_errors(pipe):
    compile_blocks(pipe, backend=Counting())
    assert all(b._compiled_call_impl is not None for b in pipe.dit.transformer_blocks)
    uncompile_blocks(pipe)
    assert all(b._compiled_call_impl is None for b in pipe.dit.transformer_blocks) and compiled(pipe) is None
    with pytest.raises(InvalidInputError, match="no component 'transformer'"):
        compile_blocks(pipe, role="transformer")
    with pytest.raises(InvalidInputError, match="no list of repeated blocks"):
        compile_blocks(torch.nn.Linear(2, 2))
