"""Training a blockwise ControlNet (the seed's ``--trainable_models blockwise_controlnet`` flow).

* :func:`init_controlnet` writes a zero-initialised ControlNet sized for a DiT (DiffSynth-Studio's
  ``Qwen-Image-Blockwise-ControlNet[-Inpaint]-Initialize.py``): ``img_in`` and every ``output_proj`` are zero, so
  it adds exactly nothing until trained. Command line::

      python -m qi_plugins.blockwise_controlnet.training --dit MODEL/transformer \\
          --out models/blockwise_controlnet/model.safetensors [--inpaint]

* The seed's metadata columns ``blockwise_controlnet_image`` (and ``blockwise_controlnet_inpaint_mask``, …: any
  ``ControlNetInput`` field prefixed ``blockwise_controlnet_``) named in ``--extra_inputs`` are gathered into one
  ``ControlNetInput`` for ``blockwise_controlnet_inputs`` by :func:`columns_to_inputs`, the column adapter the
  injector declares (``column_adapters``), so it applies to runs of a ControlNet recipe only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from qi_core.errors import InvalidInputError, ModelLoadError
from qi_plugins.blockwise_controlnet.inputs import FIELDS, ControlNetInput

PREFIX = (
    "blockwise_controlnet_"  # the seed gathers every extra input with this prefix into one ControlNetInput
)
COLUMNS = tuple(PREFIX + f for f in FIELDS)
CKPT_PREFIX = (
    "pipe.blockwise_controlnet.models.0."  # the seed's --remove_prefix_in_ckpt for ControlNet training
)


def columns_to_inputs(values: dict[str, Any]) -> dict[str, Any]:
    """``{"blockwise_controlnet_image": img, …}`` → ``{"blockwise_controlnet_inputs": [ControlNetInput(image=img, …)]}``."""
    fields = {k.removeprefix(PREFIX): v for k, v in values.items() if v is not None}
    if "image" not in fields:
        raise InvalidInputError(
            f"the row gives {', '.join(sorted(values))} but no {PREFIX}image; the control image column is "
            f"required (add it to --extra_inputs and --data_file_keys)"
        )
    for name in ("controlnet_id",):
        if isinstance(fields.get(name), str):  # csv cells are strings
            fields[name] = int(fields[name])
    for name in ("scale", "start", "end"):
        if isinstance(fields.get(name), str):
            fields[name] = float(fields[name])
    return {"blockwise_controlnet_inputs": [ControlNetInput(**fields)]}


def dit_size(dit: Any) -> tuple[int, int]:
    """``(blocks, inner dim)`` of a DiT: a loaded module, or its folder / ``config.json`` (official layout)."""
    if not isinstance(dit, (str, Path)):
        config, blocks = getattr(dit, "config", None), getattr(dit, "transformer_blocks", None)
        if config is None or blocks is None or not hasattr(config, "inner_dim"):
            raise InvalidInputError(
                f"{type(dit).__name__} is not a Qwen-Image DiT (no config.inner_dim / blocks)"
            )
        return len(blocks), int(config.inner_dim)
    path = Path(dit)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file() or path.suffix != ".json":
        raise InvalidInputError(
            f"dit={str(dit)!r}: expected the DiT's folder (e.g. MODEL/transformer) or its config.json"
        )
    c = json.loads(path.read_text())
    try:
        return int(c["num_layers"]), int(c["num_attention_heads"]) * int(c["attention_head_dim"])
    except KeyError as e:
        raise ModelLoadError(f"{path} has no {e.args[0]!r}; it is not a Qwen-Image DiT config") from None


def init_controlnet(out: str | Path, dit: Any, *, inpaint: bool = False, seed: int = 0) -> Path:
    """Write a zero-initialised ControlNet for ``dit`` to ``out`` (+ a ``.json`` side-car with its sizes).

    ``input_proj`` keeps PyTorch's default (seeded) initialisation, as DiffSynth's script; ``inpaint`` adds the
    mask channel (``additional_in_dim = 4``). Returns ``out``."""
    import torch
    from safetensors.torch import save_file

    from qi_plugins.blockwise_controlnet.model import BlockwiseControlNet, ControlNetConfig

    num_layers, dim = dit_size(dit)
    config = ControlNetConfig(num_layers=num_layers, dim=dim, additional_in_dim=4 if inpaint else 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = BlockwiseControlNet(config)
    net.init_weights()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))
    sidecar = {
        "init_args": {f: getattr(config, f) for f in ("num_layers", "in_dim", "additional_in_dim", "dim")}
    }
    out.with_suffix(".json").write_text(json.dumps(sidecar, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Write a zero-initialised blockwise ControlNet for a Qwen-Image DiT"
    )
    ap.add_argument("--dit", required=True, help="the DiT's folder (MODEL/transformer) or its config.json")
    ap.add_argument("--out", required=True, help="the .safetensors file to write")
    ap.add_argument(
        "--inpaint", action="store_true", help="the inpaint variant (masked image + mask channel)"
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of input_proj's random initialisation")
    a = ap.parse_args(argv)
    print(init_controlnet(a.out, a.dit, inpaint=a.inpaint, seed=a.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
