"""Tiny, deterministic Qwen-Image text stack: tokenizer, processor and text encoder.

Used by ``qi make-tiny-model`` to write the ``tokenizer/``, ``processor/`` and ``text_encoder/`` folders of a
tiny random Qwen-Image model in the official repository layout. Everything is built offline:

* the tokenizer is a byte-level BPE trained with the ``tokenizers`` library, using Qwen2's exact
  pre-tokenizer (NFC, the Qwen2 split regex, ByteLevel) on a small corpus made of the Qwen-Image prompt
  templates and some sample prompts. The 22 Qwen2.5-VL special tokens follow the BPE vocabulary with
  contiguous ids in Qwen's order. The corpus makes every word of the system prompts a single token, so the
  system prefixes tokenize to exactly :data:`T2I_DROP` (34) and :data:`EDIT_DROP` (64) tokens, as with the
  real tokenizer, and the hard-coded drop indices cut at the same place;
* the processor folder holds the tokenizer files and the real ``Qwen2VLImageProcessor`` settings;
* the text encoder is a randomly initialised (seeded) ``Qwen2_5_VLForConditionalGeneration`` saved in the
  legacy key layout of the real Qwen-Image ``text_encoder/`` (``model.*``, ``visual.*``, ``lm_head.*``).

All files are written atomically (temporary file in the same folder, then :func:`os.replace`), and
building twice gives byte-identical files.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

# --------------------------------------------------------------------------------------------------------
# Prompt templates (Qwen-Image 1.x). These may move to the text-encoder module later.
# --------------------------------------------------------------------------------------------------------

T2I_SYSTEM = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:"
)
EDIT_SYSTEM = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate."
)

#: Text-to-image template (also used for negative prompts, entity prompts and the layered pipeline).
T2I_TEMPLATE = (
    "<|im_start|>system\n"
    + T2I_SYSTEM
    + "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
#: Edit template for a single input image.
EDIT_TEMPLATE = (
    "<|im_start|>system\n"
    + EDIT_SYSTEM
    + "<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
#: Edit template for a list of images. The caller fills ``{}`` with the picture prefix
#: (``"Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: ..."``) followed by the prompt.
EDIT_MULTI_TEMPLATE = (
    "<|im_start|>system\n"
    + EDIT_SYSTEM
    + "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
#: Number of leading template tokens dropped from the text-encoder output (T2I).
T2I_DROP = 34
#: Number of leading template tokens dropped from the text-encoder output (Edit, single and multi image).
EDIT_DROP = 64

#: Picture prefix used by the multi-image edit template, formatted with the 1-based picture index.
EDIT_PICTURE_PREFIX = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"

# --------------------------------------------------------------------------------------------------------
# Special tokens
# --------------------------------------------------------------------------------------------------------

#: The 22 Qwen2.5-VL added tokens in Qwen's order (real ids 151643..151664).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
# In Qwen2.5-VL the first 14 added tokens are "special" (skipped when decoding), the last 8 are not.
_NUM_TRULY_SPECIAL = 14
_EOS_TOKEN = "<|im_end|>"
_PAD_TOKEN = "<|endoftext|>"
_BOS_TOKEN_FOR_MODEL = "<|endoftext|>"  # the model config's bos_token_id (the tokenizer has no bos)

#: Qwen2's pre-tokenization regex.
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

DEFAULT_BPE_VOCAB_SIZE = 1185
_TEMPLATE_REPEATS = 40
_MAX_EDIT_PICTURES = 3

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")

#: Sample prompts added to the tokenizer training corpus (after the templates).
SAMPLE_PROMPTS: tuple[str, ...] = (
    "a cat",
    "a dog",
    "A photo of a cat sitting on a wooden table next to a cup of coffee.",
    "A red fox running through a snowy forest at sunrise, cinematic lighting.",
    "A watercolor painting of a lighthouse on a rocky coast with crashing waves.",
    "A futuristic city skyline at night with neon signs and flying cars.",
    'A vintage poster with the text "Qwen-Image" in bold yellow letters on a blue background.',
    "Two children playing football in a green park, a golden retriever watching them.",
    "A close-up portrait of an old fisherman with a grey beard and a knitted hat.",
    "A bowl of ramen with a boiled egg, sliced pork, green onions and chopsticks.",
    "An astronaut riding a horse on the moon, highly detailed, 4k.",
    "A small wooden cabin beside a calm lake surrounded by tall pine trees and mountains.",
    "A minimalist logo of a mountain inside a circle, flat vector style, black and white.",
    "A bookshelf filled with colorful books, a potted plant and a reading lamp.",
    "Three glass bottles of different sizes on a windowsill, soft morning light.",
    "A street market in the rain, people holding umbrellas, reflections on the wet ground.",
    "An isometric illustration of a cozy bedroom with a desk, a computer and a sleeping cat.",
    "A chalkboard menu that says 'Today: soup $5, salad $7, cake $3'.",
    "A macro shot of a dew drop on a leaf, shallow depth of field.",
    "A knight in shining armor holding a sword, standing in front of a castle gate.",
    "Make the sky purple and add a rainbow.",
    "Change the color of the car to bright red.",
    "Remove the person on the left and fill in the background.",
    "Replace the text on the sign with 'OPEN 24 HOURS'.",
    "Turn the photo into a pencil sketch.",
    "Put the cat from picture 1 on the sofa from picture 2.",
    "Add a pair of sunglasses to the woman and make her smile.",
    "Let the man in the first image wear the jacket from the second image.",
    "一只可爱的小猫坐在窗台上，阳光洒在它的身上。",
    "一张写着“通义千问”的书法海报，红色背景，金色文字。",
    "A tiny robot watering flowers in a greenhouse, pastel colors, 3D render.",
    "A map of an imaginary island with rivers, villages and a dragon in the corner.",
    "A steaming cup of tea on a saucer, with a slice of lemon and two biscuits.",
    "A crowded train station in 1920s style, black and white photograph.",
    "A neon sign reading 'Good Vibes Only' on a brick wall.",
    "A stack of pancakes with maple syrup, blueberries and a mint leaf on top.",
    "A white swan gliding across a misty pond at dawn.",
    "An abstract composition of overlapping circles and triangles in warm colors.",
    "A desert landscape with sand dunes, a camel caravan and a setting sun.",
    "A hand-drawn comic panel of a superhero flying over the city, speech bubble: 'Up, up and away!'",
)

# --------------------------------------------------------------------------------------------------------
# Image processor settings (real Qwen-Image processor)
# --------------------------------------------------------------------------------------------------------

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_PREPROCESSOR_CONFIG = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": _CLIP_MEAN,
    "image_processor_type": "Qwen2VLImageProcessor",
    "image_std": _CLIP_STD,
    "merge_size": 2,
    "patch_size": 14,
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"longest_edge": 12845056, "shortest_edge": 3136},
    "temporal_patch_size": 2,
}
_PROCESSOR_CONFIG = {"processor_class": "Qwen2VLProcessor"}


class TinyTextBuildError(RuntimeError):
    """A tiny text component could not be built with the required properties."""


# --------------------------------------------------------------------------------------------------------
# Atomic file writes
# --------------------------------------------------------------------------------------------------------


_FILE_MODE = 0o644  # mkstemp creates 0600 files; use the usual mode of model files


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``)."""
    from qi_core.atomic import atomic_file

    with atomic_file(path, mode=_FILE_MODE) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically, without newline translation."""
    _atomic_write_bytes(path, text.encode("utf-8"))


def _json_text(obj: object) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------

_SPECIAL_SPLIT_RE = re.compile("|".join(re.escape(t) for t in QWEN_SPECIAL_TOKENS))


def _split_at_special_tokens(text: str) -> list[str]:
    """Split ``text`` at added tokens, as the tokenizer does before BPE (pieces are never empty)."""
    return [piece for piece in _SPECIAL_SPLIT_RE.split(text) if piece]


def _training_corpus() -> list[str]:
    """The deterministic BPE training corpus: template pieces (repeated) followed by the sample prompts.

    Templates are *split* at the special tokens (not stripped or replaced by spaces), which mirrors how
    added tokens are extracted before BPE; otherwise e.g. ``Ġsystem`` would be learnt instead of ``system``.
    """
    multi_prefix = "".join(EDIT_PICTURE_PREFIX.format(i + 1) for i in range(_MAX_EDIT_PICTURES))
    templates = (
        T2I_TEMPLATE.format(""),
        EDIT_TEMPLATE.format(""),
        EDIT_MULTI_TEMPLATE.format(multi_prefix),
    )
    corpus: list[str] = []
    for _ in range(_TEMPLATE_REPEATS):
        for template in templates:
            corpus.extend(_split_at_special_tokens(template))
    for prompt in SAMPLE_PROMPTS:
        corpus.extend(_split_at_special_tokens(prompt))
    return corpus


def _qwen2_components():
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors

    normalizer = normalizers.NFC()
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    decoder = decoders.ByteLevel()
    return normalizer, pre_tokenizer, post_processor, decoder


def _new_bpe_tokenizer(vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None):
    """A ``tokenizers.Tokenizer`` with a BPE model configured exactly like Qwen2's, plus Qwen2's components."""
    from tokenizers import Tokenizer, models

    bpe_kwargs = {} if vocab is None else {"vocab": vocab, "merges": merges}
    tok = Tokenizer(
        models.BPE(
            **bpe_kwargs,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer, tok.pre_tokenizer, tok.post_processor, tok.decoder = _qwen2_components()
    return tok


def _train_bpe(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train the byte-level BPE on :func:`_training_corpus`; returns ``(vocab, merges)``."""
    from tokenizers import pre_tokenizers, trainers

    tok = _new_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    model_json = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    return model_json["vocab"], merges


