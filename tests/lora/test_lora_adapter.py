"""The LoRA adapter's behaviour: errors, several LoRAs, exact unloading, hot scale changes, memory policies,
hub sources.

Where two paths compute the same maths with other rounding (branches vs fused weights), the comparison runs in
float64 as well and the float32 outputs are held to the float32 error bound of ``tests/tolerance.py``, not to
a gap seen on one CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import GOLDEN, GOLDEN_MODEL
from lora_cases import dit_pipe, expected_weight, layout, random_lora
from safetensors.torch import load_file, save_file
from tolerance import TINY_DIT_TERMS, check_float32, check_same_maths, float32_noise, pipeline_terms

import qi_core as qi
from qi_core import plugin_host
from qi_core.errors import InvalidInputError, ModelLoadError, WeightMismatchError
from qi_core.protocols import DenoiseInput, TextSegment
from qi_plugins.lora import LoRA, load_lora
from qi_plugins.qwen_image.loading import load_dit

DIT = GOLDEN_MODEL / "transformer"


@pytest.fixture
def dit():
    return load_dit(DIT)


def forward(dit):
    g = torch.Generator().manual_seed(5)
    x, txt = torch.randn(1, 16, 6, 8, generator=g), torch.randn(1, 5, 64, generator=g)
    dtype = next(dit.parameters()).dtype
    with torch.no_grad():
        return dit(DenoiseInput(latents=x.to(dtype), timestep=torch.tensor([500.0], dtype=dtype),
                                text=[TextSegment(txt.to(dtype))]))  # fmt: skip


def weights(dit):
    return {k: v.clone() for k, v in dit.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unmatched_keys_name_a_few_and_change_nothing(dit):
    before = weights(dit)
    foreign = {f"double_blocks.{i}.img_attn.qkv.lora_A.weight": torch.zeros(4, 64) for i in range(5)}
    foreign |= {k.replace("lora_A", "lora_B"): torch.zeros(64, 4) for k in foreign}
    with pytest.raises(WeightMismatchError) as e:
        LoRA(foreign).apply(dit_pipe(dit))
    msg = str(e.value)
    assert "5 of 5 LoRA modules match no module of the dit" in msg
    assert (
        "'double_blocks.0.img_attn.qkv', 'double_blocks.1.img_attn.qkv'" in msg
        and "Nothing was applied" in msg
    )
    assert "img_in" in msg  # shows what the model's layers are called
    # partly matching: refused too (strict), unless strict=False
    lora = random_lora(dit, seed=1)
    mixed = layout({"transformer_blocks.0.attn.to_q": lora["transformer_blocks.0.attn.to_q"]}, "peft") | {
        "transformer.nope.lora_A.weight": torch.zeros(4, 64),
        "transformer.nope.lora_B.weight": torch.zeros(64, 4),
    }
    with pytest.raises(
        WeightMismatchError, match=r"1 of 2 LoRA modules match no module of the dit \(e.g. 'nope'\)"
    ):
        LoRA(mixed).apply(dit_pipe(dit))
    assert same(weights(dit), before)
    LoRA(mixed, strict=False).apply(dit_pipe(dit))
    assert not torch.equal(
        dit.transformer_blocks[0].attn.to_q.weight, before["transformer_blocks.0.attn.to_q.weight"]
    )


def test_shape_mismatch_names_the_key(dit):
    bad = {"transformer_blocks.1.attn.to_k.lora_A.default.weight": torch.zeros(8, 96),
           "transformer_blocks.1.attn.to_k.lora_B.default.weight": torch.zeros(64, 8)}  # fmt: skip
    with pytest.raises(WeightMismatchError, match=r"'transformer_blocks.1.attn.to_k' has down \(8, 96\) and up "
                       r"\(64, 8\) \(rank 8\).*transformer_blocks.1.attn.to_k.weight is \(64, 64\)"):  # fmt: skip
        LoRA(bad).apply(dit_pipe(dit))
    norm = {"txt_norm.lora_A.weight": torch.zeros(2, 64), "txt_norm.lora_B.weight": torch.zeros(64, 2)}
    with pytest.raises(WeightMismatchError, match=r"targets txt_norm \(RMSNorm\), which has no 2-D weight"):
        LoRA(norm).apply(dit_pipe(dit))


def test_bad_arguments(dit):
    with pytest.raises(InvalidInputError, match="scale must be a number"):
        LoRA({}, scale="strong")
    with pytest.raises(InvalidInputError, match="target 'controlnet' is not a component"):
        LoRA(layout(random_lora(dit), "diffsynth"), target="controlnet").apply(dit_pipe(dit))
    lora = LoRA(layout(random_lora(dit), "diffsynth"))
    lora.apply(dit_pipe(dit))
    with pytest.raises(InvalidInputError, match="already applied"):
        lora.apply(dit_pipe(dit))


@pytest.mark.parametrize("fuse_a,fuse_b", [(True, True), (True, False), (False, True), (False, False)])
def test_several_loras_remove_in_any_order_exactly(dit, fuse_a, fuse_b):
    pipe = dit_pipe(dit)
    base_w, base_out = weights(dit), forward(dit)
    la, lb = random_lora(dit, seed=1), random_lora(dit, seed=2)
    a = load_lora(pipe, layout(la, "kohya"), 0.7, fuse=fuse_a)
    b = load_lora(pipe, layout(lb, "comfyui"), 1.5, fuse=fuse_b)
    assert pipe.adapters == [a, b]
    # both active: the weights (fused, or effective with branches) are base + 0.7 ΔA + 1.5 ΔB: the same maths
    # in float64, and each float32 output within the float32 bound of its float64 one
    dit64 = load_dit(DIT).double()
    load_lora(dit_pipe(dit64), layout(la, "kohya"), 0.7, fuse=fuse_a)
    load_lora(dit_pipe(dit64), layout(lb, "comfyui"), 1.5, fuse=fuse_b)
    both, both64 = load_dit(DIT), load_dit(DIT).double()
    for model in (both, both64):
        for name in la:
            w = model.get_submodule(name).weight
            w.data = expected_weight(expected_weight(w, *la[name], 0.7), *lb[name], 1.5)
    check_same_maths(forward(dit), forward(both), forward(dit64), forward(both64), terms=TINY_DIT_TERMS)
    a.remove(pipe)  # the first one first
    assert pipe.adapters == [b]
    only_b = load_dit(DIT)
    LoRA(layout(lb, "comfyui"), 1.5, fuse=fuse_b).apply(dit_pipe(only_b))
    if fuse_b:  # exactly as if A had never been fused
        assert same(weights(dit), weights(only_b))
    assert torch.equal(forward(dit), forward(only_b))
    b.remove(pipe)
    assert same(weights(dit), base_w) and torch.equal(forward(dit), base_out)
    assert not any(m._forward_hooks for m in dit.modules())


@pytest.mark.parametrize("fuse", [True, False])
def test_set_scale_hot_swaps(dit, fuse):
    lo = layout(random_lora(dit, seed=4), "diffsynth")
    lora = load_lora(dit_pipe(dit), lo, 0.3, fuse=fuse)
    lora.set_scale(1.2)
    fresh = load_dit(DIT)
    LoRA(lo, 1.2).apply(dit_pipe(fresh))
    if fuse:  # re-fused from the snapshot: the very float ops of fusing at 1.2 directly
        assert torch.equal(forward(dit), forward(fresh))
    else:  # branches vs fused weights: same maths (float64), float32 outputs within the float32 bound
        dit64, fresh64 = load_dit(DIT).double(), load_dit(DIT).double()
        load_lora(dit_pipe(dit64), lo, 0.3, fuse=False).set_scale(1.2)
        LoRA(lo, 1.2).apply(dit_pipe(fresh64))
        check_same_maths(forward(dit), forward(fresh), forward(dit64), forward(fresh64), terms=TINY_DIT_TERMS)
    lora.set_scale(0.0)
    assert (forward(dit) - forward(load_dit(DIT))).abs().max() <= (0 if fuse else 1e-6)


def test_exact_restore_off_subtracts(dit):
    base = weights(dit)
    lora = LoRA(layout(random_lora(dit, seed=8), "diffsynth"), exact_restore=False)
    lora.apply(dit_pipe(dit))
    lora.remove(dit_pipe(dit))
    after = weights(dit)
    assert max((after[k] - base[k]).abs().max().item() for k in base) <= 1e-6
    with pytest.raises(InvalidInputError, match="kept no copy"):
        lora = LoRA(layout(random_lora(dit, seed=8), "diffsynth"), exact_restore=False)
        lora.apply(dit_pipe(dit))
        lora.set_scale(2.0)


def test_branches_move_with_the_model_and_survive_a_policy_moving_the_layer(dit):
    """Branches are sub-modules (``.to()`` moves them); a policy that moves a layer's weight alone (here to
    another dtype, as fp8/bf16 storage or a device move would) still gets base + branch."""
    lo = random_lora(dit, seed=9)
    fused = load_dit(DIT).double()
    LoRA(layout(lo, "diffsynth")).apply(dit_pipe(fused))
    LoRA(layout(lo, "diffsynth"), fuse=False).apply(dit_pipe(dit))
    dit.double()
    branch = dit.transformer_blocks[0].attn.to_q.qi_lora
    assert all(p.dtype == torch.float64 for p in branch.parameters())
    assert "transformer_blocks.0.attn.to_q.weight" in dit.state_dict()  # the layer's own names are unchanged
    torch.testing.assert_close(forward(dit.double()), forward(fused), atol=1e-10, rtol=0)

    layer = dit.transformer_blocks[1].img_mlp.net[2]
    moved = layer.weight.data.float()
    layer.weight.data, layer.bias.data = moved, layer.bias.data.float()  # the branch stays float64
    x = torch.randn(3, 256)
    # base + branch, the branch cast to float32 at call time: within the float32 bound of the float64 value
    # (chain: 256 products of A or of W, then the rank-4 product of B and the sum: 262 terms)
    want = torch.nn.functional.linear(x.double(), moved.double(), layer.bias.data.double()) + layer.qi_lora(
        x.double()
    )
    check_float32(layer(x), want, terms=262)


def test_fusing_into_weights_that_are_not_loaded_is_refused(dit):
    dit.proj_out.weight = torch.nn.Parameter(torch.empty(64, 64, device="meta"), requires_grad=False)
    lo = layout(random_lora(load_dit(DIT), seed=1), "diffsynth")
    with pytest.raises(ModelLoadError, match=r"cannot fuse LoRA .* into proj_out: its weight is not loaded"):
        LoRA(lo).apply(dit_pipe(dit))
    LoRA(lo, fuse=False).apply(dit_pipe(dit))  # branches work there (created on the CPU)
    assert dit.proj_out.qi_lora is not None


ALPHA_LORA = GOLDEN / "models/extra/lora_alpha.safetensors"  # it targets img_mod.1 and top-level layers too
CALL = dict(prompt="a red kite", height=32, width=48, seed=3, num_inference_steps=2, cfg_scale=2.0,
            output_type="latent", progress_bar_cmd=lambda x: x)  # fmt: skip


@pytest.fixture(scope="module")
def resident_fused():
    """The resident fused result in float32, and in float64 from the same (float32) noise."""
    want = qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False, adapters=[LoRA(ALPHA_LORA)])(**CALL)
    pipe64 = qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False, torch_dtype=torch.float64,
                        adapters=[LoRA(ALPHA_LORA)])  # fmt: skip
    return want, float32_noise(pipe64)(**CALL)


@pytest.mark.parametrize(
    "memory,fuse",
    [("offload", True), ("offload", False), ("stream", True), ("stream", False), ("disk", False)],
)
def test_memory_policies(resident_fused, memory, fuse):
    """Under real memory policies (layers streamed, or read from disk), fused and unfused LoRAs give the
    resident fused result: both within the float32 bound of a whole 2-step call of the float64 result."""
    pipe = qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False, memory=memory,
                      adapters=[LoRA(ALPHA_LORA, fuse=fuse)])  # fmt: skip
    want, want64 = resident_fused
    for got in (pipe(**CALL), want):
        check_float32(got, want64, terms=pipeline_terms(2, decode=False), what=f"{memory}, fuse={fuse}")


def test_disk_policy_refuses_fusing():
    with pytest.raises(ModelLoadError, match=r"its weight is not loaded .* use LoRA\(\.\.\., fuse=False\)"):
        qi.compose(
            "qwen-image", model=GOLDEN_MODEL, progress=False, memory="disk", adapters=[LoRA(ALPHA_LORA)]
        )


def test_hub_source_is_fetched_once(tmp_path, monkeypatch):
    calls = []
    lo = layout(random_lora(load_dit(DIT), seed=2), "diffsynth")

    def fake(model_id, local_dir, patterns):
        calls.append((model_id, patterns))
        local_dir.mkdir(parents=True, exist_ok=True)
        save_file(lo, local_dir / patterns[0])

    monkeypatch.setenv("QI_MODEL_DIR", str(tmp_path))
    monkeypatch.setattr(plugin_host.host().registry.get("source", "modelscope"), "obj", fake)
    for _ in range(2):
        lora = LoRA("Org/Some-LoRA")
        assert lora.name == "Some-LoRA" and len(lora.weights) == 34  # every Linear of the tiny DiT
    assert calls == [("Org/Some-LoRA", ["model.safetensors"])]
    assert len(LoRA("Org/Some-LoRA:other.safetensors").weights) == 34
    assert calls[-1] == ("Org/Some-LoRA", ["other.safetensors"])
    assert load_file(tmp_path / "Org/Some-LoRA/model.safetensors").keys() == lo.keys()
