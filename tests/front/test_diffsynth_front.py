"""DiffSynth-Studio user code through ``qi_plugins.diffsynth_compat``, on the golden tiny models laid out as
DiffSynth's ``./models`` folder: the seed's quick-start script, LoRA loading and the scheduler swap give
bit-identically what the native ``qi.compose`` path gives for the same call (and stay within the golden
DiffSynth run's tolerance). Every script of DiffSynth's examples folder: ``test_diffsynth_examples.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import GOLDEN_MODEL, golden_case
from front_helpers import EXTRA, QUIET, call_args, make_models_dir, same, within_golden

import qi_core as qi
from qi_plugins.diffsynth_compat import FlowMatchScheduler, ModelConfig, QwenImagePipeline
from qi_plugins.diffsynth_compat.cli import migrate_source
from qi_plugins.lora.adapter import LoRA

# The seed page's quick-start code, verbatim (DiffSynth-Studio import line included).
SEED_QUICKSTART = """\
from diffsynth.pipelines.qwen_image import QwenImagePipeline, ModelConfig
import torch

vram_config = {
    "offload_dtype": "disk",
    "offload_device": "disk",
    "onload_dtype": torch.float8_e4m3fn,
    "onload_device": "cpu",
    "preparing_dtype": torch.float8_e4m3fn,
    "preparing_device": "cuda",
    "computation_dtype": torch.bfloat16,
    "computation_device": "cuda",
}
pipe = QwenImagePipeline.from_pretrained(
    torch_dtype=torch.bfloat16,
    device="cuda",
    model_configs=[
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="transformer/diffusion_pytorch_model*.safetensors", **vram_config),
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="text_encoder/model*.safetensors", **vram_config),
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="vae/diffusion_pytorch_model.safetensors", **vram_config),
    ],
    tokenizer_config=ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="tokenizer/"),
    vram_limit=torch.cuda.mem_get_info("cuda")[1] / (1024 ** 3) - 0.5,
)
prompt = "精致肖像，水下少女，蓝裙飘逸，发丝轻扬，光影透澈，气泡环绕，面容恬静，细节精致，梦幻唯美。"
image = pipe(prompt, seed=0, num_inference_steps=40)
image.save("image.jpg")
"""

# What this CPU test changes besides the import line: no CUDA here (float32 on the CPU, a fixed VRAM budget)
# and a 32x32 image instead of the default 1328x1328, so the tiny model runs 40 steps in a second.
CPU = (
    ('torch.cuda.mem_get_info("cuda")[1] / (1024 ** 3) - 0.5', "8.0 - 0.5"),
    ('"cuda"', '"cpu"'),
    ("torch.bfloat16", "torch.float32"),
    ("num_inference_steps=40)", "num_inference_steps=40, height=32, width=32)"),
)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("diffsynth")
    make_models_dir(base)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base / "models"))
        mp.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "true")
        mp.setenv("QI_CACHE_DIR", str(base / "cache"))
        mp.chdir(base)  # DiffSynth's examples load LoRAs by relative paths under ./models
        yield base / "models"


def base_configs(dit: str = "Qwen/Qwen-Image", vae: str = "Qwen/Qwen-Image") -> list[ModelConfig]:
    return [
        ModelConfig(model_id=dit, origin_file_pattern="transformer/diffusion_pytorch_model*.safetensors"),
        ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="text_encoder/model*.safetensors"),
        ModelConfig(model_id=vae, origin_file_pattern="vae/diffusion_pytorch_model.safetensors"),
    ]


def from_pretrained(*extra: ModelConfig, dit: str = "Qwen/Qwen-Image", vae: str = "Qwen/Qwen-Image", **kw):
    return QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu", model_configs=[*base_configs(dit, vae), *extra], **kw
    )


EDIT_PROCESSOR = ModelConfig(model_id="Qwen/Qwen-Image-Edit", origin_file_pattern="processor/")


def test_seed_quickstart_runs_with_one_changed_import(models):
    source, changed, left = migrate_source(SEED_QUICKSTART)
    assert [c[1] for c in changed] == [
        "from diffsynth.pipelines.qwen_image import QwenImagePipeline, ModelConfig"
    ]
    assert left == []
    for old, new in CPU:
        assert old in source
        source = source.replace(old, new)
    # run the script as is, recording the decoder output of its one call on the way
    load, _, generate = source.partition("prompt = ")
    scope: dict = {}
    exec(compile(load, "seed_quickstart.py", "exec"), scope)
    pipe, floats = scope["pipe"], {}
    pipe.tracer = lambda k, v: floats.setdefault(k, v.clone())
    exec(compile("prompt = " + generate, "seed_quickstart.py", "exec"), scope)  # writes image.jpg

    assert pipe.recipe == "qwen-image"
    assert {type(p).__name__ for p in pipe.pipe.memory.values()} == {"Disk"}  # offload_device="disk"
    native = qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False, memory="disk")
    theirs = native(scope["prompt"], seed=0, num_inference_steps=40, height=32, width=32, **QUIET)
    ours = floats["image_float"][0].permute(1, 2, 0).numpy()
    assert same(ours, theirs)
    # the saved image is DiffSynth's uint8 conversion (truncation) of those floats
    assert np.array_equal(np.asarray(scope["image"]), ((theirs + 1) * 127.5).clip(0, 255).astype(np.uint8))
    assert (models.parent / "image.jpg").is_file()


def test_load_lora_alpha_from_a_model_config(models):
    case, _, folder = golden_case("lora_diffsynth")
    (lora,) = case["models"]["loras"]
    pipe = from_pretrained()
    adapter = pipe.load_lora(
        pipe.dit, ModelConfig(path=str(EXTRA / "lora_diffsynth.safetensors")), alpha=lora["alpha"]
    )
    assert adapter.fuse and adapter.scale == lora["alpha"]
    call = {**call_args(case, folder), **QUIET}
    ours = pipe(**call)
    native = qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False,
                        adapters=[LoRA(EXTRA / "lora_diffsynth.safetensors", lora["alpha"])])  # fmt: skip
    assert same(ours, native(**call))
    within_golden(ours, "lora_diffsynth")
    # hot-loaded (unfused) LoRAs are what clear_lora removes, as in DiffSynth
    hot = pipe.load_lora(
        pipe.dit, str(EXTRA / "lora_diffsynth.safetensors"), alpha=0.5, hotload=True, verbose=0
    )
    assert not hot.fuse and pipe.clear_lora(verbose=0) == 1 and hot not in pipe.adapters


def test_scheduler_swap_and_size_rounding(models):
    pipe = from_pretrained()
    pipe.scheduler = FlowMatchScheduler("Qwen-Image-Lightning")
    assert pipe.pipe.scheduler == qi.get_scheduler("qwen-image-lightning")
    seen = {}
    pipe.tracer = lambda k, v: seen.setdefault(k, v.clone())
    out = pipe(
        "a cat", seed=1, num_inference_steps=2, height=40, width=50, cfg_scale=1.0, output_type="latent"
    )
    assert out.shape[-2:] == (48 // 8, 64 // 8)  # rounded up to multiples of 16, like DiffSynth
    want, _ = qi.get_scheduler("qwen-image-lightning").schedule(2, height=40, width=50)
    torch.testing.assert_close(seen["sigmas"], want, rtol=0, atol=0)
    # the schedule is computed for the size asked for (DiffSynth sets it before rounding)
    base = from_pretrained()
    base.tracer = lambda k, v: seen.__setitem__(k, v.clone())
    base("a cat", seed=1, num_inference_steps=3, height=40, width=50, cfg_scale=1.0, output_type="latent")
    want, _ = qi.get_scheduler("qwen-image").schedule(3, height=40, width=50)
    torch.testing.assert_close(seen["sigmas"], want, rtol=0, atol=0)
