"""Training support of the layered models: RGBA decoding of the seed's metadata columns.

The seed's Qwen-Image-Layered metadata (json/jsonl): ``image`` is a list of RGBA files, the composite first,
then one file per layer (the frames the pipeline outputs, in that order); ``layer_input_image`` is the RGBA
image being decomposed; ``layer_num`` (an integer) is the number of layers. Train with
``--data_file_keys image,layer_input_image --extra_inputs layer_input_image,layer_num``. The generic trainer
encodes every ``image`` file as one target frame; this module only makes the files keep their alpha channel
(the RGB loader would make every layer opaque).
"""

from __future__ import annotations

from PIL import Image

from qi_core.sizing import SizeSpec, crop_and_resize


def load_rgba(path: str, size: SizeSpec) -> Image.Image:
    """RGBA, cropped and resized to the training size like the RGB loader (the seed's layered operator)."""
    with Image.open(path) as im:
        im.load()
        image = im.convert("RGBA")
    return crop_and_resize(image, *size.target(*image.size))
