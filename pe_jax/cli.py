"""The `pe-jax` command. Each subcommand parses its arguments and calls the Python API that does the job."""

from __future__ import annotations

import argparse
import sys


def _convert(args):
    from pe_jax.convert.convert import convert_checkpoint

    meta = convert_checkpoint(args.src, args.dst, model=args.model, dtype=args.dtype, force=args.force,
                              progress=not args.quiet)
    print(f"wrote {args.dst}: {meta['preset']} ({meta['source_format']}, {meta['dtype']}) from {meta['source_file']}")


def _export(args):
    from pe_jax.convert.convert import export_checkpoint

    keys = export_checkpoint(args.ckpt, args.out, format=args.format, force=args.force)
    print(f"wrote {args.out}: {len(keys)} tensors in {args.format} naming")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pe-jax", description="Perception Encoder in JAX: tools.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="PyTorch checkpoint (.pt, safetensors, hf://) -> pe_jax Orbax checkpoint")
    p.add_argument("src", help="a .pt / .safetensors / *.safetensors.index.json file, or hf://ORG/REPO[:FILE]")
    p.add_argument("dst", help="output checkpoint directory")
    p.add_argument("--model", help="preset name (default: inferred from the tensor shapes)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_convert)

    p = sub.add_parser("export", help="pe_jax checkpoint -> PyTorch safetensors (original, timm or open_clip naming)")
    p.add_argument("ckpt", help="pe_jax checkpoint directory")
    p.add_argument("out", help="output .safetensors file")
    p.add_argument("--format", default="original", choices=["original", "timm", "open_clip"])
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("pe-jax: interrupted; no partial output was left", file=sys.stderr)
        return 130
    except (ValueError, OSError, TypeError) as e:  # user errors: a message, never a traceback
        print(f"pe-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
