"""Step caches (``first-block-cache``, ``teacache``): threshold 0 is bit for bit the default runner (single
calls with CFG, batches, block hooks and ControlNets, Heun); a high threshold skips steps and a low one does not;
warmup, tail and max_skips bound the skips; each call starts with an empty cache; denoisers without stages run
as the default runner."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GOLDEN_MODEL

import qi_core as qi
from qi_core.errors import InvalidInputError
from qi_core.protocols import DenoiseInput, Injector, TextSegment
from qi_plugins.cache import FirstBlockCache, TeaCache
from qi_plugins.cache.runners import CacheWarning, has_stages, relative_l1

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
import tiny_helpers  # noqa: E402
from test_tiny_every_pipeline import inputs  # noqa: E402

offline = tiny_helpers.offline
tiny_cache_dir = tiny_helpers.tiny_cache_dir
tiny_pipeline = tiny_helpers.tiny_pipeline
pytestmark = pytest.mark.usefixtures("single_thread")

CALL = dict(prompt="a red cube on a wooden table", negative_prompt="blurry", cfg_scale=4.0, height=64, width=64,
            seed=3, output_type="np", progress_bar_cmd=lambda x: x)  # fmt: skip
STEPS = 20


@pytest.fixture(scope="module")
def pipe():
    return qi.compose(
        "qwen-image", model=GOLDEN_MODEL, device="cpu", torch_dtype=torch.float32, progress=False
    )


@pytest.fixture(scope="module")
def reference(pipe):
    """The default runner's output, {steps: image}."""
    pipe.step_runner = "batched"
    return {n: pipe(num_inference_steps=n, **CALL) for n in (STEPS, 8)}


@contextmanager
def runner(pipe, step_runner):
    """``pipe`` with another step runner for the block (shared pipelines are restored)."""
    before = pipe.step_runner
    pipe.step_runner = step_runner
    try:
        yield step_runner
    finally:
        pipe.step_runner = before


def diff(a, b) -> float:
    a, b = (np.stack(x) if isinstance(x, list) else np.asarray(x) for x in (a, b))
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


@pytest.mark.parametrize("make", [FirstBlockCache, TeaCache], ids=["fbcache", "teacache"])
@pytest.mark.parametrize("batch", [True, False], ids=["sides-together", "one-by-one"])
def test_threshold_zero_is_the_default_runner_bit_for_bit(pipe, reference, make, batch):
    with runner(pipe, make(0.0, batch=batch)) as r:
        out = pipe(num_inference_steps=STEPS, **CALL)
    assert r.last.skipped == 0 and r.last.computed == 2 * STEPS
    assert np.array_equal(out, reference[STEPS])


@pytest.mark.parametrize("make", [FirstBlockCache, TeaCache], ids=["fbcache", "teacache"])
def test_threshold_zero_with_heun_is_the_default_runner(pipe, make):
    ref = pipe(num_inference_steps=6, sampler="heun", **CALL)
    with runner(pipe, make(0.0, force=True)) as r:
        out = pipe(num_inference_steps=6, sampler="heun", **CALL)
    assert r.last.computed == 2 * (2 * 6 - 1)  # Heun: two evaluations per step, the last is an Euler step
    assert np.array_equal(out, ref)


@pytest.mark.parametrize(
    "make, high, low",
    [(FirstBlockCache, 0.8, 0.05), (TeaCache, 0.3, 0.01)],
    ids=["fbcache", "teacache"],
)
def test_a_high_threshold_skips_steps_and_a_low_one_does_not(pipe, reference, make, high, low):
    """On the golden tiny DiT (random weights) the first block's residual moves 0.3–0.6 (relative L1) per step
    of a 20-step run and block 0's modulated input 0.03–0.06: the thresholds sit on either side."""
    with runner(pipe, make(low)) as r:
        out = pipe(num_inference_steps=STEPS, **CALL)
    assert r.last.skipped == 0 and np.array_equal(out, reference[STEPS])
    with runner(pipe, make(high, max_skips=None)) as r:
        out = pipe(num_inference_steps=STEPS, **CALL)
    d = diff(out, reference[STEPS])
    print(f"{r!r}: {r.last.summary()}; max abs diff vs no cache {d:.3g}")
    assert r.last.skipped >= STEPS  # more than half of the 2 x 20 evaluations
    assert 0 < d < 0.5  # an image in [-1, 1]-ish float output: changed, not destroyed
    assert np.isfinite(out).all()


