"""DiffSynth-Studio's ``examples/qwen_image/model_inference`` folder as a checklist.

Every script there is listed in :data:`EXAMPLES`: either it runs through ``qi_plugins.diffsynth_compat``
after its import lines change, and a test here loads its models (the golden tiny models laid out as
DiffSynth's ``./models`` folder), makes its ``load_lora`` / scheduler calls and its call (the golden case of
that call pattern, at the tiny size), and checks the image is bit for bit what ``qi.compose`` gives with the
same recipe, weights and LoRAs; or it does not, and ``docs/diffsynth.md`` says why. The table in the docs is
checked against this list.

Bit-identical comparisons are between two qi paths on the same CPU, so they hold on any x86-64 machine; the
comparisons with DiffSynth's own output (``within_golden``) use each golden case's recommended tolerance.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import GOLDEN_MODEL, golden_case
from front_helpers import (
    EXTRA,
    LAYERED,
    LIGHTNING_FILE,
    LORA,
    QI,
    QUIET,
    call_args,
    make_models_dir,
    same,
    within_golden,
)
from safetensors.torch import load_file, save_file

import qi_core as qi
from qi_core.errors import InvalidInputError
from qi_plugins.diffsynth_compat import (
    ControlNetInput,
    FlowMatchScheduler,
    ModelConfig,
    QwenImagePipeline,
    load_state_dict,
)
from qi_plugins.diffsynth_compat.cli import migrate_source
from qi_plugins.lora.adapter import LoRA

pytestmark = pytest.mark.usefixtures("single_thread")

DOCS = Path(__file__).parents[2] / "docs" / "diffsynth.md"
QI_ID, EDIT, LAYERED_ID = "Qwen/Qwen-Image", "Qwen/Qwen-Image-Edit", "Qwen/Qwen-Image-Layered"
DIT = "transformer/diffusion_pytorch_model*.safetensors"  # the origin_file_pattern of each folder in the examples
TE = "text_encoder/model*.safetensors"
VAE = "vae/diffusion_pytorch_model.safetensors"
BASE = ((QI_ID, DIT), (QI_ID, TE), (QI_ID, VAE))
CN = "DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-"
DMD2_FILE = "models/MusePublic/Qwen-Image-Distill/qwen_image_distill_3step.safetensors"
DROP = object()  # a call override that removes the golden case's argument


def with_dit(model_id: str, vae: str = QI_ID, pattern: str = DIT) -> tuple[tuple[str, str], ...]:
    return ((model_id, pattern), (QI_ID, TE), (vae, VAE))


@dataclass(frozen=True)
class Runs:
    """A script that runs through the front: its models and calls (as in the script), and the native run."""

    configs: tuple[
        tuple[str, str], ...
    ]  # model_configs: (model_id, origin_file_pattern), in the script's order
    case: str  # the golden case whose call has this script's call pattern
    native: str  # the recipe the same run takes with qi.compose
    processor: bool = False  # processor_config=ModelConfig(model_id="Qwen/Qwen-Image-Edit", "processor/")
    tokenizer: bool = True  # False: tokenizer_config=None (Qwen-Image-Edit, Lowres-Fix)
    loras: tuple[tuple[str, float], ...] = ()  # pipe.load_lora(pipe.dit, path or "id:file", alpha=)
    scheduler: str | None = None  # pipe.scheduler = FlowMatchScheduler(template)
    call: dict[str, Any] = field(default_factory=dict)  # the script's own call arguments over the case's
    native_components: dict[str, Any] = field(default_factory=dict)  # weights not in the golden root
    golden: bool = False  # the call and weights are exactly the golden case's: also compare with DiffSynth
    note: str = ""  # what in the script does not run through the front (kept out of the test)


@dataclass(frozen=True)
class Not:
    """A script that does not run through the front, and why (the docs say the same)."""

    why: str


LAYERED_NATIVE = {"dit": LAYERED / "transformer", "vae": LAYERED / "vae"}
ANNOTATOR = (
    "`Annotator` (DiffSynth's annotator models) has no qi equivalent: pass a control image made elsewhere"
)

EXAMPLES: dict[str, Runs | Not] = {
    "Qwen-Image.py": Runs(BASE, "t2i", "qwen-image", golden=True),
    "Qwen-Image-2512.py": Runs(with_dit("Qwen/Qwen-Image-2512"), "t2i", "qwen-image"),
    "Qwen-Image-Distill-Full.py": Runs(
        with_dit("DiffSynth-Studio/Qwen-Image-Distill-Full", pattern="diffusion_pytorch_model*.safetensors"),
        "t2i_nocfg", "qwen-image",
    ),
    "Qwen-Image-Distill-LoRA.py": Runs(
        BASE, "t2i_nocfg", "qwen-image", loras=(("models/DiffSynth-Studio/Qwen-Image-Distill-LoRA/model.safetensors", 1),)
    ),
    # load_state_dict + "base_model.model." stripped + load_lora(state_dict=...): see test_dmd2_state_dict
    "Qwen-Image-Distill-DMD2.py": Runs(
        BASE, "t2i_nocfg", "qwen-image", loras=((f"state_dict:{DMD2_FILE}", 1),),
        call={"exponential_shift_mu": math.log(2.5)},
        note="the LoRA comes with modelscope's snapshot_download, which stays as it is",
    ),
    "Qwen-Image-Edit.py": Runs(with_dit(EDIT), "edit_single", "qwen-image-edit", processor=True, tokenizer=False,
                               golden=True),
    "Qwen-Image-Edit-2509.py": Runs(with_dit("Qwen/Qwen-Image-Edit-2509"), "edit_multi", "qwen-image-edit-2509",
                                    processor=True, golden=True),
    "Qwen-Image-Edit-2511.py": Runs(with_dit("Qwen/Qwen-Image-Edit-2511"), "edit_2511", "qwen-image-edit-2511",
                                    processor=True, golden=True),
    "Qwen-Image-Edit-2511-Lightning.py": Runs(
        with_dit("Qwen/Qwen-Image-Edit-2511"), "edit_2511", "qwen-image-edit-2511", processor=True,
        loras=((f"lightx2v/Qwen-Image-Edit-2511-Lightning:{LIGHTNING_FILE}", 8 / 64),),
        scheduler="Qwen-Image-Lightning", call={"cfg_scale": 1.0},
    ),
    "Qwen-Image-Edit-2511-ICEdit.py": Runs(
        with_dit("Qwen/Qwen-Image-Edit-2511"), "edit_2511", "qwen-image-edit-2511", processor=True,
        loras=(("DiffSynth-Studio/Qwen-Image-Edit-2511-ICEdit-LoRA:model.safetensors", 1),),
        call={"edit_image": "3 images"},  # image A, its edit A', image B
    ),
    "Qwen-Image-Edit-Lowres-Fix.py": Runs(
        with_dit(EDIT), "edit_lowres_fix", "qwen-image-edit", processor=True, tokenizer=False,
        loras=(("models/DiffSynth-Studio/Qwen-Image-Edit-Lowres-Fix/model.safetensors", 1),),
    ),
    # fine-tunes no plugin declares: Edit-2509's architecture and call pattern (a list, no zero_cond_t)
    "FireRed-Image-Edit-1.0.py": Runs(with_dit("FireRedTeam/FireRed-Image-Edit-1.0"), "edit_multi",
                                      "qwen-image-edit-2509", processor=True, golden=True),
    "FireRed-Image-Edit-1.1.py": Runs(with_dit("FireRedTeam/FireRed-Image-Edit-1.1"), "edit_multi",
                                      "qwen-image-edit-2509", processor=True, golden=True),
    **{
        f"Qwen-Image-EliGen{suffix}.py": Runs(
            BASE, "eligen", "qwen-image-eligen",
            loras=((f"models/DiffSynth-Studio/Qwen-Image-EliGen{suffix}/model.safetensors", 1),),
            native_components={"lora": [LORA]},
        )
        for suffix in ("", "-V2", "-Poster")
    },
    "Qwen-Image-In-Context-Control-Union.py": Runs(
        BASE, "context_image", "qwen-image-in-context-control-union",
        loras=(("models/DiffSynth-Studio/Qwen-Image-In-Context-Control-Union/model.safetensors", 1),),
        native_components={"lora": [LORA]}, note=ANNOTATOR,
    ),
    "Qwen-Image-Context-Control.py": Runs(
        BASE, "context_image", "qwen-image-in-context-control-union",
        loras=(("models/DiffSynth-Studio/Qwen-Image-Context-Control/model.safetensors", 1),),
        native_components={"lora": [LORA]}, note=ANNOTATOR,
    ),
    "Qwen-Image-Blockwise-ControlNet-Canny.py": Runs(
        (*BASE, (CN + "Canny", "model.safetensors")), "controlnet", "qwen-image-blockwise-controlnet-canny",
        native_components={"blockwise_controlnet": [EXTRA / "controlnet_canny.safetensors"]}, golden=True,
    ),
    "Qwen-Image-Blockwise-ControlNet-Depth.py": Runs(
        (*BASE, (CN + "Depth", "model.safetensors")), "controlnet", "qwen-image-blockwise-controlnet-depth",
        native_components={"blockwise_controlnet": [EXTRA / "controlnet_depth.safetensors"]},
    ),
    "Qwen-Image-Blockwise-ControlNet-Inpaint.py": Runs(
        (*BASE, (CN + "Inpaint", "model.safetensors")), "controlnet_inpaint",
        "qwen-image-blockwise-controlnet-inpaint", call={"controlnet_ids": (0,)},
        native_components={"blockwise_controlnet": [EXTRA / "controlnet_inpaint.safetensors"]},
    ),
    "Qwen-Image-Blockwise-ControlNet-InpaintCanny.py": Runs(
        (*BASE, (CN + "Inpaint", "model.safetensors"), (CN + "Canny", "model.safetensors")),
        "controlnet_inpaint", "qwen-image-blockwise-controlnet-inpaint", call={"controlnet_ids": (0, 1)},
        native_components={"blockwise_controlnet": [EXTRA / "controlnet_inpaint.safetensors",
                                                    EXTRA / "controlnet_canny.safetensors"]},
    ),
    "Qwen-Image-Layered.py": Runs(with_dit(LAYERED_ID, vae=LAYERED_ID), "layered", "qwen-image-layered",
                                  processor=True, native_components=LAYERED_NATIVE, golden=True),
    "Qwen-Image-Layered-Control.py": Runs(
        with_dit("DiffSynth-Studio/Qwen-Image-Layered-Control", vae=LAYERED_ID), "layered_control",
        "qwen-image-layered-control", processor=True, call={"context_image": DROP, "cfg_scale": 4.0},
        native_components=LAYERED_NATIVE,
    ),
    "Qwen-Image-Layered-Control-V2.py": Runs(
        with_dit("DiffSynth-Studio/Qwen-Image-Layered-Control", vae=LAYERED_ID), "layered_control",
        "qwen-image-layered-control",
        loras=(("DiffSynth-Studio/Qwen-Image-Layered-Control-V2:model.safetensors", 1),),
        native_components=LAYERED_NATIVE,
    ),
    "Qwen-Image-SES.py": Not(
        "`enable_ses=True` (search over seeds scored by reward models such as PickScore) is not implemented; "
        "the call fails with a typed error naming `enable_ses`"
    ),
    "Qwen-Image-i2L.py": Not(
        "it calls DiffSynth's pipeline units (`QwenImageUnit_Image2LoRAEncode/Decode`) by hand; use "
        "`qi i2l` to make the LoRA, then `pipe.load_lora` (its last step) runs through the front"
    ),
    "Qwen-Video-Edit.py": Not("a video pipeline (`QwenVideoEditPipeline`, Wan VAE): not in qi's scope"),
}  # fmt: skip

# the folder's listing (DiffSynth-Studio, examples/qwen_image/model_inference): every file is in EXAMPLES
UPSTREAM = {
    "FireRed-Image-Edit-1.0.py", "FireRed-Image-Edit-1.1.py", "Qwen-Image-2512.py",
    "Qwen-Image-Blockwise-ControlNet-Canny.py", "Qwen-Image-Blockwise-ControlNet-Depth.py",
    "Qwen-Image-Blockwise-ControlNet-Inpaint.py", "Qwen-Image-Blockwise-ControlNet-InpaintCanny.py",
    "Qwen-Image-Context-Control.py", "Qwen-Image-Distill-DMD2.py", "Qwen-Image-Distill-Full.py",
    "Qwen-Image-Distill-LoRA.py", "Qwen-Image-Edit-2509.py", "Qwen-Image-Edit-2511-ICEdit.py",
    "Qwen-Image-Edit-2511-Lightning.py", "Qwen-Image-Edit-2511.py", "Qwen-Image-Edit-Lowres-Fix.py",
    "Qwen-Image-Edit.py", "Qwen-Image-EliGen-Poster.py", "Qwen-Image-EliGen-V2.py", "Qwen-Image-EliGen.py",
    "Qwen-Image-In-Context-Control-Union.py", "Qwen-Image-Layered-Control-V2.py",
    "Qwen-Image-Layered-Control.py", "Qwen-Image-Layered.py", "Qwen-Image-SES.py", "Qwen-Image-i2L.py",
    "Qwen-Image.py", "Qwen-Video-Edit.py",
}  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("examples")
    make_models_dir(base)
    # the DMD2 LoRA as PEFT saves it: "base_model.model." + module + ".lora_A.weight"
    peft = {
        "base_model.model." + k.replace(".default.weight", ".weight"): v for k, v in load_file(LORA).items()
    }
    (base / DMD2_FILE).parent.mkdir(parents=True)
    save_file(peft, base / DMD2_FILE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base / "models"))
        mp.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "true")
        mp.setenv("QI_CACHE_DIR", str(base / "cache"))
        mp.chdir(base)  # the examples load LoRAs by paths relative to the working folder
        yield base / "models"


def the_call(ex: Runs) -> dict[str, Any]:
    """The golden case's call with the script's own arguments; 2 steps unless compared with the golden run."""
    case, _, folder = golden_case(ex.case)
    call = {**call_args(case, folder), **QUIET}
    for k, v in ex.call.items():
        if v is DROP:
            call.pop(k)
        elif k == "controlnet_ids":  # the script's ControlNets, numbered as its model_configs
            first = call["blockwise_controlnet_inputs"][0]
            call["blockwise_controlnet_inputs"] = [
                {**first, "controlnet_id": i, "inpaint_mask": first["inpaint_mask"] if i == 0 else None}
                for i in v
            ]
        elif v == "3 images":
            call["edit_image"] = [*call["edit_image"], call["edit_image"][0]]
        else:
            call[k] = v
    if "blockwise_controlnet_inputs" in call:
        call["blockwise_controlnet_inputs"] = [
            ControlNetInput(**c) for c in call["blockwise_controlnet_inputs"]
        ]
    if not ex.golden:
        call["num_inference_steps"] = 2
    return call


def run_front(ex: Runs) -> QwenImagePipeline:
    kw: dict[str, Any] = {}
    if ex.processor:
        kw["processor_config"] = ModelConfig(model_id=EDIT, origin_file_pattern="processor/")
    if not ex.tokenizer:
        kw["tokenizer_config"] = None
    pipe = QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32, device="cpu",
        model_configs=[ModelConfig(model_id=m, origin_file_pattern=p) for m, p in ex.configs], **kw,
    )  # fmt: skip
    for ref, alpha in ex.loras:
        if ref.startswith("state_dict:"):  # the DMD2 example's way
            sd = load_state_dict(ref.partition(":")[2])
            sd = {k.replace("base_model.model.", ""): v for k, v in sd.items()}
            pipe.load_lora(pipe.dit, state_dict=sd)
        elif ref.startswith("models/"):
            pipe.load_lora(pipe.dit, ref, alpha=alpha)
        else:
            repo, _, file = ref.partition(":")
            pipe.load_lora(pipe.dit, ModelConfig(model_id=repo, origin_file_pattern=file), alpha=alpha)
    if ex.scheduler:
        pipe.scheduler = FlowMatchScheduler(ex.scheduler)
    return pipe


def run_native(ex: Runs) -> Any:
    # the LoRAs the recipe does not bring itself (its own "lora" slot takes native_components["lora"])
    loras = [] if "lora" in ex.native_components else [LoRA(LORA, alpha) for _, alpha in ex.loras]
    pipe = qi.compose(ex.native, model=GOLDEN_MODEL, progress=False, components=dict(ex.native_components),
                      adapters=loras)  # fmt: skip
    if ex.scheduler:
        pipe.scheduler = qi.get_scheduler(ex.scheduler.lower())
    return pipe


RUNS = [name for name, ex in EXAMPLES.items() if isinstance(ex, Runs)]


@pytest.mark.parametrize("script", RUNS)
def test_example_runs_through_the_front(models, script):
    ex = EXAMPLES[script]
    assert isinstance(ex, Runs)
    call = the_call(ex)
    pipe = run_front(ex)
    ours = pipe(**call)
    assert same(ours, run_native(ex)(**call)), f"{script}: the front differs from qi.compose({ex.native!r})"
    if ex.golden:
        within_golden(ours, ex.case)


def test_fine_tune_of_unknown_id_gets_the_processor_and_edit_injector(models):
    """FireRed-Image-Edit is an Edit-2509 fine-tune no plugin declares: its weights pick an architecture, the
    processor_config a recipe that loads the VL processor, and edit_image the edit injector."""
    pipe = run_front(EXAMPLES["FireRed-Image-Edit-1.1.py"])
    assert "processor" in pipe.pipe.components and pipe.injector("edit-image") is not None
    assert pipe.recipe.startswith("qwen-image-edit")  # the plainest recipe with a processor slot


def test_dmd2_state_dict_matches_the_file(models):
    """DMD2's way (load_state_dict, strip PEFT's prefix, load_lora(state_dict=)) fuses the same LoRA as loading
    the prefixed file by its path, and a LoRA that changes the output at all."""
    ex = EXAMPLES["Qwen-Image-Distill-DMD2.py"]
    call = the_call(ex)
    by_state_dict = run_front(ex)(**call)
    by_path = run_front(Runs(BASE, ex.case, ex.native))
    plain = by_path(**call)
    by_path.load_lora(by_path.dit, DMD2_FILE)
    assert same(by_state_dict, by_path(**call))
    assert not same(by_state_dict, plain)
    sd = load_state_dict(DMD2_FILE, torch_dtype=torch.bfloat16)
    assert all(k.startswith("base_model.model.") and v.dtype == torch.bfloat16 for k, v in sd.items())
    assert load_state_dict([DMD2_FILE, str(LORA)]).keys() == {*sd, *load_file(LORA)}


def test_ses_parameters_fail_with_a_typed_error(models):
    pipe = run_front(Runs(BASE, "t2i", "qwen-image"))
    with pytest.raises(InvalidInputError, match="'enable_ses'"):
        pipe(
            "x", seed=0, num_inference_steps=1, height=32, width=32, enable_ses=True, ses_reward_model="pick"
        )


# -- loading by paths only: the weights say what they are ------------------------------------------------------
def by_paths(*files: Path, processor: bool = True) -> QwenImagePipeline:
    kw = (
        {"processor_config": ModelConfig(model_id=EDIT, origin_file_pattern="processor/")}
        if processor
        else {}
    )
    return QwenImagePipeline.from_pretrained(
        torch_dtype=torch.float32,
        device="cpu",
        model_configs=[ModelConfig(path=[str(f)]) for f in files],
        **kw,
    )


LAYERED_FILES = (
    LAYERED / "transformer" / "diffusion_pytorch_model.safetensors",
    QI / "text_encoder" / "model.safetensors",
    LAYERED / "vae" / "diffusion_pytorch_model.safetensors",
)


@pytest.mark.parametrize(("case", "native"), [("layered", "qwen-image-layered"),
                                              ("layered_control", "qwen-image-layered-control")])  # fmt: skip
def test_layered_weights_by_path_pick_the_layered_dit(models, case, native):
    pipe = by_paths(*LAYERED_FILES, processor=case == "layered")
    assert pipe.recipe == "qwen-image-layered"  # Layered and Layered-Control share the architecture
    ex = Runs((), case, native, golden=True, native_components=LAYERED_NATIVE)
    call = the_call(ex)
    ours = pipe(**call)
    assert isinstance(ours, list) and same(ours, run_native(ex)(**call))
    within_golden(ours, case)


def test_base_weights_by_path_do_not_pick_the_layered_dit(models):
    pipe = by_paths(QI / "transformer" / "diffusion_pytorch_model.safetensors", *LAYERED_FILES[1:2],
                    QI / "vae" / "diffusion_pytorch_model.safetensors", processor=False)  # fmt: skip
    assert pipe.recipe == "qwen-image"


# -- the docs and the migration command ------------------------------------------------------------------------
def test_every_upstream_example_is_listed_here_and_in_the_docs():
    assert set(EXAMPLES) == UPSTREAM
    rows = dict(re.findall(r"^\| `([^`]+\.py)` \| ([^|]+) \|", DOCS.read_text(), flags=re.M))
    assert set(rows) == UPSTREAM, "docs/diffsynth.md: the example table must list every script once"
    for name, ex in EXAMPLES.items():
        runs = rows[name].strip().startswith("runs")
        assert runs == isinstance(ex, Runs), f"docs/diffsynth.md says {rows[name].strip()!r} for {name}"


def test_migration_changes_the_helper_imports_and_reports_the_rest():
    text, changed, left = migrate_source(
        "from diffsynth.pipelines.qwen_image import QwenImagePipeline, ModelConfig\n"
        "from diffsynth.core import load_state_dict\n"
        "from diffsynth import load_state_dict as lsd\n"
        "from diffsynth.utils.lora import merge_lora\n"
        "from diffsynth.pipelines.qwen_image import (\n"
        "    QwenImagePipeline,  # multi-line\n"
        "    ModelConfig, FlowMatchScheduler,\n"
        ")\n"
        "from diffsynth.controlnets.processors import Annotator\n"
        "from diffsynth.pipelines.qwen_image import (\n"
        "    QwenImagePipeline, QwenImageUnit_Image2LoRAEncode,\n"
        ")\n"
    )
    assert text.splitlines()[:5] == [
        "from qi_plugins.diffsynth_compat import QwenImagePipeline, ModelConfig",
        "from qi_plugins.diffsynth_compat import load_state_dict",
        "from qi_plugins.diffsynth_compat import load_state_dict as lsd",
        "from qi_plugins.diffsynth_compat import merge_lora",
        "from qi_plugins.diffsynth_compat import QwenImagePipeline, ModelConfig, FlowMatchScheduler",
    ]
    assert [n for n, *_ in changed] == [1, 2, 3, 4, 5]
    assert [n for n, _ in left] == [9, 10]  # no qi equivalent: reported, left as they are
    assert text.splitlines()[5:] == [
        "from diffsynth.controlnets.processors import Annotator",
        "from diffsynth.pipelines.qwen_image import (",
        "    QwenImagePipeline, QwenImageUnit_Image2LoRAEncode,",
        ")",
    ]
