"""End-to-end runs on the golden tiny model: LoRA and full training overfit one image, what they save loads
back and changes the output, batches bucket sizes, split training equals one stage, the memory options."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import GOLDEN
from PIL import Image
from training_helpers import MODEL, args_for, fixed_loss, make_dataset, one_thread, read  # noqa: F401

import qi_core as qi
from qi_core.cli import main
from qi_core.errors import InvalidInputError
from qi_plugins.sft import train
from qi_plugins.sft.data import BadRowError
from qi_plugins.sft.encoding import encode_sample
from qi_plugins.sft.metrics import read_log
from qi_plugins.sft.models import FP8Linear
from qi_plugins.sft.validate import load_trained

CALL = dict(prompt="a picture number 0", height=32, width=32, num_inference_steps=2, seed=1, output_type="np",
            progress_bar_cmd=lambda x: x)  # fmt: skip


@pytest.fixture(scope="module")
def one_image(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("one"), [(32, 32)])


def base_pipe():
    return qi.compose("qwen-image", model=MODEL, progress=False)


def overfit_check(ds, checkpoint):
    """Fixed-draw loss on the training image before/after loading the checkpoint, and the generated images."""
    pipe = base_pipe()
    with Image.open(ds / "images" / "0.png") as im:
        cond = encode_sample(pipe, {"image": im.convert("RGB"), "prompt": "a picture number 0"})
    before, image_before = fixed_loss(pipe, cond), pipe(**CALL)
    kind = load_trained(pipe, checkpoint)
    after, image_after = fixed_loss(pipe, cond), pipe(**CALL)
    return kind, before, after, np.abs(image_after - image_before).max()


def test_lora_run_overfits_saves_the_seed_layout_and_validates(one_image, tmp_path):
    out = tmp_path / "lora"
    argv = ["train", "--dataset_base_path", str(one_image), "--dataset_metadata_path",
            str(one_image / "metadata.csv"), "--model", MODEL, "--lora_base_model", "dit", "--lora_rank", "8",
            "--lora_target_modules", args_for(one_image, out)["lora_target_modules"], "--learning_rate", "1e-2",
            "--dataset_repeat", "60", "--save_steps", "30", "--output_path", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["step-30.safetensors", "step-60.safetensors"]
    sd = read(out / "step-60.safetensors")
    assert "transformer_blocks.0.attn.to_q.lora_A.default.weight" in sd  # the seed's key layout
    assert all(k.endswith((".lora_A.default.weight", ".lora_B.default.weight")) for k in sd)
    assert sd["transformer_blocks.1.img_mod.1.lora_B.default.weight"].shape == (6 * 64, 8)
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 61)) and all(r["samples_per_s"] > 0 for r in log)
    assert (out / "logs" / "train_log.csv").read_text().startswith("step,epoch,loss,lr")
    kind, before, after, changed = overfit_check(one_image, out / "step-60.safetensors")
    assert kind == "lora"
    assert after <= 0.5 * before, f"fixed-draw loss {before:.3f} → {after:.3f}"
    assert changed > 1e-3
    png = tmp_path / "v.png"
    argv = ["validate", "a picture number 0", "--model", MODEL, "--checkpoint", str(out), "--height", "32",
            "--width", "32", "--steps", "2", "--out", str(png)]  # fmt: skip
    assert main(argv) == 0
    with Image.open(png) as im:
        assert im.size == (32, 32) and "lora:step-60.safetensors" in im.info["qi:weights"]


def test_full_run_overfits_and_loads_as_dit_weights(one_image, tmp_path):
    out = tmp_path / "full"
    result = train(args_for(one_image, out, trainable_models="dit", learning_rate=1e-3, dataset_repeat=60))
    assert result.global_step == 60 and [p.name for p in result.checkpoints] == ["epoch-0.safetensors"]
    sd = read(out / "epoch-0.safetensors")
    assert set(sd) == set(base_pipe().components["dit"].state_dict())  # official DiT keys, loadable as is
    kind, before, after, changed = overfit_check(one_image, out / "epoch-0.safetensors")
    assert kind == "full"
    assert after <= 0.5 * before, f"fixed-draw loss {before:.3f} → {after:.3f}"
    assert changed > 1e-3


def test_batches_bucket_same_size_samples(tmp_path):
    ds = make_dataset(tmp_path / "ds", [(32, 32), (48, 32), (32, 32)])
    result = train(args_for(ds, tmp_path / "out", lora_base_model="dit", lora_rank=4, batch_size=2))
    log = read_log(tmp_path / "out")
    assert result.global_step == 2 and sorted(r["samples"] for r in log) == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in log)


def test_split_training_equals_one_stage(tmp_path):
    ds = make_dataset(tmp_path / "ds", [(32, 32), (32, 48)])
    common = dict(lora_base_model="dit", lora_rank=4, max_steps=2)
    one = train(args_for(ds, tmp_path / "one", **common))
    cache = train(args_for(ds, tmp_path / "cache", task="sft:data_process", **common))
    assert cache.components == ["text_encoder", "vae"] and len(cache.cache_files) == 2
    assert sorted(p.relative_to(tmp_path / "cache").as_posix() for p in cache.cache_files) == [
        "0/0.safetensors", "0/1.safetensors"]  # fmt: skip
    two = train(args_for(tmp_path / "cache", tmp_path / "two", task="sft:train", dataset_metadata_path=None,
                         **common))  # fmt: skip
    assert two.components == ["dit"]
    assert two.losses[0] == pytest.approx(one.losses[0], abs=1e-6)
    assert two.losses[1] == pytest.approx(one.losses[1], abs=1e-5)


def test_gradient_checkpointing_changes_memory_not_maths(one_image, tmp_path):
    common = dict(lora_base_model="dit", lora_rank=4, dataset_repeat=4, learning_rate=1e-3)
    plain = train(args_for(one_image, tmp_path / "a", **common))
    ckpt = train(args_for(one_image, tmp_path / "b", use_gradient_checkpointing=True,
                          use_gradient_checkpointing_offload=True, **common))  # fmt: skip
    wa, wb = read(plain.checkpoints[-1]), read(ckpt.checkpoints[-1])
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


def test_differential_lora_and_fp8_storage(one_image, tmp_path):
    from qi_plugins.lora.formats import read_lora

    preset = GOLDEN / "models" / "extra" / "lora_diffsynth.safetensors"
    common = dict(lora_base_model="dit", lora_rank=4, dataset_repeat=4, learning_rate=1e-3)
    diff = train(args_for(one_image, tmp_path / "a", preset_lora_path=str(preset), fp8_models="text_encoder",
                          gradient_accumulation_steps=2, **common))  # fmt: skip
    assert diff.global_step == 2
    base = base_pipe().components["dit"].transformer_blocks[0].attn.to_q.weight
    delta = read_lora(str(preset))["transformer_blocks.0.attn.to_q"].delta()
    fused = diff.pipe.components["dit"].transformer_blocks[0].attn.to_q.base_layer.weight
    assert delta.abs().max() > 1e-3 and (fused - (base + delta)).abs().max() < 1e-6  # fused before training
    saved = read(diff.checkpoints[-1])
    assert all(".lora_A.default." in k or ".lora_B.default." in k for k in saved)  # only the new LoRA
    te = diff.pipe.components["text_encoder"].model
    fp8 = [m for m in te.modules() if isinstance(m, FP8Linear)]
    assert fp8 and all(
        m.weight_fp8.dtype == torch.float8_e4m3fn and m.weight.dtype == torch.float32 for m in fp8
    )
    assert not any(k.endswith("weight_fp8") for k in te.state_dict())  # frozen weights are never saved
    # the LoRA base itself in fp8: LoRA weights stay trainable float32
    lo = train(args_for(one_image, tmp_path / "b", fp8_models="dit", max_steps=2, **common))
    to_q = lo.pipe.components["dit"].transformer_blocks[0].attn.to_q
    assert isinstance(to_q.base_layer, FP8Linear) and to_q.lora_A.default.weight.dtype == torch.float32
    assert to_q.lora_A.default.weight.requires_grad and all(np.isfinite(lo.losses))
    lora_b = read(lo.checkpoints[-1])["transformer_blocks.0.attn.to_q.lora_B.default.weight"]
    assert lora_b.abs().max() > 0  # it trained


def test_lora_checkpoint_and_weight_resume_start_from_saved_weights(one_image, tmp_path):
    first = train(args_for(one_image, tmp_path / "a", lora_base_model="dit", lora_rank=4, dataset_repeat=3,
                           learning_rate=1e-2))  # fmt: skip
    saved = read(first.checkpoints[-1])
    for extra in ({"lora_checkpoint": str(first.checkpoints[-1])},
                  {"resume_from_checkpoint": str(first.checkpoints[-1]), "output_path": str(tmp_path / "x")}):  # fmt: skip
        again = train(args_for(one_image, tmp_path / "b", lora_base_model="dit", lora_rank=4, max_steps=1,
                               learning_rate=1e-30, **extra))  # fmt: skip
        got = read(again.checkpoints[-1])
        assert all(torch.equal(got[k], saved[k]) for k in saved)
    with pytest.raises(qi.errors.WeightMismatchError, match="lora_rank 4"):
        train(args_for(one_image, tmp_path / "c", lora_base_model="dit", lora_rank=8, max_steps=1,
                       lora_checkpoint=str(first.checkpoints[-1])))  # fmt: skip


def test_bad_rows_stop_or_are_skipped(tmp_path):
    ds = make_dataset(tmp_path / "ds", [(32, 32)])
    with (ds / "metadata.csv").open("a") as f:
        f.write("images/nope.png,a missing picture\n")
    with pytest.raises(BadRowError, match=r"row 2 of metadata.csv.*nope.png"):
        train(args_for(ds, tmp_path / "a", lora_base_model="dit", lora_rank=4))
    result = train(args_for(ds, tmp_path / "b", lora_base_model="dit", lora_rank=4, skip_bad_rows=True))
    assert result.skipped_rows == 1 and result.global_step == 1


def test_setup_errors_say_what_to_do(one_image, tmp_path):
    with pytest.raises(InvalidInputError, match="nothing to train"):
        train(args_for(one_image, tmp_path / "a"))
    with pytest.raises(InvalidInputError, match="cannot be stored in fp8"):
        train(args_for(one_image, tmp_path / "b", trainable_models="dit", fp8_models="dit"))
    with pytest.raises(InvalidInputError, match="not a loaded component"):
        train(args_for(one_image, tmp_path / "c", lora_base_model="controlnet"))
    with pytest.raises(InvalidInputError, match="match no|target modules"):
        train(args_for(one_image, tmp_path / "d", lora_base_model="dit", lora_target_modules="nothing_here"))


def test_model_strings_name_components(tmp_path):
    """--model_paths / --model_id_with_origin_paths (the seed's ways to name weights) map to recipe roles."""
    from qi_core.plugin_host import host
    from qi_plugins.sft.args import make_args
    from qi_plugins.sft.models import model_sources, roles_of

    recipe = host().registry.get("pipeline", "qwen-image").load()
    paths = f'["{MODEL}/transformer", "{MODEL}/vae/diffusion_pytorch_model.safetensors"]'
    root, overrides, names = model_sources(make_args(model=MODEL, model_paths=paths), recipe)
    assert root == MODEL and set(overrides) == {"dit", "vae"}
    assert str(overrides["vae"]).endswith("/vae")  # a file next to config.json: its component folder
    assert roles_of(f"{MODEL}/transformer,text_encoder", names, recipe, "fp8_models") == [
        "dit",
        "text_encoder",
    ]
    ids = "Qwen/Qwen-Image:transformer/diffusion_pytorch_model*.safetensors,Qwen/Qwen-Image:vae/*"
    root, overrides, _ = model_sources(make_args(model_id_with_origin_paths=ids), recipe)
    assert root == "Qwen/Qwen-Image" and overrides == {}  # served from the official layout
    root, overrides, _ = model_sources(
        make_args(model="Qwen/Qwen-Image", model_id_with_origin_paths="dit=Org/Distill:model*.safetensors"),
        recipe,
    )
    assert (
        overrides["dit"].model_id == "Org/Distill"
        and overrides["dit"].origin_file_pattern == "model*.safetensors"
    )
    root, overrides, _ = model_sources(make_args(model_paths=f'["{MODEL}/transformer"]'), recipe)
    assert root == MODEL  # the layout the component folders come from (its tokenizer is needed too)
    with pytest.raises(InvalidInputError, match="cannot tell which component"):
        model_sources(make_args(model_paths='["/somewhere/weights.safetensors"]'), recipe)
    with pytest.raises(InvalidInputError, match="neither a role"):
        roles_of("unet", names, recipe, "fp8_models")


def test_components_from_model_paths_tokenizer_path_and_workers(one_image, tmp_path):
    paths = f'{{"dit": "{MODEL}/transformer", "vae": "{MODEL}/vae"}}'
    result = train(args_for(one_image, tmp_path / "out", model_paths=paths, tokenizer_path=f"{MODEL}/tokenizer",
                            lora_base_model="dit", lora_rank=4, dataset_repeat=2, dataset_num_workers=1))  # fmt: skip
    assert result.global_step == 2 and all(np.isfinite(result.losses))
