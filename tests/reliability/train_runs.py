"""train_unet.py several times in one launch, in one process group: fresh launches cost ~15 s of imports each.

    torchrun --nproc_per_node 2 train_runs.py RUNS.json

RUNS.json is a list of argument lists; each process runs `ldm.cli.train_unet.main` on
each in turn and exits with the first non-zero status. As in tests/two_rank_train.py, the
`destroy_process_group` of Accelerate's end_training is skipped until the end: a gloo group
cannot be made again in the same processes.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from accelerate.state import PartialState

from ldm.cli.train_unet import main

PartialState.destroy_process_group = lambda self, group=None: None


def run(runs) -> int:
    for argv in runs:
        status = main(argv)
        if status != 0:
            return status
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(run(json.loads(Path(sys.argv[1]).read_text())))
