"""Prompt encoding with Qwen2.5-VL (transformers), the official templates and drop indices."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from qi_core.errors import ModelLoadError
from qi_core.loading import check_safetensors, component_folder
from qi_core.protocols import TextSegment

# Official templates (diffusers QwenImagePipeline / DiffSynth QwenImageUnit_PromptEmbedder).
T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
T2I_DROP = 34  # tokens of the T2I system prefix, removed from the embedding
MAX_TOKENS = 4096  # prompt tokens kept after the prefix (DiffSynth's limit; diffusers uses 1024)


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder's token limit; its end was dropped."""


class QwenTextEncoder:
    """Holds the tokenizer, the optional VL processor and the Qwen2.5-VL model."""

    def __init__(self, model: Any, tokenizer: Any, processor: Any = None):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def tokenize(
        self, prompt: str, template: str = T2I_TEMPLATE, drop: int = T2I_DROP, max_tokens: int = MAX_TOKENS
    ):
        """The templated prompt's tokens, cut to ``max_tokens`` after the ``drop``-token prefix (the official
        pipelines' ``max_length``), with a :class:`PromptTruncatedWarning` when anything was cut."""
        text = [template.format(prompt)]
        limit = max_tokens + drop
        enc = self.tokenizer(text, max_length=limit, padding=True, truncation=True, return_tensors="pt")
        if enc["input_ids"].shape[1] >= limit:  # at the limit: count once more, uncut, to say what was lost
            total = len(self.tokenizer(text, truncation=False)["input_ids"][0])
            if total > limit:
                warnings.warn(
                    f"prompt too long for the text encoder: {total - drop} tokens after the {drop}-token "
                    f"template prefix, limit {max_tokens}; the last {total - limit} tokens were dropped (the "
                    "end of the prompt and the template's closing tokens). Shorten the prompt to keep all of it",
                    PromptTruncatedWarning,
                    stacklevel=2,
                )
        return enc

    @torch.no_grad()
    def encode_prompt(self, prompt: str, *, images: Sequence[Any] | None = None, template: str | None = None,
                      drop: int | None = None, max_tokens: int = MAX_TOKENS, processor: Any = None) -> TextSegment:  # fmt: skip
        """Last hidden state (after the final norm) of the templated prompt, prefix dropped; mask all ones.

        ``processor``: a VL processor for this call (e.g. the edit plugin's torch-only one); default: our own.
        """
        template = template or T2I_TEMPLATE
        drop = T2I_DROP if drop is None else drop
        if images:
            processor = self.processor if processor is None else processor
            if processor is None:
                raise ModelLoadError("prompts with images need the VL processor (processor/ folder)")
            enc = processor(text=[template.format(prompt)], images=list(images), padding=True,
                            return_tensors="pt")  # fmt: skip
            # exactly what the official pipelines pass: mm_token_type_ids would switch on 3-D M-RoPE positions
            enc = {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
        else:
            enc = self.tokenize(prompt, template, drop, max_tokens)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        out = self.model.model(**enc, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        keep = hidden[0][enc["attention_mask"][0].bool()][drop:]
        emb = keep[None]
        return TextSegment(emb=emb, mask=torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device))


def load_text_encoder(root: Path, folder: Path, device: Any = "cpu", dtype: torch.dtype | None = None,
                      processor_subfolder: str | None = "processor") -> QwenTextEncoder:  # fmt: skip
    """``text_encoder/`` + ``tokenizer/`` (+ ``processor/`` when present) of an official repository."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tok_dir = component_folder(root, "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    processor = None
    if processor_subfolder and (root / processor_subfolder).is_dir():
        processor = _load_processor(root / processor_subfolder)
    from transformers.utils import logging as hf_logging

    for f in sorted(folder.glob("*.safetensors")):  # transformers would raise a bare SafetensorError
        check_safetensors(f)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one bar per pipeline is enough (qi.compose shows it)
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder), dtype=dtype or torch.float32)
    except OSError as e:
        raise ModelLoadError(f"could not load the text encoder from {folder}: {e}") from e
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    model = model.to(device).eval().requires_grad_(False)
    return QwenTextEncoder(model, tokenizer, processor)


def _load_processor(folder: Path) -> Any:
    """The Qwen2-VL processor, or None when it cannot be built here (the edit plugin brings its own)."""
    try:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(str(folder))
    except Exception:
        return None
