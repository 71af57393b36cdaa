"""Training: one loop skeleton and the stages that plug into it.

`train_vae(cfg)` (stage 1) and `train_unet(cfg)` (stage 2) each read top to bottom: their
setup, their step, validation and final save, handed to loop.py's `training_loop`, which
owns accumulation, clipping, optimizer and LR steps, EMA, cadence, interrupts and resume.
run.py (run folder, metrics, progress), checkpoint.py (save / resume), loader.py (data
order that a resume can rebuild), cadence.py, interrupt.py, watchdog.py, ema.py and optim.py
hold its parts.
"""


def train_vae(cfg, resume=None):
    from ldm.train.vae_loop import train_vae as _train_vae

    return _train_vae(cfg, resume=resume)


def train_unet(cfg, resume=None):
    from ldm.train.unet_loop import train_unet as _train_unet

    return _train_unet(cfg, resume=resume)


__all__ = ["train_vae", "train_unet"]
