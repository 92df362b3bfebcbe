"""Prompt embeddings against the official ``QwenImagePipeline.encode_prompt`` (identical, not just close)."""

from __future__ import annotations

import pytest
import torch
from conftest import GOLDEN_MODEL

from qi_plugins.qwen_image.text_encoder import T2I_DROP, load_text_encoder

diffusers = pytest.importorskip("diffusers")
PROMPTS = [
    "A red fox sitting in a snowy forest, watercolor painting",
    "",
    "一只狐狸坐在雪地里，水彩画",
    "  spaces\tand tabs  ",
]


@pytest.fixture(scope="module", params=["golden", "tiny"])
def both(request, tiny_model):
    root = GOLDEN_MODEL if request.param == "golden" else tiny_model
    ref = diffusers.QwenImagePipeline.from_pretrained(root, dtype=torch.float32)
    return load_text_encoder(root, root / "text_encoder"), ref


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_embeddings_identical_to_official(both, prompt):
    ours, ref = both
    assert ref.prompt_template_encode_start_idx == T2I_DROP
    emb, mask = ref.encode_prompt(prompt=[prompt], device="cpu")
    seg = ours.encode_prompt(prompt)
    assert seg.emb.shape == emb.shape
    assert torch.equal(seg.emb, emb), (seg.emb - emb).abs().max()
    want_mask = torch.ones(emb.shape[:2], dtype=torch.long) if mask is None else mask
    assert torch.equal(seg.mask.long(), want_mask.long())


def test_embedding_starts_at_the_user_text(both):
    """The 34-token system prefix is gone: the first kept token is the first prompt token."""
    ours, _ = both
    enc = ours.tokenize("zebra")
    prefix = ours.tokenizer.decode(enc["input_ids"][0][:T2I_DROP])
    assert prefix.endswith("<|im_start|>user\n")
    assert ours.tokenizer.decode(enc["input_ids"][0][T2I_DROP:]).startswith("zebra")
