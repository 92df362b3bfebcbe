"""The core knows no variant: no file under ``qi_core/`` (recursively, code, comments and docstrings alike)
names a variant plugin, its parameters or its model flags."""

from __future__ import annotations

from pathlib import Path

import qi_core as qi

CORE = Path(qi.__file__).parent

# variant plugins, their call parameters and the model flags they own (lower case, matched as substrings)
VARIANT_WORDS = (
    "eligen", "entity", "controlnet", "blockwise", "in_context", "context_image", "context-control",
    "edit_image", "edit-image", "qwen-image-edit", "zero_cond_t", "edit_rope", "lowres",
    "layered", "layer_num", "layer_input", "layer3d", "additional_t_cond",
    "lightning", "distill", "i2l", "image-to-lora",
)  # fmt: skip


def test_no_variant_word_anywhere_in_the_core():
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 10
    hits = []
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            low = line.lower()
            hits += [f"{f.relative_to(CORE)}:{n}: {w}" for w in VARIANT_WORDS if w in low]
    assert not hits, "variant names in qi_core:\n" + "\n".join(hits)


def test_the_check_sees_subpackages_and_comments(tmp_path):
    """The scan is recursive and reads comments: a variant identifier in a nested module's comment is found."""
    nested = tmp_path / "sub" / "deep.py"
    nested.parent.mkdir()
    nested.write_text("x = 1  # honoured when zero_cond_t is set\n")
    found = [w for f in tmp_path.rglob("*.py") for w in VARIANT_WORDS if w in f.read_text().lower()]
    assert found == ["zero_cond_t"]
