"""The torch-only Qwen2-VL preprocessing and the edit prompt embeddings against the official implementations.

Reference: transformers' ``Qwen2VLProcessor`` and diffusers' ``QwenImageEditPipeline`` /
``QwenImageEditPlusPipeline.encode_prompt`` on the golden tiny model. transformers' fast image processor needs
torchvision, which is not installed, so the reference processor uses the PIL image processor (scoped
workaround, diffusers.md §5.3 item 5) on images whose sizes need no resizing (multiples of 28 that are fixed
points of the 384²-area rule): both resize paths are then skipped and the rest is compared. Our resize itself is
checked bit-exactly against the golden ``prompt_pixel_values`` (test_golden_edit.py).
"""

from __future__ import annotations

import itertools
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import GOLDEN_MODEL
from edit_helpers import edit_pipe, run_traced
from PIL import Image
from tolerance import TINY_VL_TERMS, check_float32_gap, float32_bound

from qi_core.errors import InvalidInputError, ModelLoadError
from qi_plugins.edit.injector import EDIT_DROP, VL_AREA, area_size, edit_template
from qi_plugins.edit.vision import VisionConfig, load_processor, smart_resize

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
PROMPT = "Put the hat from picture 2 on the cat in picture 1"


def pixel_tolerance(reference) -> float:
    """Two float32 normalisations of the same 8-bit pixels (×1/255, − mean, ÷ std: ≤ 4 rounded steps each,
    whatever order or precision each implementation uses) differ by at most twice the float32 bound of that
    chain."""
    return 2 * float32_bound(reference["pixel_values"], terms=4)


