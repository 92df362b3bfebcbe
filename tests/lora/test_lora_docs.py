"""The custom-adapter example of docs/adapters.md runs as written (on the golden tiny model)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from conftest import GOLDEN_MODEL

from qi_core import plugin_host

DOC = Path(__file__).parents[2] / "docs" / "adapters.md"


def example() -> str:
    text = DOC.read_text()
    section = text[text.index("## Your own adapters") :]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert 'MODEL = "tiny"' in code
    return code.replace('MODEL = "tiny"', f"MODEL = {str(GOLDEN_MODEL)!r}")


def test_custom_adapter_example_runs(fresh_host, capsys):
    scope: dict = {}
    exec(compile(example(), str(DOC), "exec"), scope)
    assert "['watercolor', 'my-style'] (64, 64)" in capsys.readouterr().out
    pipe = scope["pipe"]
    assert pipe.adapters == [] and pipe.injector("style-prefix") is None
    assert not any(m._forward_hooks for m in pipe.dit.modules())

    # the adapters did what they say: the prompt prefix and the LoRA each change the image
    call = dict(prompt="a lighthouse", height=64, width=64, num_inference_steps=2, seed=0, output_type="np",
                progress_bar_cmd=lambda x: x)  # fmt: skip
    plain, prefixed = pipe(**call), pipe(**{**call, "prompt": "an ink sketch of a lighthouse"})
    make = lambda name: plugin_host.host().registry.get("adapter", name).load()()  # noqa: E731
    watercolor, style = make("watercolor"), make("my-style")
    watercolor.apply(pipe)
    assert np.array_equal(pipe(**call, style="an ink sketch of "), prefixed)
    watercolor.remove(pipe)
    style.apply(pipe)
    assert not np.array_equal(pipe(**call), plain)
    style.remove(pipe)
    assert np.array_equal(pipe(**call), plain)
