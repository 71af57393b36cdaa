"""ldm-train-vae: train the stage-1 KL autoencoder and measure its latent scaling factor."""

from ldm.cli.common import run_main
from ldm.cli.training import parse_train_args, preemption_saves, resolve_config
from ldm.config import VAEStageConfig


def _main(argv=None) -> int:
    args = parse_train_args(
        "train_vae.py", __doc__, "configs/vae/shapes.yaml",
        "model.block_out_channels=[32,64,64] loss.kl_weight=1e-6 loss.reconstruction=l2", argv,
    )
    cfg = resolve_config(VAEStageConfig, args)
    from ldm.train.vae_loop import train_vae  # after parsing: --help and config errors stay fast

    with preemption_saves():
        final = train_vae(cfg, resume=args.resume)
    print(f"VAE: {final}")
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)
