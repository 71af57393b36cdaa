"""ldm-cache: encode a stage-2 config's training data once (VAE posteriors, text hidden states).

Training with data.cache=DIR then reads them instead of running the VAE encoder and the
frozen text encoder on every step. Under `accelerate launch` each process encodes its
own part. A killed run is resumed by running the same command again.
"""

import argparse

from ldm.cli.common import run_main
from ldm.config import UNetStageConfig, load_config
from ldm.errors import LdmError

EPILOG = """\
examples:
  ldm-cache --config configs/unet/shapes.yaml --out runs/shapes/cache
  python train_unet.py --config configs/unet/shapes.yaml data.cache=runs/shapes/cache
  accelerate launch -m ldm.cli.cache --config my.yaml data.cache=/data/cache

key=value overrides as for train_unet.py; the cache is checked against the training
config when training starts (VAE weights, resolution, data, flips, text encoder).
"""


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ldm-cache", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="YAML", help="a stage-2 config, e.g. configs/unet/shapes.yaml")
    parser.add_argument("--out", metavar="DIR", help="the cache folder (default: data.cache)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(UNetStageConfig, args.config, args.overrides)
    out = args.out or cfg.data.cache
    if not out:
        raise LdmError("no cache folder: pass --out DIR or set data.cache=DIR")
    from accelerate import Accelerator  # after parsing: --help and config errors stay fast

    from ldm.cache import write_cache

    write_cache(cfg, out, Accelerator())
    print(f"cache: {out} (train with data.cache={out})")
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