def random_image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def reference():
    """diffusers' Edit and EditPlus pipelines (text side only) with transformers' processor, PIL backend."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class

    def skip_none(self, name, arg):  # video_processor=None would need torchvision's class to check against
        return None if arg is None else check(self, name, arg)

    cfg = VisionConfig.from_dict(
        __import__("json").loads((GOLDEN_MODEL / "processor/preprocessor_config.json").read_text())
    )
    tok = AutoTokenizer.from_pretrained(GOLDEN_MODEL / "processor")
    image_processor = Qwen2VLImageProcessorPil(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", skip_none):
        processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=None)
    te = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        GOLDEN_MODEL / "text_encoder", dtype=torch.float32
    )
    parts = dict(
        scheduler=None, vae=None, text_encoder=te, tokenizer=tok, processor=processor, transformer=None
    )
    return {
        "processor": processor,
        "single": diffusers.QwenImageEditPipeline(**parts),
        "plus": diffusers.QwenImageEditPlusPipeline(**parts),
    }


@pytest.mark.parametrize("multi", [False, True], ids=["edit-single", "edit-plus"])
def test_prompt_embeddings_match_official_encode_prompt(reference, multi):
    """Through the public pipeline: what our injector and processor give the text encoder vs diffusers.

    Tolerance (``tests/tolerance.py``): both sides in float64 (qi with ``torch_dtype=float64``, transformers'
    encoder ``.double()``) agree to 7.2e-7 / 9.5e-7 (single / plus; both keep float32 RMS norms and RoPE), and
    each float32 embedding (max 3.8) is within 2.9e-6 / 4.0e-6 of its float64 one. The float64 runs double the
    cost of this slow test (a vision tower on 2 x 768 patches), so it checks the float32 gap against twice the
    float32 bound of the vision-language encoder (2.9e-4 here) instead."""
    # 672x224 and 224x672: multiples of 28 and of 16, unchanged by the 384²-area rule → no resampling anywhere
    images = [random_image(672, 224, 1), random_image(224, 672, 2)] if multi else random_image(672, 224, 3)
    pipe = edit_pipe("qwen-image-edit-2509" if multi else "qwen-image-edit")
    _, got = run_traced(
        pipe, prompt=PROMPT, edit_image=images, edit_image_auto_resize=False, cfg_scale=1.0, height=32, width=32,
        num_inference_steps=2, seed=0, output_type="latent",
    )  # fmt: skip
    ref_pipe = reference["plus" if multi else "single"]
    assert ref_pipe.prompt_template_encode_start_idx == EDIT_DROP
    want, mask = ref_pipe.encode_prompt(prompt=[PROMPT], image=images, device="cpu")
    assert mask is None  # one prompt: all tokens real, as our all-ones mask says
    ours = got["prompt_emb"]
    assert ours.shape == want.shape
    check_float32_gap(ours, want, terms=TINY_VL_TERMS)
    # the processor outputs themselves
    ims = images if multi else [images]
    template = edit_template(len(ims) if multi else None)
    ref_enc = reference["processor"](
        text=[template.format(PROMPT)], images=ims, padding=True, return_tensors="pt"
    )
    assert torch.equal(got["prompt_input_ids"], ref_enc["input_ids"])
    assert torch.equal(got["prompt_image_grid_thw"], ref_enc["image_grid_thw"])
    pixel_diff = (got["prompt_pixel_values"] - ref_enc["pixel_values"]).abs().max().item()
    assert pixel_diff <= pixel_tolerance(ref_enc)


def test_processor_matches_transformers_pixel_values_without_resizing(reference):
    ours = load_processor(GOLDEN_MODEL / "processor", GOLDEN_MODEL)
    images = [random_image(56, 84, 4), random_image(112, 28 * 3, 5).convert("L")]  # grayscale → RGB as well
    text = ["a <|image_pad|> b <|image_pad|>"]
    got = ours(text=text, images=images)
    want = reference["processor"](text=text, images=images, padding=True, return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    assert torch.equal(got["image_grid_thw"], want["image_grid_thw"])
    assert (got["pixel_values"] - want["pixel_values"]).abs().max().item() <= pixel_tolerance(want)
    assert set(got) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"}


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref

    cfg = VisionConfig(min_pixels=3136, max_pixels=200_000)
    for h, w in itertools.product([1, 27, 28, 41, 64, 80, 300, 811], [5, 28, 57, 96, 1248, 2000]):
        if max(h, w) / min(h, w) > 200:
            continue
        assert smart_resize(h, w, cfg) == ref(h, w, 28, 3136, 200_000), (h, w)


def test_area_sizes_follow_the_golden_rule():
    assert area_size(96, 64, 1024 * 1024) == (1248, 832)  # edit_single_autoresize
    assert area_size(64, 64, VL_AREA) == (384, 384)  # edit_multi
    assert area_size(80, 48, VL_AREA) == (480, 288)
    assert area_size(48, 80, VL_AREA) == (288, 480)  # edit_2511
    assert area_size(96, 64, VL_AREA) == (480, 320)


def test_transparent_image_is_composited_on_white():
    proc = load_processor(GOLDEN_MODEL / "processor")
    rgba = Image.new("RGBA", (56, 56), (10, 20, 30, 0))  # fully transparent → white
    white = Image.new("RGB", (56, 56), (255, 255, 255))
    assert torch.equal(proc.images([rgba])[0], proc.images([white])[0])


def test_vision_errors():
    with pytest.raises(ModelLoadError, match="resample=2"):
        VisionConfig.from_dict({"resample": 2})
    with pytest.raises(InvalidInputError, match="aspect ratio 250.0 > 200"):
        smart_resize(1, 250, VisionConfig())
    proc = load_processor(GOLDEN_MODEL / "processor")
    with pytest.raises(InvalidInputError, match="2 <\\|image_pad\\|> tokens for 1 images"):
        proc(text=["<|image_pad|><|image_pad|>"], images=[random_image(56, 56, 0)])


def test_config_reads_both_size_spellings():
    assert VisionConfig.from_dict({"size": {"shortest_edge": 100, "longest_edge": 900}}).max_pixels == 900
    cfg = VisionConfig.from_dict(
        {"min_pixels": 7, "max_pixels": 8, "size": {"shortest_edge": 1, "longest_edge": 2}}
    )
    assert (cfg.min_pixels, cfg.max_pixels) == (7, 8)  # top-level keys win, as in transformers