def _check_prefix_lengths(tok) -> None:
    t2i_prefix = T2I_TEMPLATE[: T2I_TEMPLATE.index("{}")]
    edit_prefix = EDIT_TEMPLATE[: EDIT_TEMPLATE.index("<|vision_start|>")]
    for name, prefix, expected in (("T2I", t2i_prefix, T2I_DROP), ("Edit", edit_prefix, EDIT_DROP)):
        n = len(tok.encode(prefix, add_special_tokens=False).ids)
        if n != expected:
            raise TinyTextBuildError(
                f"tiny tokenizer: the {name} system prefix tokenizes to {n} tokens, expected exactly "
                f"{expected} (the drop index); the BPE corpus or vocab_size does not merge every template word"
            )


def _tokenizer_config(first_special_id: int) -> dict:
    added_tokens_decoder = {
        str(first_special_id + i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": i < _NUM_TRULY_SPECIAL,
        }
        for i, token in enumerate(QWEN_SPECIAL_TOKENS)
    }
    extra = [t for t in QWEN_SPECIAL_TOKENS[:_NUM_TRULY_SPECIAL] if t not in (_EOS_TOKEN, _PAD_TOKEN)]
    return {
        "add_prefix_space": None,
        "backend": "tokenizers",
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": _EOS_TOKEN,
        "errors": "replace",
        "extra_special_tokens": extra,
        "model_max_length": 131072,
        "pad_token": _PAD_TOKEN,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
        "added_tokens_decoder": added_tokens_decoder,
    }


