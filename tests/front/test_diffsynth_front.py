"""DiffSynth-Studio user code through ``qi_plugins.diffsynth_compat``, on the golden tiny models laid out as
DiffSynth's ``./models`` folder: the seed's quick-start script and one DiffSynth-style script per variant give
bit-identically what the native ``qi.compose`` path gives for the same call (and stay within the golden
DiffSynth run's tolerance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import GOLDEN_MODEL, golden_case
from front_helpers import EXTRA, LAYERED, QUIET, call_args, make_models_dir, same

import qi_core as qi
from qi_plugins.diffsynth_compat import ControlNetInput, FlowMatchScheduler, ModelConfig, QwenImagePipeline
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


def within_golden(out, case_name: str) -> float:
    """Max |compat − DiffSynth golden| of the decoded image; asserted within the case's tolerance."""
    case, want, _ = golden_case(case_name)
    ref = want["image_float"]
    ours = np.stack(out) if isinstance(out, list) else out[None]
    diff = float(np.abs(ours - ref.permute(0, 2, 3, 1).numpy().reshape(ours.shape)).max())
    assert diff <= case["tolerances"]["image_float"]["recommended_atol"], diff
    return diff


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


def test_t2i_golden_call_is_native_and_golden(models):
    case, _, folder = golden_case("t2i")
    call = {**call_args(case, folder), **QUIET}
    ours = from_pretrained()(**call)
    assert same(ours, qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False)(**call))
    within_golden(ours, "t2i")


def test_edit_script(models):
    case, _, folder = golden_case("edit_single")
    pipe = from_pretrained(dit="Qwen/Qwen-Image-Edit", processor_config=EDIT_PROCESSOR)
    assert pipe.recipe == "qwen-image-edit"
    call = {**call_args(case, folder), **QUIET}
    ours = pipe(**call)
    assert same(ours, qi.compose("qwen-image-edit", model=GOLDEN_MODEL, progress=False)(**call))
    within_golden(ours, "edit_single")


def test_edit_2511_script(models):
    case, _, folder = golden_case("edit_2511")
    pipe = from_pretrained(dit="Qwen/Qwen-Image-Edit-2511", processor_config=EDIT_PROCESSOR)
    assert pipe.recipe == "qwen-image-edit-2511"
    call = {**call_args(case, folder), **QUIET}
    ours = pipe(**call)
    assert same(ours, qi.compose("qwen-image-edit-2511", model=GOLDEN_MODEL, progress=False)(**call))
    within_golden(ours, "edit_2511")


def test_blockwise_controlnet_script(models):
    case, _, folder = golden_case("controlnet")
    canny = ModelConfig(
        model_id="DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Canny",
        origin_file_pattern="model.safetensors",
    )
    pipe = from_pretrained(canny)
    assert pipe.recipe == "qwen-image-blockwise-controlnet-canny"
    call = {**call_args(case, folder), **QUIET}
    call["blockwise_controlnet_inputs"] = [ControlNetInput(**c) for c in call["blockwise_controlnet_inputs"]]
    ours = pipe(**call)
    native = qi.compose("qwen-image-blockwise-controlnet-canny", model=GOLDEN_MODEL, progress=False,
                        components={"blockwise_controlnet": [EXTRA / "controlnet_canny.safetensors"]})  # fmt: skip
    assert same(ours, native(**call))
    within_golden(ours, "controlnet")


def test_eligen_script_loads_its_lora_and_adds_the_injector(models):
    case, _, folder = golden_case("eligen")
    pipe = from_pretrained()
    assert pipe.recipe == "qwen-image"
    pipe.load_lora(pipe.dit, "models/DiffSynth-Studio/Qwen-Image-EliGen/model.safetensors")
    call = {**call_args(case, folder), **QUIET}
    ours = pipe(**call)
    assert pipe.injector("eligen") is not None
    native = qi.compose("qwen-image-eligen", model=GOLDEN_MODEL, progress=False,
                        components={"lora": [EXTRA / "lora_diffsynth.safetensors"]})  # fmt: skip
    assert same(ours, native(**call))


def test_in_context_script(models):
    case, _, folder = golden_case("context_image")
    pipe = from_pretrained()
    pipe.load_lora(pipe.dit, "models/DiffSynth-Studio/Qwen-Image-In-Context-Control-Union/model.safetensors")
    call = {**call_args(case, folder), **QUIET}  # the prompt starts with "Context_Control. " as in DiffSynth
    ours = pipe(**call)
    assert [i.name for i in pipe.injectors][-1] == "context-image"
    native = qi.compose("qwen-image-in-context-control-union", model=GOLDEN_MODEL, progress=False,
                        components={"lora": [EXTRA / "lora_diffsynth.safetensors"]})  # fmt: skip
    assert same(ours, native(**call))


def test_layered_script(models):
    case, _, folder = golden_case("layered")
    pipe = from_pretrained(
        dit="Qwen/Qwen-Image-Layered", vae="Qwen/Qwen-Image-Layered", processor_config=EDIT_PROCESSOR
    )
    assert pipe.recipe == "qwen-image-layered"
    call = {**call_args(case, folder), **QUIET}
    ours = pipe(**call)
    native = qi.compose("qwen-image-layered", model=GOLDEN_MODEL, progress=False,
                        components={"dit": LAYERED / "transformer", "vae": LAYERED / "vae"})  # fmt: skip
    assert isinstance(ours, list) and same(ours, native(**call))
    within_golden(ours, "layered")


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
