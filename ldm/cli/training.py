"""What the two training commands share: arguments and the config they resolve to."""

import argparse
import os
import signal
from contextlib import contextmanager

from ldm.config import load_config

OVERRIDES_HELP = """\
overrides:
  key=value pairs on the config's dotted keys, applied after --config; an unknown key
  is an error that lists the keys that exist. Examples:
    train.max_steps=2000 train.batch_size=64 train.output_dir=runs/mine
    train.mixed_precision=bf16 train.max_minutes=30 data.resolution=32
    {examples}
  Lists and nulls are YAML: model.block_out_channels=[32,64,64] train.checkpoints_total_limit=null

resume:
  --resume auto continues from the newest complete checkpoint in
  TRAIN.OUTPUT_DIR/checkpoints/ (or starts fresh if there is none); --resume PATH from that one.
  Ctrl-C or SIGTERM (a cluster's preemption notice) saves a checkpoint before exiting.
  Multi-GPU / multi-node: accelerate launch {script} --config ...
"""


def parse_train_args(prog: str, description: str, default_config: str, examples: str, argv=None):
    """(args, overrides) for a training command; argv None reads sys.argv."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=OVERRIDES_HELP.format(examples=examples, script=prog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="YAML", help=f"a stage config file, e.g. {default_config} (default: built-in defaults)")
    parser.add_argument("--resume", metavar="auto|PATH", help="continue a run from a checkpoint (see below)")
    parser.add_argument("--allow-changed", metavar="KEY", action="append", default=[],
                        help="with --resume: a setting changed on purpose since the checkpoint (train.learning_rate, "
                             "train.batch_size, ...); repeat for several; recorded in the run's changes.jsonl")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (see below)")
    return parser.parse_intermixed_args(argv)


def resolve_config(schema, args):
    """The stage config from defaults, --config and the overrides (--allow-changed is train.allow_changed)."""
    overrides = list(args.overrides)
    if getattr(args, "allow_changed", None):
        overrides.append(f"train.allow_changed=[{','.join(args.allow_changed)}]")
    return load_config(schema, args.config, overrides)


@contextmanager
def preemption_saves():
    """Treat SIGTERM like Ctrl-C while training: the loop saves a checkpoint and exits.

    Schedulers (SLURM, Kubernetes) announce preemption or a time limit with SIGTERM, and
    its default action kills the process at once, losing every step since the last
    checkpoint. Raising KeyboardInterrupt instead sends it down the loop's Ctrl-C path.

    Once a run of several processes has stopped (its checkpoint saved), each rank is
    leaving with 130, and further SIGINT / SIGTERM are ignored: a launcher (torchrun,
    accelerate launch) that sees one rank leave sends the others SIGTERM, which would
    otherwise turn their exit 130 into a kill by signal in the last moments of their exit.
    (The launcher still kills a rank that does not leave, after its 30 s grace.)
    """

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    leaving = False
    try:
        yield
    except KeyboardInterrupt:
        leaving = int(os.environ.get("WORLD_SIZE", "1")) > 1  # one of several launched ranks
        if leaving:
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)
        raise
    finally:
        if not leaving:
            signal.signal(signal.SIGTERM, previous)
