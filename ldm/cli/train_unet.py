"""ldm-train-unet: train the text-conditioned latent U-Net on a trained stage-1 VAE's latents."""

from ldm.cli.common import run_main
from ldm.cli.training import parse_train_args, preemption_saves, resolve_config
from ldm.config import UNetStageConfig


def _main(argv=None) -> int:
    args = parse_train_args(
        "train_unet.py", __doc__, "configs/unet/shapes.yaml",
        "vae_path=runs/vae/final objective.prediction_type=v_prediction ema.decay=0.9999\n"
        "    init_from=runs/demo/pipeline lora.enabled=true lora.rank=8   (fine-tuning: docs/finetune.md)", argv,
    )
    cfg = resolve_config(UNetStageConfig, args)
    from ldm.train.unet_loop import train_unet  # after parsing: --help and config errors stay fast

    with preemption_saves():
        final = train_unet(cfg, resume=args.resume)
    print(f"model: {final}")
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)
