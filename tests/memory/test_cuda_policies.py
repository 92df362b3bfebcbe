"""The CUDA paths of the memory policies (pinned host copies, side-stream prefetch, record_stream): the same
output as everything resident on the GPU. Runs only where a GPU exists."""

from __future__ import annotations

import pytest
import torch
from conftest import GOLDEN_MODEL

import qi_core as qi

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CALL = {"prompt": "a lighthouse on a cliff", "negative_prompt": "fog", "cfg_scale": 3.0, "height": 48,
        "width": 112, "seed": 5, "num_inference_steps": 3, "output_type": "np",
        "progress_bar_cmd": lambda x: x}  # fmt: skip


@pytest.fixture(scope="module")
def resident():
    return qi.compose(
        "qwen-image", model=GOLDEN_MODEL, device="cuda", torch_dtype=torch.float32, progress=False
    )(**CALL)


@pytest.mark.parametrize("memory", ["offload", "stream", "disk", "low-vram", {"dit": "stream", "vae": "offload"}],
                         ids=str)  # fmt: skip
def test_cuda_policy_equals_resident(resident, memory):
    pipe = qi.compose("qwen-image", model=GOLDEN_MODEL, device="cuda", torch_dtype=torch.float32, progress=False,
                      memory=memory)  # fmt: skip
    for _ in range(2):  # read-ahead state must not leak between calls
        assert abs(pipe(**CALL) - resident).max() <= 1e-6
    dit = pipe.components["dit"]
    if memory == "stream" or isinstance(memory, dict):
        # streamed blocks (no vram_limit: none kept resident) live on the host between uses
        assert dit.transformer_blocks[-1].attn.to_q.weight.device.type == "cpu"
