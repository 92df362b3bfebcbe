"""The DiffSynth front's loading: recipe choice from the plugins' model ids, roles, staging of files that are
not an official folder, the DiffSynth environment variables and downloads, memory settings, typed errors."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN_MODEL
from front_helpers import EXTRA, LAYERED, LAYOUT, QI, QUIET, make_models_dir, same
from safetensors.torch import load_file, save_file

import qi_core as qi
from qi_core.errors import InvalidInputError, MissingComponentError, ModelLoadError
from qi_core.recipe import Component, Recipe
from qi_plugins.diffsynth_compat import ModelConfig, QwenImagePipeline, load_state_dict
from qi_plugins.diffsynth_compat.detect import detect_role, infer_dit_config, infer_vae_config, read_shapes
from qi_plugins.diffsynth_compat.memory import policy_name
from qi_plugins.diffsynth_compat.probe import PartProbe, taking
from qi_plugins.diffsynth_compat.resolve import Weights, choose_recipe

QI_ID = "Qwen/Qwen-Image"
TE = ModelConfig(model_id=QI_ID, origin_file_pattern="text_encoder/model*.safetensors")
VAE = ModelConfig(model_id=QI_ID, origin_file_pattern="vae/diffusion_pytorch_model.safetensors")
DIT = ModelConfig(model_id=QI_ID, origin_file_pattern="transformer/diffusion_pytorch_model*.safetensors")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def env(tmp_path, monkeypatch):
    make_models_dir(tmp_path)
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path / "models"))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "true")
    monkeypatch.setenv("QI_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def load(*configs, **kw):
    return QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", model_configs=list(configs), **kw
    )


# -- which recipe -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ids, want",
    [
        ([QI_ID], "qwen-image"),
        (["Qwen/Qwen-Image-2512", QI_ID], "qwen-image"),
        (["DiffSynth-Studio/Qwen-Image-Distill-Full", QI_ID], "qwen-image"),  # declared by the base recipe
        (["Qwen/Qwen-Image-Edit", QI_ID], "qwen-image-edit"),
        (["Qwen/Qwen-Image-Edit-2509", QI_ID], "qwen-image-edit-2509"),
        (["Qwen/Qwen-Image-Edit-2511", QI_ID], "qwen-image-edit-2511"),
        (["Qwen/Qwen-Image-Layered", QI_ID], "qwen-image-layered"),
        (["DiffSynth-Studio/Qwen-Image-Layered-Control", QI_ID, "Qwen/Qwen-Image-Layered"], "qwen-image-layered-control"),
        ([QI_ID, "DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Depth"], "qwen-image-blockwise-controlnet-depth"),
        ([QI_ID, "DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Inpaint"], "qwen-image-blockwise-controlnet-inpaint"),
    ],
)  # fmt: skip
def test_recipe_from_the_plugins_model_ids(ids, want):
    assert choose_recipe(ids, qi.pipelines(), hints=[QI_ID]).name == want


def test_a_new_plugins_model_id_wins_and_unknown_ids_are_an_error():
    mine = Recipe(name="my-dit", description="d", components={"dit": Component("qwen-image-dit", "transformer")},
                  scheduler="qwen-image", model=QI_ID, model_ids=("me/My-DiT",))  # fmt: skip
    assert choose_recipe(["me/My-DiT", QI_ID], [*qi.pipelines(), mine]).name == "my-dit"
    # an unknown id is fine when the weights say what they are; alone, with nothing recognised, it is not
    got = choose_recipe(["someone/Else", QI_ID], qi.pipelines(), roles={"dit", "text_encoder", "vae"})
    assert got.name == "qwen-image"
    with pytest.raises(
        InvalidInputError, match="no installed plugin has a pipeline for model ids someone/Else"
    ):
        choose_recipe(["someone/Else"], qi.pipelines())


def test_a_processor_config_picks_a_recipe_that_loads_it_and_never_an_unnamed_lora():
    roles = {"dit", "text_encoder", "vae"}
    got = choose_recipe(["someone/Edit-Finetune", QI_ID], qi.pipelines(), hints=[QI_ID, "Qwen/Qwen-Image-Edit"],
                        roles=roles, extras=["tokenizer", "processor"])  # fmt: skip
    assert "processor" in got.components and not got.adapters
    assert not choose_recipe([QI_ID], qi.pipelines(), hints=[QI_ID], roles=roles).adapters


def test_the_probe_reads_the_architecture_off_the_weights():
    def weights(folder: Path) -> Weights:
        return Weights(sorted(folder.glob("*.safetensors")), None, folder.name, str(folder), 0)

    probe = PartProbe()
    try:
        layered = taking(qi.pipelines(), [weights(LAYERED / "transformer")], probe)
        base = taking(qi.pipelines(), [weights(QI / "transformer")], probe)
    finally:
        probe.close()
    parts = {r.components["dit"].part for r in layered}
    assert parts == {"qwen-image-layered-dit"}  # the extra addition_t_embedding fits that part only
    assert {r.components["dit"].part for r in base} >= {"qwen-image-dit"}
    assert "qwen-image-layered-dit" not in {r.components["dit"].part for r in base}


def test_path_only_weights_pick_by_role_and_tokenizer():
    got = choose_recipe([], qi.pipelines(), hints=[QI_ID], roles={"dit", "vae", "text_encoder"})
    assert got.name == "qwen-image"
    got = choose_recipe([], qi.pipelines(), hints=[QI_ID], roles={"dit", "blockwise_controlnet"})
    assert got.name.startswith("qwen-image-blockwise-controlnet-")


# -- what a file is -------------------------------------------------------------------------------------------
def test_roles_and_sizes_from_tensor_names_and_shapes():
    shapes = {
        d: read_shapes(sorted((QI / d).glob("*.safetensors"))) for d in ("transformer", "vae", "text_encoder")
    }
    assert detect_role(shapes["transformer"]) == "dit"
    assert detect_role(shapes["vae"]) == "vae" and detect_role(shapes["text_encoder"]) == "text_encoder"
    assert detect_role(read_shapes([EXTRA / "controlnet_canny.safetensors"])) == "blockwise_controlnet"
    assert detect_role(read_shapes([EXTRA / "lora_diffsynth.safetensors"])) == "lora"

    official = json.loads((QI / "transformer" / "config.json").read_text())
    inferred = infer_dit_config(shapes["transformer"])
    sizes = ("in_channels", "out_channels", "num_layers", "attention_head_dim", "num_attention_heads",
             "joint_attention_dim")  # fmt: skip
    assert {k: inferred[k] for k in sizes} == {k: official[k] for k in sizes}
    assert (
        sum(inferred["axes_dims_rope"]) == official["attention_head_dim"]
    )  # the split is not in the weights
    vae = json.loads((QI / "vae" / "config.json").read_text())
    assert infer_vae_config(shapes["vae"]) == {"_class_name": "AutoencoderKLQwenImage", "base_dim": vae["base_dim"],
                                               "z_dim": vae["z_dim"], "input_channels": 3}  # fmt: skip


# -- files outside an official folder ---------------------------------------------------------------------
def split_dit(folder, with_config: bool):
    sd = load_file(QI / "transformer" / "diffusion_pytorch_model.safetensors")
    keys = sorted(sd)
    folder.mkdir()
    shards = [folder / f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors" for i in range(2)]
    for shard, part in zip(shards, (keys[: len(keys) // 2], keys[len(keys) // 2 :]), strict=True):
        save_file({k: sd[k] for k in part}, shard)
    if with_config:
        (folder / "config.json").write_text((QI / "transformer" / "config.json").read_text())
    return shards


@pytest.mark.parametrize("whole_folder", [True, False])
def test_shard_files_by_path_with_the_config_beside_them(env, whole_folder):
    shards = split_dit(env / "shards", with_config=True)
    if not whole_folder:  # another checkpoint in the same folder: only the chosen shards are staged
        save_file({"w": torch.zeros(1)}, env / "shards" / "other-checkpoint.safetensors")
    pipe = load(ModelConfig(path=[str(s) for s in shards]), TE, VAE)
    assert pipe.recipe == "qwen-image"
    staged = Path(pipe.pipe.model) / "transformer"  # the model root qi.compose got
    assert staged.is_symlink() == whole_folder
    if not whole_folder:
        index = json.loads((staged / "diffusion_pytorch_model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == {s.name for s in shards}
    call = dict(prompt="a boat", seed=3, height=32, width=48, num_inference_steps=2, **QUIET)
    assert same(pipe(**call), qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False)(**call))


def test_weights_without_a_config_get_sizes_from_their_shapes(env):
    shards = split_dit(env / "bare", with_config=False)
    with pytest.warns(UserWarning, match=r"RoPE axes are taken as \[4, 14, 14\]"):  # 1/8, 7/16, 7/16 of 32
        pipe = load(ModelConfig(path=[str(s) for s in shards]), TE, VAE)
    cfg = pipe.dit.config
    assert (cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim) == (2, 2, 32)
    assert pipe("a boat", seed=3, height=32, width=32, num_inference_steps=1, **QUIET).shape == (32, 32, 3)


@pytest.mark.parametrize("cut", ["data", "header"])
def test_a_truncated_file_names_itself_and_says_to_download_it_again(env, cut):
    whole = (QI / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    n = int.from_bytes(whole[:8], "little")
    bad = env / "vae" / "diffusion_pytorch_model.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(whole[: len(whole) - 100] if cut == "data" else whole[: 8 + n // 2])
    with pytest.raises(
        ModelLoadError, match=rf"{re.escape(str(bad))}.*(truncated|interrupted).*download the model again"
    ):
        load(DIT, TE, ModelConfig(path=str(bad)))


def test_load_state_dict_reads_safetensors_and_never_unpickles(tmp_path):
    import pickle

    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("lora.bin", "lora.pt", "lora.safetensors"):
        (tmp_path / name).write_bytes(pickle.dumps({"w": Payload()}))
        with pytest.raises(ModelLoadError, match="safetensors"):
            load_state_dict(tmp_path / name)
    assert not marker.exists()
    with pytest.raises(MissingComponentError, match="does not exist"):
        load_state_dict(tmp_path / "missing.safetensors")
    sd = load_state_dict(str(EXTRA / "lora_diffsynth.safetensors"), torch_dtype=torch.float16)
    assert sd.keys() == load_file(EXTRA / "lora_diffsynth.safetensors").keys()
    assert {v.dtype for v in sd.values()} == {torch.float16}


def test_load_lora_state_dict_must_be_a_dict_of_tensors(env):
    pipe = load(DIT, TE, VAE)
    with pytest.raises(InvalidInputError, match=r"state_dict=.*dict of LoRA tensors"):
        pipe.load_lora(pipe.dit, state_dict=[1, 2])


def test_text_encoder_without_its_config_is_a_clear_error(env):
    bare = env / "te"
    bare.mkdir()
    os.symlink(QI / "text_encoder" / "model.safetensors", bare / "model.safetensors")
    with pytest.raises(MissingComponentError, match="text_encoder weights .* without the config.json"):
        load(DIT, ModelConfig(path=str(bare / "model.safetensors")), VAE)


def test_edit_model_without_processor_says_which_config_to_add(env):
    edit = ModelConfig(model_id="Qwen/Qwen-Image-Edit", origin_file_pattern="transformer/")
    with pytest.raises(MissingComponentError, match=r"processor_config=ModelConfig\(.*'processor/'\)"):
        load(edit, TE, VAE)


def test_a_lora_in_model_configs_points_to_load_lora(env):
    with pytest.raises(ModelLoadError, match=r"is a LoRA: load it with pipe.load_lora"):
        load(DIT, TE, VAE, ModelConfig(path=str(EXTRA / "lora_diffsynth.safetensors")))


def test_call_errors(env):
    pipe = load(DIT, TE, VAE)
    with pytest.raises(
        InvalidInputError,
        match="takes the parameter 'eligen_entity_promptz'. Did you mean eligen_entity_prompts",
    ):
        pipe("x", height=32, width=32, eligen_entity_promptz=["a"])
    # DiffSynth's "not used" (None) needs no injector
    assert pipe("x", height=32, width=32, num_inference_steps=1, kv_cache=None, **QUIET).shape == (32, 32, 3)
    with pytest.raises(InvalidInputError, match="not a model of this pipeline"):
        pipe.load_lora(torch.nn.Linear(2, 2), str(EXTRA / "lora_diffsynth.safetensors"))
    with pytest.raises(InvalidInputError, match="torch_dtype"):
        QwenImagePipeline.from_pretrained(torch_dtype="bf16", model_configs=[DIT])


# -- where files come from ------------------------------------------------------------------------------------
def test_default_models_folder_is_dot_models(env, monkeypatch):
    monkeypatch.delenv("DIFFSYNTH_MODEL_BASE_PATH")
    monkeypatch.chdir(env)
    want = env / "models" / QI_ID / "transformer" / "diffusion_pytorch_model.safetensors"
    assert [os.path.abspath(f) for f in DIT.files()] == [str(want)]


def test_missing_files_download_from_the_source_the_env_names(tmp_path, monkeypatch):
    from qi_core.plugin_host import host

    calls = []
    hub = make_models_dir(tmp_path / "hub", LAYOUT)

    def fake_hub(model_id, local_dir, patterns):  # fetches from the golden "hub"
        calls.append((model_id, local_dir, patterns))
        for entry in (hub / model_id).iterdir():
            if not (local_dir / entry.name).exists():
                local_dir.mkdir(parents=True, exist_ok=True)
                os.symlink(entry.resolve(), local_dir / entry.name)

    monkeypatch.setattr(host().registry.get("source", "huggingface"), "obj", fake_hub)
    monkeypatch.setenv("DIFFSYNTH_DOWNLOAD_SOURCE", "huggingface")
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path / "models"))
    monkeypatch.setenv("QI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DIFFSYNTH_SKIP_DOWNLOAD", raising=False)
    pipe = load(DIT, TE, VAE)
    assert pipe.recipe == "qwen-image"
    assert {c[0] for c in calls} == {QI_ID} and {c[1] for c in calls} == {tmp_path / "models" / QI_ID}
    assert ["tokenizer/*"] in [c[2] for c in calls]  # DiffSynth's default tokenizer_config

    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "true")
    calls.clear()
    with pytest.raises(MissingComponentError, match="no files match"):
        ModelConfig(model_id="Qwen/Qwen-Image-Edit", origin_file_pattern="processor/").files()
    assert calls == []


# -- memory ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings, want",
    [
        ({}, ("none", {})),
        ({"offload_device": "cpu"}, ("none", {})),  # DiffSynth needs both offload fields
        ({"offload_dtype": "disk", "offload_device": "disk"}, ("disk", {})),
        ({"offload_dtype": torch.float8_e4m3fn, "offload_device": "cpu"}, ("fp8", {"offload_device": "cpu"})),
        ({"offload_dtype": torch.float8_e4m3fn, "offload_device": "cuda"}, ("fp8", {"offload_device": "cuda"})),
        ({"offload_dtype": torch.bfloat16, "offload_device": "cpu"},
         ("stream", {"offload_device": "cpu", "offload_dtype": torch.bfloat16})),
        ({"offload_dtype": torch.bfloat16, "offload_device": "cuda"}, ("none", {})),
        ({"memory": "lowest-vram"}, ("lowest-vram", {})),
    ],
)  # fmt: skip
def test_vram_settings_map_to_policies(settings, want):
    assert policy_name(ModelConfig(model_id=QI_ID, **settings), device="cuda") == want


def test_model_config_positional_and_vram_config():
    cfg = ModelConfig("dit.safetensors", None, None, None, None, None, "cpu", torch.float8_e4m3fn)
    assert cfg.path == "dit.safetensors" and cfg.vram_config()["offload_dtype"] == torch.float8_e4m3fn
    with pytest.raises(TypeError, match="two values"):
        ModelConfig("a", path="b")
