"""Batched generation: a list of prompts and ``num_images_per_prompt`` return a flat list, prompt-major, image j of
a prompt with seed + j; the items run as one real batch through the DiT (text padded, each row attending over its
own tokens) and each equals the same prompt and seed run alone."""

from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import pytest
import tiny_helpers
import torch
from PIL import Image
from test_tiny_every_pipeline import inputs

import qi_core as qi
from qi_core.errors import InvalidInputError
from qi_core.protocols import DenoiseInput, TextSegment

offline = tiny_helpers.offline
tiny_cache_dir = tiny_helpers.tiny_cache_dir
tiny_pipeline = tiny_helpers.tiny_pipeline
pytestmark = pytest.mark.usefixtures("single_thread")

SIZE, STEPS, SEED = 64, 2, 7
#: prompts of clearly different token lengths (the tiny tokenizer: about one token per word)
PROMPTS = [
    "a red cube",
    "a small blue sphere resting on an old wooden table in the warm evening light, next to a window with "
    "a view over a quiet harbour full of fishing boats",
]
TOLERANCE = 1e-6  # float32; the float64 run of the same comparison agrees exactly (see test_float64)


def call(pipe, **kw) -> dict:
    """Call parameters: small, CFG on with a negative prompt, float arrays out, the pipeline's required inputs."""
    base = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, cfg_scale=4.0, negative_prompt="blurry, dark",
                output_type="np", progress_bar_cmd=lambda x: x, **inputs(pipe))  # fmt: skip
    if pipe.name == "qwen-image-eligen":
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[:, : SIZE // 2] = 255
        base.update(eligen_entity_prompts=["a cat"], eligen_entity_masks=[Image.fromarray(mask)])
    return {**base, **kw}


def diff(a, b) -> float:
    """Max abs difference of two outputs (arrays, tensors, or lists of frames)."""
    a, b = (np.stack(x) if isinstance(x, list) else np.asarray(x) for x in (a, b))
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


@contextmanager
def dit_batches(dit):
    """The batch size B of every DiT forward (one entry per stacked group, per evaluation)."""
    sizes: list[int] = []
    handle = dit.img_in.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        yield sizes
    finally:
        handle.remove()


@pytest.mark.parametrize(
    "name", ["qwen-image", "qwen-image-edit", "qwen-image-eligen", "qwen-image-layered",
             "qwen-image-blockwise-controlnet-canny"],
)  # fmt: skip
def test_each_item_equals_its_prompt_and_seed_alone(name, tiny_pipeline):
    pipe = tiny_pipeline(name)
    with dit_batches(pipe.dit) as sizes:
        out = pipe(prompt=PROMPTS, num_images_per_prompt=2, seed=SEED, **call(pipe))
    assert isinstance(out, list) and len(out) == 4
    worst = 0.0
    for k, (prompt, seed) in enumerate((p, SEED + j) for p in PROMPTS for j in range(2)):
        worst = max(worst, diff(out[k], pipe(prompt=prompt, seed=seed, **call(pipe))))
    print(f"{name}: batch of 4 vs alone, max abs diff {worst:.3g}")
    assert worst <= TOLERANCE
    assert diff(out[0], out[1]) > 1e-3 and diff(out[0], out[2]) > 1e-3  # seeds and prompts do differ
    # a real batch: every item and side in one forward (EliGen: the positives, with their regional segments, and
    # the negatives are two layouts, two stacked groups)
    groups = [[8], [4, 4]][name == "qwen-image-eligen"]
    assert sizes == groups * STEPS


def test_one_prompt_several_images(tiny_pipeline):
    pipe = tiny_pipeline("qwen-image")
    out = pipe(prompt=PROMPTS[0], num_images_per_prompt=3, seed=SEED, **call(pipe))
    assert len(out) == 3
    for j in range(3):
        assert diff(out[j], pipe(prompt=PROMPTS[0], seed=SEED + j, **call(pipe))) <= TOLERANCE


def test_a_list_of_one_prompt_is_a_list_of_one(tiny_pipeline):
    pipe = tiny_pipeline("qwen-image")
    out = pipe(prompt=[PROMPTS[1]], seed=SEED, **call(pipe, output_type="latent"))
    alone = pipe(prompt=PROMPTS[1], seed=SEED, **call(pipe, output_type="latent"))
    assert isinstance(out, list) and len(out) == 1 and isinstance(alone, torch.Tensor)
    assert out[0].shape == alone.shape and diff(out[0], alone) <= TOLERANCE


def test_seed_none_draws_one_seed_for_the_batch(tiny_pipeline, monkeypatch):
    pipe = tiny_pipeline("qwen-image")
    drawn = []
    monkeypatch.setattr(random, "randrange", lambda n: drawn.append(n) or 1234)
    out = pipe(prompt=PROMPTS, num_images_per_prompt=2, seed=None, **call(pipe))
    assert len(drawn) == 1
    monkeypatch.undo()
    for k, (prompt, seed) in enumerate((p, 1234 + j) for p in PROMPTS for j in range(2)):
        assert diff(out[k], pipe(prompt=prompt, seed=seed, **call(pipe))) <= TOLERANCE


def test_negative_prompt_list_one_per_prompt(tiny_pipeline):
    pipe = tiny_pipeline("qwen-image")
    negatives = ["blurry", "a dark, noisy, low quality picture with many artefacts"]
    out = pipe(prompt=PROMPTS, seed=SEED, **call(pipe, negative_prompt=negatives))
    for k in range(2):
        alone = pipe(prompt=PROMPTS[k], seed=SEED, **call(pipe, negative_prompt=negatives[k]))
        assert diff(out[k], alone) <= TOLERANCE
    with_first = pipe(prompt=PROMPTS[1], seed=SEED, **call(pipe, negative_prompt=negatives[0]))
    assert diff(out[1], with_first) > 1e-3  # the second prompt's own negative was used


def test_pil_output_heun_and_one_progress_bar(tiny_pipeline):
    pipe = tiny_pipeline("qwen-image")
    bars = []

    def bar(steps):
        bars.append(list(steps))
        return bars[-1]

    out = pipe(
        prompt=PROMPTS, seed=SEED, **call(pipe, output_type="pil", sampler="heun", progress_bar_cmd=bar)
    )
    assert bars == [list(range(STEPS))]
    assert [im.size for im in out] == [(SIZE, SIZE)] * 2 and all(isinstance(im, Image.Image) for im in out)
    for k in range(2):
        alone = pipe(prompt=PROMPTS[k], seed=SEED, **call(pipe, output_type="pil", sampler="heun"))
        assert np.array_equal(np.asarray(out[k]), np.asarray(alone))


def test_float64(offline):
    """The same comparison in float64: exact (no tolerance needed)."""
    pipe = qi.compose("qwen-image", model="tiny", torch_dtype=torch.float64, progress=False)
    out = pipe(prompt=PROMPTS, seed=SEED, **call(pipe))
    worst = max(diff(out[k], pipe(prompt=PROMPTS[k], seed=SEED, **call(pipe))) for k in range(2))
    print(f"float64: max abs diff {worst:.3g}")
    assert worst <= 1e-12


@pytest.mark.parametrize("memory", ["offload", "disk"])
def test_memory_policies(memory, offline):
    pipe = qi.compose("qwen-image", model="tiny", memory=memory, progress=False)
    with dit_batches(pipe.dit) as sizes:
        out = pipe(prompt=PROMPTS, seed=SEED, **call(pipe))
    assert sizes == [4] * STEPS
    for k in range(2):
        assert diff(out[k], pipe(prompt=PROMPTS[k], seed=SEED, **call(pipe))) <= TOLERANCE


def test_stacked_forward_is_each_forward_and_other_layouts_run_beside(tiny_pipeline):
    """``forward_many(stack=True)``: text of different lengths stacked (one forward of B = 3), an input of another
    size in its own group; every result its own forward (to the rounding of a matrix kernel chosen by the number
    of rows: torch's CPU GEMM takes another path below 4 text tokens)."""
    dit = tiny_pipeline("qwen-image").dit
    g = torch.Generator().manual_seed(0)
    D = dit.config.joint_attention_dim

    def inp(length: int, hw: int = 8) -> DenoiseInput:
        return DenoiseInput(latents=torch.randn(1, 16, hw, hw, generator=g), timestep=torch.tensor([500.0]),
                            text=[TextSegment(torch.randn(1, length, D, generator=g))])  # fmt: skip

    many = [inp(3), inp(17), inp(9, hw=4), inp(30)]
    with torch.inference_mode(), dit_batches(dit) as sizes:
        stacked = dit.forward_many(many, stack=True)
        alone = [dit(x) for x in many]
    assert sizes[:2] == [3, 1]
    worst = max(float((a - b).abs().max()) for a, b in zip(stacked, alone, strict=True))
    print(f"forward_many(stack=True) vs alone: max abs diff {worst:.3g}")
    assert worst <= TOLERANCE


@pytest.mark.parametrize(
    ("kw", "param", "match"),
    [
        ({"prompt": []}, "prompt", r"prompt must be a string or a non-empty list of strings, got \[\]"),
        ({"prompt": ["a", 3]}, "prompt", r"a non-empty list of strings, got \['a', 3\]"),
        (
            {"prompt": ["a", "b"], "negative_prompt": ["x"]},
            "negative_prompt",
            r"a list of 1 for 2 prompt\(s\)",
        ),
        ({"prompt": "a", "negative_prompt": ["x", "y"]}, "negative_prompt", r"a list of 2 for 1 prompt\(s\)"),
        ({"prompt": "a", "negative_prompt": []}, "negative_prompt", "must be a string or a non-empty list"),
        ({"prompt": ["a"], "rand_device": ["cpu"]}, "rand_device", "rand_device must be a valid string"),
        ({"prompt": "a", "num_images_per_prompt": 0}, "num_images_per_prompt", "greater than or equal to 1"),
        (
            {"prompt": "a", "num_images_per_prompt": 2, "seed": 2**64 - 1},
            "seed",
            r"seed \+ num_images_per_prompt",
        ),
    ],
)
def test_bad_batches_are_refused_naming_the_parameter(kw, param, match, tiny_pipeline):
    pipe = tiny_pipeline("qwen-image")
    with pytest.raises(InvalidInputError, match=match) as e:
        pipe(**{**call(pipe), **kw})
    assert e.value.param == param


def test_a_forward_many_without_stack_runs_a_batch_unstacked(tiny_pipeline):
    """A third-party denoiser whose ``forward_many(inputs)`` has no ``stack``: a batch gets its inputs unstacked,
    each still equal to its own run."""
    from qi_plugins.sampling.runners import takes_stack

    pipe = tiny_pipeline("qwen-image")
    dit = pipe.dit

    class Plain:  # the DiT behind a wrapper whose forward_many predates stacking
        def __getattr__(self, name):
            return getattr(dit, name)

        def __call__(self, inp):
            return dit(inp)

        def forward_many(self, inputs):
            return [dit(x) for x in inputs]

    assert takes_stack(dit.forward_many) and not takes_stack(Plain().forward_many)
    want = [pipe(**call(pipe, prompt=p, seed=SEED)) for p in PROMPTS]
    pipe.components[pipe.roles["denoiser"]] = Plain()
    try:
        got = pipe(**call(pipe, prompt=PROMPTS, seed=SEED))
    finally:
        pipe.components[pipe.roles["denoiser"]] = dit
    assert max(diff(a, b) for a, b in zip(got, want, strict=True)) <= TOLERANCE