def build_tokenizer(out_dir: Path, vocab_size: int = DEFAULT_BPE_VOCAB_SIZE) -> None:
    """Train and write the tiny Qwen2 tokenizer to ``out_dir``.

    ``vocab_size`` is the size of the BPE vocabulary (256 byte symbols + merges); the 22 Qwen2.5-VL added
    tokens follow it with contiguous ids (``vocab_size`` .. ``vocab_size + 21``). Writes ``tokenizer.json``,
    ``tokenizer_config.json``, ``vocab.json`` and ``merges.txt`` (loadable with
    ``transformers.AutoTokenizer`` / ``Qwen2Tokenizer``, from ``tokenizer.json`` or from the legacy pair).

    Raises :class:`TinyTextBuildError` if the corpus cannot fill ``vocab_size``, if the added-token ids are
    not contiguous, or if the T2I / Edit system prefixes do not tokenize to exactly 34 / 64 tokens.
    """
    from tokenizers import AddedToken

    out_dir = Path(out_dir)
    vocab, merges = _train_bpe(vocab_size)
    if len(vocab) != vocab_size:
        raise TinyTextBuildError(
            f"tiny tokenizer: the training corpus only yields {len(vocab)} BPE tokens, {vocab_size} requested"
        )
    if sorted(vocab.values()) != list(range(vocab_size)):
        raise TinyTextBuildError("tiny tokenizer: BPE ids are not 0..vocab_size-1")

    # A fresh model from the trained vocab/merges (the trainer resets the BPE options to None; Qwen2's
    # tokenizer.json has "" for the subword prefix/suffix), then the added tokens in Qwen's order.
    tok = _new_bpe_tokenizer(vocab, merges)
    tok.add_tokens(
        [
            AddedToken(
                t,
                single_word=False,
                lstrip=False,
                rstrip=False,
                normalized=False,
                special=i < _NUM_TRULY_SPECIAL,
            )
            for i, t in enumerate(QWEN_SPECIAL_TOKENS)
        ]
    )
    ids = [tok.token_to_id(t) for t in QWEN_SPECIAL_TOKENS]
    if ids != list(range(vocab_size, vocab_size + len(QWEN_SPECIAL_TOKENS))):
        raise TinyTextBuildError(
            f"tiny tokenizer: special-token ids are not contiguous after the BPE vocab: {ids}"
        )
    _check_prefix_lengths(tok)

    merge_lines = [f"{a} {b}" for a, b in merges]
    vocab_sorted = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    _atomic_write_text(out_dir / "tokenizer.json", tok.to_str(pretty=True))
    _atomic_write_text(out_dir / "tokenizer_config.json", _json_text(_tokenizer_config(vocab_size)))
    _atomic_write_text(out_dir / "vocab.json", json.dumps(vocab_sorted, ensure_ascii=False))
    _atomic_write_text(
        out_dir / "merges.txt", "#version: 0.2\n" + "".join(line + "\n" for line in merge_lines)
    )