def test_warmup_tail_and_max_skips_bound_the_skips(pipe):
    with runner(pipe, FirstBlockCache(10.0, warmup=3, tail=2, max_skips=2)) as r:
        pipe(num_inference_steps=STEPS, **CALL)
    for side in ("positive", "negative"):
        skipped = r.last.skipped_steps(side)
        assert skipped and min(skipped) >= 3 and max(skipped) < STEPS - 2
        flags = [s in skipped for s in range(STEPS)]
        runs = "".join("x" if f else "." for f in flags).split(".")
        assert max(len(run) for run in runs) == 2, flags
    # a threshold no distance reaches: every eligible step from warmup to the tail, two in a row of three
    assert len(r.last.skipped_steps("positive")) == 10


def test_each_call_starts_with_an_empty_cache(pipe):
    with runner(pipe, FirstBlockCache(10.0)) as r:
        a = pipe(num_inference_steps=8, **CALL)
        first = r.last
        b = pipe(num_inference_steps=8, **CALL)
    assert r.last is not first and r.last.events == first.events
    assert np.array_equal(a, b)


def test_lightning_like_few_steps_leave_little_to_skip(pipe, reference):
    """8 steps with the defaults (warmup 2, tail 1): at most 5 of 8 steps are eligible, and on this model none
    is close enough to the last computed one to be skipped."""
    with runner(pipe, FirstBlockCache(10.0)) as r, pytest.warns(CacheWarning, match="8 steps are too few"):
        out = pipe(num_inference_steps=8, **CALL)  # off (and said so) on a few-step schedule …
    assert r.last.off and r.last.skipped == 0 and np.array_equal(out, reference[8])
    with runner(pipe, FirstBlockCache(force=True)) as r:
        out = pipe(num_inference_steps=8, **CALL)  # … unless forced: the defaults find nothing to skip here
    print(f"8 steps, {r!r}: {r.last.summary()}")
    assert not r.last.off and r.last.skipped == 0 and np.array_equal(out, reference[8])


def test_registered_by_name_and_composed(pipe):
    for name, cls in (
        ("first-block-cache", FirstBlockCache),
        ("fbcache", FirstBlockCache),
        ("teacache", TeaCache),
    ):
        assert isinstance(pipe.part("step_runner", name), cls)
    fb = pipe.part("step_runner", "first-block-cache")
    assert (fb.threshold, fb.warmup, fb.tail, fb.max_skips, fb.hooks) == (0.08, 2, 1, 3, "cache")
    composed = qi.compose("qwen-image", model=GOLDEN_MODEL, device="cpu", torch_dtype=torch.float32,
                          progress=False, step_runner="first-block-cache")  # fmt: skip
    assert isinstance(composed.step_runner, FirstBlockCache)
    composed.batch_cfg = False  # the pipeline's switch reaches the cache's batch flag
    assert composed.step_runner.batch is False


@pytest.mark.parametrize(
    "kw",
    [dict(threshold=-0.1), dict(threshold=float("nan")), dict(threshold=True), dict(warmup=-1),
     dict(tail=1.5), dict(max_skips=-2), dict(hooks="skip")],
)  # fmt: skip
def test_bad_options_are_refused(kw):
    with pytest.raises(InvalidInputError):
        FirstBlockCache(**kw)


class AddToEveryBlock(Injector):
    """A block hook on the positive side (as a ControlNet adds its residuals): each block adds a small fixed
    pattern to the image stream."""

    name = "test-block-hook"

    def denoise_input(self, pipe, state, side, step, inp):
        if side == "positive":
            g = torch.Generator().manual_seed(5)
            noise = torch.randn(1, 16, 64, generator=g) * 0.05

            inp.block_hooks.append(lambda i, img, txt: img + (i + 1) * noise)


