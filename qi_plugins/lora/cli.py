"""``qi lora convert IN OUT --to FORMAT`` and ``qi lora info FILE``."""

from __future__ import annotations

import argparse

from qi_plugins.lora.formats import FORMATS


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lora_command", required=True)
    c = sub.add_parser("convert", help="rewrite a LoRA file in another layout")
    c.add_argument("input", help="LoRA .safetensors file in any layout qi reads")
    c.add_argument("output", help="where to write the converted .safetensors file")
    c.add_argument("--to", required=True, choices=FORMATS, dest="to_format", help="target layout")
    c.set_defaults(func=_convert)
    i = sub.add_parser("info", help="layout, modules and ranks of a LoRA file")
    i.add_argument("input")
    i.set_defaults(func=_info)


def _convert(args: argparse.Namespace) -> int:
    from qi_core.atomic import check_output_file
    from qi_plugins.lora.formats import convert_file, detect_format, read_state_dict

    check_output_file(args.output, (".safetensors",), "output")  # before reading and converting the input
    src = detect_format(read_state_dict(args.input))
    out = convert_file(args.input, args.output, args.to_format)
    print(f"wrote {out} ({src} → {args.to_format})")
    return 0


def _info(args: argparse.Namespace) -> int:
    from qi_plugins.lora.formats import detect_format, read_lora, read_state_dict

    sd = read_state_dict(args.input)
    weights = read_lora(sd)
    ranks = sorted({w.rank for w in weights.values()})
    alphas = sorted({w.scale for w in weights.values()})
    dtypes = sorted({str(w.down.dtype).removeprefix("torch.") for w in weights.values()})
    print(f"layout: {detect_format(sd)}")
    print(f"modules: {len(weights)} (e.g. {', '.join(list(weights)[:3])})")
    print(f"rank: {', '.join(map(str, ranks))}; alpha/rank: {', '.join(f'{a:g}' for a in alphas)}")
    print(f"dtype: {', '.join(dtypes)}")
    return 0