# --------------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------------


def build_processor(out_dir: Path, tokenizer_dir: Path) -> None:
    """Write the ``processor/`` folder: the tokenizer files of ``tokenizer_dir`` plus the real Qwen-Image
    ``Qwen2VLImageProcessor`` settings (``preprocessor_config.json``) and ``processor_config.json``."""
    out_dir = Path(out_dir)
    tokenizer_dir = Path(tokenizer_dir)
    for name in TOKENIZER_FILES:
        src = tokenizer_dir / name
        if not src.is_file():
            raise TinyTextBuildError(f"tiny processor: {src} is missing (build the tokenizer first)")
        _atomic_write_bytes(out_dir / name, src.read_bytes())
    _atomic_write_text(out_dir / "preprocessor_config.json", _json_text(_PREPROCESSOR_CONFIG))
    # (no trailing newline, as in the reference tiny model)
    _atomic_write_text(out_dir / "processor_config.json", json.dumps(_PROCESSOR_CONFIG, indent=2))


# --------------------------------------------------------------------------------------------------------
# Text encoder
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyTextEncoderConfig:
    """Hyper-parameters of the tiny ``Qwen2_5_VLForConditionalGeneration`` (real Qwen-Image value in the
    comments). The token ids are defaults for the default tokenizer; :func:`build_text_encoder` replaces
    them with the ids read from the tokenizer it is given."""

    # text model
    hidden_size: int = 64  # 3584
    num_hidden_layers: int = 2  # 28
    num_attention_heads: int = 4  # 28
    num_key_value_heads: int = 2  # 4
    intermediate_size: int = 128  # 18944
    vocab_size: int = 1280  # 152064
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # (16, 24, 24); sums to head_dim / 2
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 128000
    initializer_range: float = 0.02
    # vision tower
    vision_depth: int = 2  # 32
    vision_hidden_size: int = 32  # 1280
    vision_num_heads: int = 2  # 16
    vision_intermediate_size: int = 64  # 3420
    vision_out_hidden_size: int = 64  # 3584 (= hidden_size)
    vision_patch_size: int = 14
    vision_spatial_merge_size: int = 2
    vision_temporal_patch_size: int = 2
    vision_window_size: int = 112
    vision_fullatt_block_indexes: tuple[int, ...] = (1,)  # (7, 15, 23, 31)
    vision_tokens_per_second: int = 2
    # token ids (from the tokenizer)
    image_token_id: int = 1197
    video_token_id: int = 1198
    vision_start_token_id: int = 1194
    vision_end_token_id: int = 1195
    bos_token_id: int = 1185
    eos_token_id: int = 1187

    def to_hf_config(self):
        """The ``transformers.Qwen2_5_VLConfig`` for these values (float32)."""
        from transformers import Qwen2_5_VLConfig

        head_dim = self.hidden_size // self.num_attention_heads
        if 2 * sum(self.mrope_section) != head_dim:
            raise TinyTextBuildError(
                f"tiny text encoder: mrope_section {list(self.mrope_section)} must sum to head_dim/2 = {head_dim // 2}"
            )
        if self.vision_out_hidden_size != self.hidden_size:
            raise TinyTextBuildError("tiny text encoder: vision_out_hidden_size must equal hidden_size")
        text_config = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "rms_norm_eps": self.rms_norm_eps,
            "use_cache": True,
            "use_sliding_window": False,
            "max_window_layers": self.num_hidden_layers,
            "attention_dropout": 0.0,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": float(self.rope_theta),
                "mrope_section": list(self.mrope_section),
            },
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        vision_config = {
            "depth": self.vision_depth,
            "hidden_size": self.vision_hidden_size,
            "hidden_act": "silu",
            "intermediate_size": self.vision_intermediate_size,
            "num_heads": self.vision_num_heads,
            "in_channels": 3,
            "patch_size": self.vision_patch_size,
            "spatial_merge_size": self.vision_spatial_merge_size,
            "temporal_patch_size": self.vision_temporal_patch_size,
            "tokens_per_second": self.vision_tokens_per_second,
            "window_size": self.vision_window_size,
            "out_hidden_size": self.vision_out_hidden_size,
            "fullatt_block_indexes": list(self.vision_fullatt_block_indexes),
            "initializer_range": self.initializer_range,
        }
        config = Qwen2_5_VLConfig(
            text_config=text_config,
            vision_config=vision_config,
            image_token_id=self.image_token_id,
            video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id,
            tie_word_embeddings=False,
        )
        config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
        config.dtype = "float32"
        return config