def test_block_hooks_cached_or_always_computed(reference):
    pipe = qi.compose(
        "qwen-image", model=GOLDEN_MODEL, device="cpu", torch_dtype=torch.float32, progress=False
    )
    pipe.add_injector(AddToEveryBlock())
    ref = pipe(num_inference_steps=STEPS, **CALL)
    assert diff(ref, reference[STEPS]) > 1e-3  # the hook does change the image
    with runner(pipe, FirstBlockCache(0.0)):
        assert np.array_equal(pipe(num_inference_steps=STEPS, **CALL), ref)
    with runner(pipe, FirstBlockCache(10.0, hooks="compute")) as r:
        pipe(num_inference_steps=STEPS, **CALL)
    assert r.last.skipped_steps("positive") == [] and r.last.skipped_steps("negative")
    with runner(pipe, FirstBlockCache(10.0, hooks="cache")) as r:
        out = pipe(num_inference_steps=STEPS, **CALL)
    assert r.last.skipped_steps("positive") == r.last.skipped_steps("negative") != []
    assert np.isfinite(out).all()


def test_controlnet_threshold_zero_exact_and_skips(tiny_pipeline):
    pipe = tiny_pipeline("qwen-image-blockwise-controlnet-canny")
    call = dict(CALL, num_inference_steps=8, **inputs(pipe))
    ref = pipe(**call)
    with runner(pipe, FirstBlockCache(0.0, force=True)):
        assert np.array_equal(pipe(**call), ref)
    with runner(pipe, FirstBlockCache(10.0, force=True)) as r:
        out = pipe(**call)
    print(f"ControlNet, 8 steps, {r!r}: {r.last.summary()}; max abs diff {diff(out, ref):.3g}")
    assert r.last.skipped > 0 and np.isfinite(out).all()


@pytest.mark.parametrize("make", [FirstBlockCache, TeaCache], ids=["fbcache", "teacache"])
def test_batches_threshold_zero_exact_and_labels_per_item(tiny_pipeline, make):
    """A batch (two prompts, two images each) runs stacked; labels are (item, side); threshold 0 is the
    default runner's batch bit for bit, and a group of stacked inputs skips only together."""
    pipe = tiny_pipeline("qwen-image")
    call = dict(CALL, prompt=["a red cube", "a small blue sphere on an old wooden table"], num_images_per_prompt=2,
                num_inference_steps=8)  # fmt: skip
    ref = pipe(**call)
    with runner(pipe, make(0.0, force=True)) as r:
        out = pipe(**call)
    assert all(np.array_equal(a, b) for a, b in zip(out, ref, strict=True))
    labels = {e[1] for e in r.last.events}
    assert labels == {(k, side) for k in range(4) for side in ("positive", "negative")}
    with runner(pipe, make(10.0, force=True)) as r:
        out = pipe(**call)
    by_step = {}
    for step, _, skipped, _ in r.last.events:
        by_step.setdefault(step, set()).add(skipped)
    assert all(len(v) == 1 for v in by_step.values())  # one stacked group: all skip or none
    assert r.last.skipped > 0 and all(np.isfinite(x).all() for x in out)


def test_a_denoiser_without_stages_runs_as_the_default_runner():
    class Plain:
        def __call__(self, inp):
            return inp.latents * 2

    inp = DenoiseInput(latents=torch.ones(1, 16, 4, 4), timestep=torch.tensor([500.0]),
                       text=[TextSegment(torch.zeros(1, 3, 64))])  # fmt: skip
    assert not has_stages(Plain())
    out = FirstBlockCache(10.0).run(Plain(), {"positive": inp}, state=None, step=0, sigma=torch.tensor(1.0))
    assert torch.equal(out["positive"], inp.latents * 2)


def test_relative_l1():
    a = torch.tensor([1.0, -2.0, 3.0])
    assert relative_l1(a, a) == 0
    assert relative_l1(a * 1.1, a) == pytest.approx(0.1, rel=1e-6)
    assert relative_l1(a, torch.zeros(3)) == float("inf")


def test_options_by_name_through_a_dict():
    from qi_core.errors import InvalidInputError
    from qi_core.pipeline import build_part

    r = build_part("step_runner", {"name": "first-block-cache", "threshold": 0.2, "force": True})
    assert isinstance(r, FirstBlockCache) and r.threshold == 0.2 and r.force
    assert isinstance(build_part("step_runner", "teacache"), TeaCache)
    with pytest.raises(InvalidInputError, match="needs its registered 'name'"):
        build_part("step_runner", {"threshold": 0.2})
