"""ldm-train-control: train a ControlNet or a T2I-Adapter on top of a frozen base model folder."""

from ldm.cli.common import run_main
from ldm.cli.training import parse_train_args, preemption_saves, resolve_config
from ldm.config import ControlStageConfig


def _main(argv=None) -> int:
    args = parse_train_args(
        "train_control.py", __doc__, "configs/control/shapes-controlnet.yaml",
        "base_model=runs/demo/pipeline control.kind=t2i_adapter control.conditioning_dropout=0.1", argv,
    )
    cfg = resolve_config(ControlStageConfig, args)
    from ldm.train.control_loop import train_control  # after parsing: --help and config errors stay fast

    with preemption_saves():
        final = train_control(cfg, resume=args.resume)
    print(f"control model: {final}")
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)
