"""Tests for the tiny Qwen-Image text stack builder (tokenizer, processor, text encoder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qi_plugins.qwen_image import tiny_text
from qi_plugins.qwen_image.tiny_text import (
    EDIT_DROP,
    EDIT_MULTI_TEMPLATE,
    EDIT_PICTURE_PREFIX,
    EDIT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    T2I_DROP,
    T2I_TEMPLATE,
    TinyTextBuildError,
    TinyTextEncoderConfig,
    build_processor,
    build_text_encoder,
    build_tokenizer,
)

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden" / "models" / "qwen_image"
BPE_SIZE = 1185


def _build_all(root: Path) -> Path:
    build_tokenizer(root / "tokenizer")
    build_processor(root / "processor", root / "tokenizer")
    build_text_encoder(root / "text_encoder", root / "tokenizer", seed=0)
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return _build_all(tmp_path_factory.mktemp("tiny_text_a"))


@pytest.fixture(scope="module")
def hf_tokenizer(built):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built / "tokenizer")


def _t2i_prefix() -> str:
    return T2I_TEMPLATE[: T2I_TEMPLATE.index("{}")]


def _edit_prefix() -> str:
    return EDIT_TEMPLATE[: EDIT_TEMPLATE.index("<|vision_start|>")]


# ---------------------------------------------------------------------------------------------- templates


def test_templates_are_consistent():
    assert T2I_TEMPLATE.startswith("<|im_start|>system\nDescribe the image by detailing")
    assert T2I_TEMPLATE.endswith("<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>" in EDIT_TEMPLATE
    # the multi-image template is the single-image one with the picture prefix moved to the caller
    assert EDIT_MULTI_TEMPLATE.format("<|vision_start|><|image_pad|><|vision_end|>{}") == EDIT_TEMPLATE
    assert (T2I_DROP, EDIT_DROP) == (34, 64)
    assert len(QWEN_SPECIAL_TOKENS) == 22 and len(set(QWEN_SPECIAL_TOKENS)) == 22


def test_templates_match_diffusers():
    pytest.importorskip("diffusers")
    import inspect

    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline

    def template_of(cls):
        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        pipe = cls(**dict.fromkeys(params))
        return pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx

    assert template_of(QwenImagePipeline) == (T2I_TEMPLATE, T2I_DROP)
    assert template_of(QwenImageEditPipeline) == (EDIT_TEMPLATE, EDIT_DROP)
    assert template_of(QwenImageEditPlusPipeline) == (EDIT_MULTI_TEMPLATE, EDIT_DROP)


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_files(built):
    names = sorted(p.name for p in (built / "tokenizer").iterdir())
    assert names == sorted(tiny_text.TOKENIZER_FILES)
    assert names == sorted(p.name for p in (GOLDEN / "tokenizer").iterdir())
    # same tokenizer.json pipeline as the reference (normalizer, pre-tokenizer, BPE options, added tokens, ...)
    ours = json.loads((built / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))
    golden = json.loads((GOLDEN / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))
    assert sorted(ours) == sorted(golden)
    for key in golden:
        if key != "model":
            assert ours[key] == golden[key], key
    options = {k: v for k, v in ours["model"].items() if k not in ("vocab", "merges")}
    assert options == {k: v for k, v in golden["model"].items() if k not in ("vocab", "merges")}
    assert len(ours["model"]["vocab"]) == BPE_SIZE and len(ours["model"]["merges"]) == BPE_SIZE - 256
    merges = (built / "tokenizer" / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + BPE_SIZE - 256


def test_prefix_lengths_match_drop_indices(hf_tokenizer):
    assert len(hf_tokenizer(_t2i_prefix()).input_ids) == T2I_DROP
    assert len(hf_tokenizer(_edit_prefix()).input_ids) == EDIT_DROP
    multi_prefix = EDIT_MULTI_TEMPLATE[: EDIT_MULTI_TEMPLATE.index("{}")]
    assert len(hf_tokenizer(multi_prefix).input_ids) == EDIT_DROP
    # the first kept token is the user text itself
    ids = hf_tokenizer(T2I_TEMPLATE.format("a cat")).input_ids
    assert hf_tokenizer.decode(ids[T2I_DROP:]) == "a cat<|im_end|>\n<|im_start|>assistant\n"
    ids = hf_tokenizer(EDIT_TEMPLATE.format("a cat")).input_ids
    assert hf_tokenizer.convert_ids_to_tokens(ids[EDIT_DROP]) == "<|vision_start|>"


def test_prefix_tokens_match_golden_tokenizer(hf_tokenizer):
    from transformers import AutoTokenizer

    golden = AutoTokenizer.from_pretrained(GOLDEN / "tokenizer")
    for text in (_t2i_prefix(), _edit_prefix()):
        ours = hf_tokenizer.convert_ids_to_tokens(hf_tokenizer(text).input_ids)
        assert ours == golden.convert_ids_to_tokens(golden(text).input_ids)


def test_special_token_ids_contiguous(built, hf_tokenizer):
    vocab = json.loads((built / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == BPE_SIZE
    assert sorted(vocab.values()) == list(range(BPE_SIZE))
    ids = hf_tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL_TOKENS))
    assert ids == list(range(BPE_SIZE, BPE_SIZE + 22))
    assert len(hf_tokenizer) == BPE_SIZE + 22
    assert hf_tokenizer.eos_token == "<|im_end|>" and hf_tokenizer.eos_token_id == BPE_SIZE + 2
    assert hf_tokenizer.pad_token == "<|endoftext|>" and hf_tokenizer.pad_token_id == BPE_SIZE
    assert hf_tokenizer.bos_token is None and hf_tokenizer.unk_token is None
    assert type(hf_tokenizer).__name__ == "Qwen2Tokenizer"
    # same added-token table as the reference tiny model
    config = json.loads((built / "tokenizer" / "tokenizer_config.json").read_text(encoding="utf-8"))
    golden = json.loads((GOLDEN / "tokenizer" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config == golden


@pytest.mark.parametrize(
    "text",
    [
        T2I_TEMPLATE.format("a cat"),
        T2I_TEMPLATE.format("一只可爱的小猫, 3 dogs & résumé — 🐱  double  spaces\ttab"),
        EDIT_TEMPLATE.format("Make the sky purple."),
        EDIT_MULTI_TEMPLATE.format(
            EDIT_PICTURE_PREFIX.format(1) + EDIT_PICTURE_PREFIX.format(2) + "Put the cat on the sofa."
        ),
    ],
)
def test_encode_decode_roundtrip(hf_tokenizer, text):
    ids = hf_tokenizer(text).input_ids
    assert hf_tokenizer.decode(ids) == text
    assert max(ids) < BPE_SIZE + 22


def test_legacy_vocab_merges_load_identically(built, hf_tokenizer, tmp_path):
    from transformers import Qwen2Tokenizer

    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(built / "tokenizer" / name, tmp_path / name)
    legacy = Qwen2Tokenizer.from_pretrained(tmp_path)
    for text in (T2I_TEMPLATE.format("a red fox, 42 stars"), EDIT_TEMPLATE.format("change it")):
        assert legacy(text).input_ids == hf_tokenizer(text).input_ids


def test_prefix_check_raises_when_template_words_are_not_merged(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_text, "_TEMPLATE_REPEATS", 0)
    monkeypatch.setattr(tiny_text, "SAMPLE_PROMPTS", ("a cat", "a dog"))
    with pytest.raises(TinyTextBuildError, match="tokenizes to"):
        build_tokenizer(tmp_path / "tok", vocab_size=260)
    with pytest.raises(TinyTextBuildError, match="only yields"):
        build_tokenizer(tmp_path / "tok", vocab_size=BPE_SIZE)


# ---------------------------------------------------------------------------------------------- processor


def test_processor_folder(built):
    proc = built / "processor"
    assert sorted(p.name for p in proc.iterdir()) == sorted(p.name for p in (GOLDEN / "processor").iterdir())
    for name in tiny_text.TOKENIZER_FILES:
        assert (proc / name).read_bytes() == (built / "tokenizer" / name).read_bytes()
    for name in ("preprocessor_config.json", "processor_config.json"):
        ours = json.loads((proc / name).read_text(encoding="utf-8"))
        assert ours == json.loads((GOLDEN / "processor" / name).read_text(encoding="utf-8"))
    from transformers import AutoImageProcessor

    image_processor = AutoImageProcessor.from_pretrained(proc)
    assert type(image_processor).__name__.startswith("Qwen2VLImageProcessor")
    assert image_processor.patch_size == 14 and image_processor.merge_size == 2
    assert image_processor.temporal_patch_size == 2


# ---------------------------------------------------------------------------------------------- text encoder


def test_text_encoder_matches_golden_layout(built):
    from safetensors import safe_open

    te = built / "text_encoder"
    assert sorted(p.name for p in te.iterdir()) == sorted(p.name for p in (GOLDEN / "text_encoder").iterdir())
    for name in ("config.json", "generation_config.json"):
        ours = json.loads((te / name).read_text(encoding="utf-8"))
        assert ours == json.loads((GOLDEN / "text_encoder" / name).read_text(encoding="utf-8"))
    with (
        safe_open(te / "model.safetensors", "pt") as f,
        safe_open(GOLDEN / "text_encoder" / "model.safetensors", "pt") as g,
    ):
        assert sorted(f.keys()) == sorted(g.keys())
        for key in f.keys():
            a, b = f.get_slice(key), g.get_slice(key)
            assert (a.get_shape(), a.get_dtype()) == (b.get_shape(), b.get_dtype()), key
        assert f.metadata() == {"format": "pt"}


def test_text_encoder_loads_and_depends_on_text(built, hf_tokenizer):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        built / "text_encoder", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info.get("mismatched_keys") and not info.get("error_msgs")
    assert model.dtype == torch.float32
    assert model.config.image_token_id == hf_tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == hf_tokenizer.convert_tokens_to_ids("<|vision_start|>")

    def embed(prompt: str) -> torch.Tensor:
        enc = hf_tokenizer([T2I_TEMPLATE.format(prompt)], return_tensors="pt")
        with torch.no_grad():
            out = model(**enc, output_hidden_states=True)
        return out.hidden_states[-1][0, T2I_DROP:]

    a, b = embed("a red cat"), embed("a blue dog")
    assert a.shape == b.shape == (8, 64)
    assert torch.isfinite(a).all()
    assert (a - b).abs().max() > 0.1 * a.abs().max()


def test_text_encoder_seed_changes_weights(built, tmp_path):
    from safetensors.torch import load_file

    build_text_encoder(tmp_path / "te", built / "tokenizer", seed=1)
    a = load_file(built / "text_encoder" / "model.safetensors")
    b = load_file(tmp_path / "te" / "model.safetensors")
    assert not (a["model.embed_tokens.weight"] == b["model.embed_tokens.weight"]).all()


def test_text_encoder_config_validation(built, tmp_path):
    with pytest.raises(TinyTextBuildError, match="mrope_section"):
        build_text_encoder(
            tmp_path / "te", built / "tokenizer", config=TinyTextEncoderConfig(mrope_section=(2, 2, 2))
        )
    with pytest.raises(TinyTextBuildError, match="vocab_size"):
        build_text_encoder(
            tmp_path / "te", built / "tokenizer", config=TinyTextEncoderConfig(vocab_size=1000)
        )


# ---------------------------------------------------------------------------------------------- determinism


def test_build_is_deterministic(built, tmp_path):
    import torch

    torch.manual_seed(123)
    state = torch.get_rng_state()
    second = _build_all(tmp_path / "b")
    assert torch.equal(torch.get_rng_state(), state), "the builder must not touch the global RNG"
    files_a = sorted(p.relative_to(built) for p in built.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert files_a == files_b
    assert not [p for p in files_a if p.name.startswith(".")], "temporary files left behind"
    for rel in files_a:
        assert (built / rel).read_bytes() == (second / rel).read_bytes(), rel


def test_rebuild_in_place_overwrites(built, tmp_path):
    target = tmp_path / "tok"
    build_tokenizer(target)
    (target / "vocab.json").write_text("garbage", encoding="utf-8")
    build_tokenizer(target)
    assert (target / "vocab.json").read_bytes() == (built / "tokenizer" / "vocab.json").read_bytes()
    assert sorted(p.name for p in target.iterdir()) == sorted(tiny_text.TOKENIZER_FILES)
