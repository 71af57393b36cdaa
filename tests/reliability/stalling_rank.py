"""train_unet.py with one rank stalling, to show the watchdog (ldm/train/watchdog.py) at work.

    LDM_TEST_STALL_RANK=1 LDM_TEST_STALL_STEP=3 torchrun ... stalling_rank.py [train_unet.py arguments]

On rank LDM_TEST_STALL_RANK, the optimizer update of step LDM_TEST_STALL_STEP never
comes: the rank sleeps before its backward pass, as a rank stuck in a data loader or a
driver would, while the other rank waits for it in DDP's gradient all-reduce. The fault
is put in from outside (the product code carries no test hooks).
"""

import os
import time

import ldm.train.loop as loop
from ldm.cli.train_unet import main

apply_update, calls = loop.apply_update, []


def stalling(accelerator, update, max_grad_norm):
    calls.append(1)
    if accelerator.process_index == int(os.environ["LDM_TEST_STALL_RANK"]) and \
            len(calls) == int(os.environ["LDM_TEST_STALL_STEP"]):
        while True:
            time.sleep(60)
    return apply_update(accelerator, update, max_grad_norm)


loop.apply_update = stalling

if __name__ == "__main__":
    raise SystemExit(main())
