"""The loop's registered parts, replaced by a plugin written from docs/hooks.md (outside the package), give the
defaults' output; parts are chosen at compose time and per call; bad names fail before any weight loads."""

from __future__ import annotations

import importlib.util
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import GOLDEN, GOLDEN_MODEL, golden_call, golden_case

import qi_core as qi
from qi_core import plugin_host
from qi_core.errors import UnknownNameError

QUIET = {"output_type": "np", "progress_bar_cmd": lambda x: x}


@pytest.fixture(scope="module")
def third_party(tmp_path_factory):
    """The fixture plugin imported from a folder outside the repository, registered in-process."""
    folder = tmp_path_factory.mktemp("site")
    src = GOLDEN.parent / "plugins" / "qi_fixture_loop_parts.py"
    shutil.copy(src, folder / src.name)
    spec = importlib.util.spec_from_file_location("qi_fixture_loop_parts", folder / src.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    info = qi.register_plugin(module, "fixture_loop_parts")
    assert info.status == "ok", info.error
    yield module
    plugin_host.host().unregister_plugin("fixture_loop_parts")
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def t2i():
    case, _, folder = golden_case("t2i")
    return golden_call(case, folder)


def compose(**kw):
    return qi.compose("qwen-image", model=GOLDEN_MODEL, device="cpu", torch_dtype=torch.float32,
                      progress=False, **kw)  # fmt: skip


def compose64(**kw):
    return qi.compose("qwen-image", model=GOLDEN_MODEL, device="cpu", torch_dtype=torch.float64,
                      progress=False, **kw)  # fmt: skip


def test_third_party_parts_reproduce_the_defaults(third_party, t2i):
    ref = compose()(**t2i, **QUIET)
    pipe = compose(guidance="fixture-cfg", sampler="fixture-euler", step_runner="fixture-one-by-one")
    got = pipe(**t2i, **QUIET)
    diff = np.abs(got - ref).max()
    print(f"third-party guider+sampler+step runner vs defaults, golden t2i: max abs diff {diff:.3g}")
    assert diff <= 1e-6


def test_third_party_attention_backend(third_party, t2i):
    """Naive softmax attention is the same maths as SDPA in another order: float64 shows the maths agree
    (≤ 1e-10); in float32 the image may move by rounding, bounded by the golden t2i image tolerance (1e-4,
    set from its float32-vs-float64 run)."""
    for compose_, bound, what in ((compose64, 1e-10, "float64"), (compose, 1e-4, "float32")):
        ref = compose_()(**t2i, **QUIET)
        got = compose_(attention="fixture-naive")(**t2i, **QUIET)
        diff = np.abs(got - ref).max()
        print(f"naive attention vs sdpa, {what} pipeline: max abs diff {diff:.3g}")
        assert diff <= bound


def test_positive_only_guider_equals_cfg_scale_one(third_party, t2i):
    pipe = compose()
    ref = pipe(**{**t2i, "cfg_scale": 1.0}, **QUIET)
    seen = []
    pipe.tracer = lambda k, v: seen.append(k)
    got = pipe(**t2i, guidance="fixture-positive-only", **QUIET)
    assert np.array_equal(got, ref)
    assert not any(k.startswith("noise_pred_nega") or k == "negative_prompt_emb" for k in seen)


def test_default_parts_give_the_same_bytes_as_the_inline_loop(t2i):
    """euler + cfg + batched: step by step the latents are ``x + v·(σ' − σ)`` with ``v = neg + s·(pos − neg)``
    of the traced predictions, bit for bit."""
    pipe = compose()
    got: dict[str, torch.Tensor] = {}
    pipe.tracer = lambda k, v: got.__setitem__(k, v.clone())
    pipe(**t2i, **QUIET)
    sigmas = got["sigmas"].tolist() + [0.0]
    x = got["latents_init"]
    for i in range(t2i["num_inference_steps"]):
        pos, neg = got[f"noise_pred_posi_step_{i}"], got[f"noise_pred_nega_step_{i}"]
        v = neg + t2i["cfg_scale"] * (pos - neg)
        assert torch.equal(v, got[f"noise_pred_step_{i}"])
        x = x + v * (torch.tensor(sigmas[i + 1]) - torch.tensor(sigmas[i]))
        assert torch.equal(x, got[f"latents_step_{i}"])
    assert torch.equal(x, got["final_latents"])


def test_per_call_parts_override_and_restore(t2i):
    pipe = compose()
    small = {**t2i, "num_inference_steps": 2}
    euler = pipe(**small, **QUIET)
    heun = pipe(**small, sampler="heun", **QUIET)
    assert not np.array_equal(euler, heun)
    assert np.array_equal(pipe(**small, **QUIET), euler)  # the per-call choice did not stick


def test_unknown_part_names_fail_before_loading():
    with pytest.raises(UnknownNameError, match="guider"):
        qi.compose("qwen-image", model="/nonexistent/folder", guidance="cfg-typo")
    with pytest.raises(UnknownNameError, match="sampler"):
        qi.compose("qwen-image", model="/nonexistent/folder", sampler="eulr")
