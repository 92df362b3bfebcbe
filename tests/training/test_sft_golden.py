"""The ``sft`` task reproduces DiffSynth-Studio's FlowMatchSFTLoss (golden case ``sft_loss``): the drawn
timestep and noise, every intermediate, the loss and five parameter gradients. Batching and
``direct_distill`` are checked against the single-sample loss and the inference pipeline."""

from __future__ import annotations

import pytest
import torch
from conftest import GOLDEN_MODEL, golden_case
from PIL import Image
from tolerance import F32_ISLAND_TERMS, TINY_VAE_TERMS, check_same_maths, float32_bound, pipeline_terms
from training_helpers import one_thread  # noqa: F401

import qi_core as qi
from qi_plugins.sft.batching import collate
from qi_plugins.sft.encoding import encode_sample
from qi_plugins.sft.tasks import SFT, DirectDistill

GROUPS = {"input_latents": "latents", "noise": "latents", "noisy_latents": "latents",
          "training_target": "latents", "noise_pred": "latents", "prompt_emb": "text_embedding",
          "prompt_emb_mask": "text_embedding", "training_weight": "sigmas_and_weights",
          "timestep": "timesteps", "timestep_id": "timesteps", "loss": "loss"}  # fmt: skip


@pytest.fixture(scope="module")
def pipe():
    return qi.compose(
        "qwen-image", model=GOLDEN_MODEL, device="cpu", torch_dtype=torch.float32, progress=False
    )


def golden_sample():
    case, want, folder = golden_case("sft_loss")
    with Image.open(folder / "image.png") as im:
        image = im.convert("RGB")
    return case, want, {"image": image, "prompt": case["inputs"]["prompt"], "_where": "golden"}


def test_sft_loss_matches_golden(pipe):
    case, want, sample = golden_sample()
    tol = {g: v["recommended_atol"] for g, v in case["tolerances"].items()}
    got: dict[str, torch.Tensor] = {}
    pipe.tracer = lambda k, v: got.__setitem__(k, v.detach().clone())
    dit = pipe.components["dit"]
    try:
        cond = encode_sample(pipe, sample)
        dit.requires_grad_(True)
        dit.zero_grad(set_to_none=True)
        loss = SFT().loss(pipe, cond, torch.Generator().manual_seed(case["inputs"]["loss_seed"]))
        loss.backward()
    finally:
        pipe.tracer = None
        dit.requires_grad_(False)
    got["prompt_emb_mask"] = cond.text[0].mask
    params = dict(dit.named_parameters())
    checked = []
    for name, ref in want.items():
        if name.startswith("grad."):
            value, atol = params[name.removeprefix("grad.")].grad, tol["gradients"]
        else:
            value, atol = got[name], tol[GROUPS[name]]
        assert value.shape == ref.shape, name
        diff = (value.double() - ref.double()).abs().max().item()
        assert diff <= atol, f"{name}: max |diff| {diff:.3g} > {atol}"
        checked.append(name)
    assert len(checked) == len(want) == 16
    assert int(got["timestep_id"]) == int(want["timestep_id"])  # the draw order is the seed's
    dit.zero_grad(set_to_none=True)


def test_batch_of_two_is_the_mean_of_two_singles(pipe):
    """Batching (with prompts of different lengths, padded) changes nothing but the reduction: the same in
    float64 (up to the loss's own float32 reduction, which the task keeps in a float64 run too), and each
    float32 loss within the float32 bound of its float64 one (text encoder, VAE encoder, DiT and the mean of
    the squared errors; ``tests/tolerance.py``)."""
    _, _, sample = golden_sample()
    other = {**sample, "prompt": "a much longer prompt about a red apple on a wooden table", "_where": "b"}
    pipe64 = qi.compose(
        "qwen-image", model=GOLDEN_MODEL, device="cpu", torch_dtype=torch.float64, progress=False
    )
    out = []
    for p in (pipe, pipe64):
        a, b = encode_sample(p, sample), encode_sample(p, other)
        assert a.text[0].emb.shape[1] != b.text[0].emb.shape[1]
        task = SFT()
        with torch.no_grad():
            singles = [task.loss(p, c, torch.Generator().manual_seed(s)) for c, s in ((a, 1), (b, 2))]
            both = task.loss(
                p, collate([a, b]), [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
            )
        out += [float(both), float(sum(singles)) / 2]
    terms = pipeline_terms(1, decode=False) + TINY_VAE_TERMS + a.latents.numel()
    check_same_maths(*out, terms=terms, f64_atol=float32_bound(out[2], terms=F32_ISLAND_TERMS))


def test_timestep_boundaries_restrict_the_draw(pipe):
    _, _, sample = golden_sample()
    cond = encode_sample(pipe, sample)
    task = SFT()
    task.min_boundary, task.max_boundary = 0.9, 1.0
    ids = []
    pipe.tracer = lambda k, v: ids.append(int(v)) if k == "timestep_id" else None
    try:
        with torch.no_grad():
            for s in range(8):
                task.loss(pipe, cond, torch.Generator().manual_seed(s))
    finally:
        pipe.tracer = None
    assert ids and all(900 <= i < 1000 for i in ids)


def test_direct_distill_runs_the_inference_trajectory(pipe):
    """direct_distill's student trajectory is exactly what the pipeline generates from the row's seed with the
    seed's training schedule (μ = 0.8), so its loss is mse(generated latents, teacher latents)."""
    _, _, sample = golden_sample()
    row = {**sample, "seed": "7", "num_inference_steps": "3", "rand_device": "cpu"}
    task = DirectDistill()
    cond = task.encode(pipe, row, extra_inputs=("seed", "num_inference_steps", "rand_device"))
    with torch.no_grad():
        loss = task.loss(pipe, cond, None)
        latents = pipe(prompt=sample["prompt"], height=64, width=80, seed=7, num_inference_steps=3, cfg_scale=1.0,
                       exponential_shift_mu=0.8, output_type="latent", progress_bar_cmd=lambda x: x)  # fmt: skip
    want = torch.nn.functional.mse_loss(latents.float(), cond.latents.float())
    assert abs(float(loss) - float(want)) < 1e-5


def test_direct_distill_names_missing_columns(pipe):
    _, _, sample = golden_sample()
    with pytest.raises(qi.errors.InvalidInputError, match="num_inference_steps"):
        DirectDistill().encode(pipe, {**sample, "seed": 1}, extra_inputs=("seed",))
