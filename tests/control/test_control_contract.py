"""Contract: the control plugins reach the denoiser only through documented ``DenoiseInput`` fields — EliGen
through ``text`` + ``attention_mask``, the ControlNets through ``block_hooks``, the context image through
``images`` — and the core names none of them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN_MODEL, golden_call, golden_case
from control_golden import compose_for, golden_run, run

import qi_core as qi
from qi_core.protocols import DenoiseInput
from qi_plugins.eligen.injector import attention_mask, image_regions
from qi_plugins.in_context.injector import PROMPT_PREFIX, ContextImage

CORE = Path(qi.__file__).parent
VARIANT_WORDS = ("eligen", "controlnet", "blockwise", "context_image", "in_context", "entity")


def _code_words(source: str) -> set[str]:
    """Identifiers and non-docstring string constants of a module (comments and docstrings excluded)."""
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                docstrings.add(id(body[0].value))
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.arg):
            words.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            words.add(node.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.add(node.value)
    return words


def test_core_names_no_control_variant():
    files = sorted(CORE.glob("*.py"))
    assert files
    for f in files:
        text = f.read_text()
        assert "eligen" not in text.lower(), f"{f.name} mentions EliGen"
        hits = [w for w in _code_words(text) for v in VARIANT_WORDS if v in w.lower()]
        assert not hits, f"{f.name} has variant names in its code: {hits}"


def _replay(pipe, call: dict, **changes) -> torch.Tensor:
    """Run the real DiT on a DenoiseInput rebuilt from a recorded call (fields optionally changed)."""
    fields = {k: call[k] for k in ("latents", "timestep", "text", "images", "attention_mask", "block_hooks",
                                   "extras", "extra_timesteps", "target_frames")}  # fmt: skip
    fields.update(changes)
    with torch.inference_mode():
        return pipe.components["dit"](DenoiseInput(**fields))


@pytest.fixture(scope="module")
def recorded():
    out = {}
    for name in ("eligen", "eligen_negative", "controlnet", "context_image"):
        pipe, case, _, _, _, got, calls = golden_run(name)
        out[name] = (pipe, case, got, calls)
    return out


@pytest.mark.parametrize("name", ["eligen", "eligen_negative"])
def test_eligen_enters_through_text_and_attention_mask(recorded, name):
    pipe, case, got, calls = recorded[name]
    pos, neg = calls[0], calls[1]  # step 0: positive side first
    n = len(case["call"]["eligen_entity_prompts"])
    for call in (pos, neg):
        assert call["images"] == [] and call["block_hooks"] == [] and call["extras"] == {}
        assert call["extra_timesteps"] == []
    # positive: [entity 0, …, entity n-1, global]; every segment starts at the DiT's default RoPE offset
    assert len(pos["text"]) == n + 1 and all(s.rope_offset is None for s in pos["text"])
    for k in range(n):
        assert torch.equal(pos["text"][k].emb, got[f"entity_prompt_emb_{k}"])
    assert torch.equal(pos["text"][-1].emb, got["prompt_emb"])
    S = sum(s.emb.shape[1] for s in pos["text"]) + pos["latents"].shape[-2] * pos["latents"].shape[-1] // 4
    assert pos["attention_mask"].shape == (1, 1, S, S)
    if case["call"]["eligen_enable_on_negative"]:
        assert len(neg["text"]) == n + 1
        assert all(torch.equal(s.emb, got["negative_prompt_emb"]) for s in neg["text"])
        # same regions: the first row of each entity block sees the same image tokens on both sides
        ln, lp = neg["text"][0].emb.shape[1], [s.emb.shape[1] for s in pos["text"]]
        Ln, Lp = ln * (n + 1), sum(lp)
        for k in range(n):
            row_neg = neg["attention_mask"][0, 0, k * ln, Ln:]
            row_pos = pos["attention_mask"][0, 0, sum(lp[:k]), Lp:]
            assert torch.equal(row_neg, row_pos)
    else:
        assert len(neg["text"]) == 1 and neg["attention_mask"] is None
    # the DenoiseInput carries everything: replaying it gives the recorded output; without the mask it differs
    assert torch.equal(_replay(pipe, pos), pos["out"])
    assert (_replay(pipe, pos, attention_mask=None) - pos["out"]).abs().max() > 1e-3


def test_eligen_mask_layout(recorded):
    """Blocks of the recorded additive mask, checked against a direct reading of the golden entity masks."""
    _, case, got, calls = recorded["eligen"]
    mask = calls[0]["attention_mask"][0, 0]
    lens = [s.emb.shape[1] for s in calls[0]["text"]]
    starts = [sum(lens[:i]) for i in range(len(lens) + 1)]
    L = starts[-1]
    ent = got["entity_masks"][0, :, 0]  # (n, h, w)
    h, w = ent.shape[-2:]
    for k in range(len(lens)):
        for j in range(len(lens)):
            block = mask[starts[k] : starts[k + 1], starts[j] : starts[j + 1]]
            assert bool((block == 0).all()) if k == j else bool(torch.isinf(block).all())
        if k == len(lens) - 1:  # global prompt ↔ every image token
            assert bool((mask[starts[k] : L, L:] == 0).all()) and bool((mask[L:, starts[k] : L] == 0).all())
            continue
        want = torch.tensor([bool(ent[k, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].any())
                             for r in range(h // 2) for c in range(w // 2)])  # fmt: skip
        assert 0 < int(want.sum()) < want.numel()  # a real region: neither empty nor everything
        assert torch.equal(mask[starts[k], L:] == 0, want)
        assert torch.equal(mask[L:, starts[k]] == 0, want)
    assert bool((mask[L:, L:] == 0).all())  # image ↔ image unrestricted


def test_eligen_regions_cover_extra_image_segments():
    masks = torch.zeros(1, 4, 6)
    masks[0, 0, 0] = 1  # touches only the top-left 2x2 patch
    same = image_regions(masks, [(1, 2, 3), (1, 2, 3)])
    assert same.tolist() == [[True, False, False, False, False, False] * 2]  # tiled over a same-size segment
    other = image_regions(masks, [(1, 2, 3), (1, 4, 6)])
    assert other.shape == (1, 6 + 24) and bool(other[0, 6]) and int(other[0, 6:].sum()) == 4
    m = attention_mask([2], 3, same, torch.float32)
    assert m.shape == (1, 1, 5 + 12, 5 + 12)


def test_controlnet_residuals_enter_through_block_hooks(recorded):
    pipe, case, _, calls = recorded["controlnet"]
    steps = case["call"]["num_inference_steps"]
    active = set(case["controlnet_active_steps"][0])
    for i in range(steps):
        for call in calls[2 * i : 2 * i + 2]:
            assert call["attention_mask"] is None and call["images"] == [] and len(call["text"]) == 1
            assert len(call["block_hooks"]) == (1 if i in active else 0)
    call = calls[2 * min(active)]
    assert torch.equal(_replay(pipe, call), call["out"])
    assert (_replay(pipe, call, block_hooks=[]) - call["out"]).abs().max() > 1e-3
    # the residual goes to the target tokens only; appended tokens pass through untouched
    hook = call["block_hooks"][0]
    n, D = hook.n_target, pipe.components["dit"].config.inner_dim
    img = torch.randn(1, n + 5, D)
    out = hook(0, img, torch.randn(1, 3, D))
    assert torch.equal(out[:, n:], img[:, n:]) and not torch.equal(out[:, :n], img[:, :n])


def test_context_image_enters_as_an_image_segment(recorded):
    pipe, _, got, calls = recorded["context_image"]
    for call in calls:
        assert call["attention_mask"] is None and call["block_hooks"] == [] and len(call["text"]) == 1
        (seg,) = call["images"]
        assert torch.equal(seg.latents, got["context_latents"])
        assert seg.frame is None and seg.modulation == 0 and not seg.rope_from_target  # frame = position = 1
    assert torch.equal(_replay(pipe, calls[0]), calls[0]["out"])


def test_prompt_prefix_comes_from_the_recipe_not_the_bare_injector():
    case, want, folder = golden_case("context_image")
    args = golden_call(case, folder)
    assert args["prompt"].startswith(PROMPT_PREFIX)
    bare_prompt = args["prompt"][len(PROMPT_PREFIX) :]
    # the recipe adds the prefix (once): the unprefixed prompt gives the golden embedding
    recipe = compose_for("context_image", case)
    _, got, _ = run(recipe, {**args, "prompt": bare_prompt, "num_inference_steps": 2}, output_type="latent")
    assert (got["prompt_emb"] - want["prompt_emb"]).abs().max() < 2e-5
    # the bare injector on the base recipe adds none, and still reproduces the golden call given the prefix
    base = qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False)
    base.add_injector(ContextImage())
    _, got, _ = run(base, {**args, "prompt": bare_prompt, "num_inference_steps": 2}, output_type="latent")
    assert got["prompt_emb"].shape != want["prompt_emb"].shape
    _, got, _ = run(base, args, output_type="latent")
    assert (got["final_latents"] - want["final_latents"]).abs().max() < case["tolerances"]["latents"][
        "recommended_atol"
    ]
