"""ldm-export: write a model folder in a format other tools load.

    ldm-export --model runs/unet/final --to diffusers exported/

`--to diffusers` writes a folder that `diffusers.StableDiffusionPipeline.from_pretrained`
loads (with safety_checker=None) and that gives the same images; an open_clip text tower
is converted to a transformers CLIPTextModel on the way (see `ldm.export`).
"""

import argparse
import os

from ldm.cli.common import run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-export", description="Export a model folder for other tools.")
    p.add_argument("--model", required=True, help="model folder saved by the trainer (model_index.json, unet/, vae/, ...)")
    p.add_argument("--to", required=True, choices=["diffusers"], dest="format",
                   help="diffusers: a StableDiffusionPipeline folder (text encoder as a transformers CLIPTextModel)")
    p.add_argument("out", help="folder to write; must be empty or absent unless --force")
    p.add_argument("--force", action="store_true", help="replace the model parts already in OUT (other files there are kept)")
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a model is a local folder; never reach for the hub
    from ldm.export import export_diffusers  # after parsing: --help need not import torch

    error = export_diffusers(args.model, args.out, force=args.force)
    detail = "text encoder copied" if error is None else f"open_clip text encoder converted, max hidden-state difference {error:.2g}"
    print(f"exported {args.model} to {args.out} as a diffusers StableDiffusionPipeline ({detail})")
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