def _token_ids_from_tokenizer(tokenizer_dir: Path) -> dict[str, int]:
    """Read the ids of the tokens the model config refers to from ``tokenizer_dir/tokenizer.json``."""
    data = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    wanted = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
        "bos_token_id": _BOS_TOKEN_FOR_MODEL,
        "eos_token_id": _EOS_TOKEN,
    }
    missing = [tok for tok in wanted.values() if tok not in added]
    if missing:
        raise TinyTextBuildError(f"tiny text encoder: tokenizer in {tokenizer_dir} lacks {missing}")
    return {key: added[tok] for key, tok in wanted.items()}


_LEGACY_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "visual.", "lm_head.")


def build_text_encoder(
    out_dir: Path, tokenizer_dir: Path, seed: int = 0, config: TinyTextEncoderConfig | None = None
) -> None:
    """Build a seeded random ``Qwen2_5_VLForConditionalGeneration`` (float32) and save it to ``out_dir``
    (``config.json``, ``generation_config.json``, ``model.safetensors``) in the legacy key layout of the real
    Qwen-Image text encoder (``model.embed_tokens``, ``model.layers.N``, ``model.norm``, ``visual.*``,
    ``lm_head``). The token ids of ``config`` are replaced by those of the tokenizer in ``tokenizer_dir``.
    The global torch RNG state is left untouched."""
    import shutil

    import torch
    from safetensors import safe_open
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.utils import logging as hf_logging

    out_dir = Path(out_dir)
    config = replace(config or TinyTextEncoderConfig(), **_token_ids_from_tokenizer(tokenizer_dir))
    max_id = max(
        config.image_token_id,
        config.video_token_id,
        config.vision_start_token_id,
        config.vision_end_token_id,
        config.bos_token_id,
        config.eos_token_id,
    )
    if max_id >= config.vocab_size:
        raise TinyTextBuildError(
            f"tiny text encoder: vocab_size {config.vocab_size} does not cover token id {max_id}"
        )
    hf_config = config.to_hf_config()

    previous_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float32)  # initialise in float32 whatever the caller's default
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen2_5_VLForConditionalGeneration(hf_config)
    finally:
        torch.set_default_dtype(previous_dtype)
    model = model.to(torch.float32).eval()

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-text-encoder.", dir=out_dir))
    try:
        progress_bar_was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # save_pretrained shows a "Writing model shards" bar
        try:
            model.save_pretrained(staging)
        finally:
            if progress_bar_was_enabled:
                hf_logging.enable_progress_bar()
        weights = staging / "model.safetensors"
        with safe_open(weights, "pt") as fh:
            keys = list(fh.keys())
        bad = [k for k in keys if not k.startswith(_LEGACY_PREFIXES)]
        if bad:
            raise TinyTextBuildError(
                f"tiny text encoder: transformers saved non-legacy keys (e.g. {bad[:3]}); "
                "expected model.embed_tokens/model.layers/model.norm/visual/lm_head"
            )
        names = ("config.json", "generation_config.json", "model.safetensors")
        produced = sorted(p.name for p in staging.iterdir())
        if produced != sorted(names):
            raise TinyTextBuildError(f"tiny text encoder: unexpected files from save_pretrained: {produced}")
        for name in names:
            (staging / name).chmod(_FILE_MODE)
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
