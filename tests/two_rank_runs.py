"""The straight-then-resumed pattern of the multi-process runner scripts (two_rank_train.py,
two_rank_buckets.py, fsdp_train.py), run in every process under torchrun.

1. "straight": the real command line, `main(argv)`; then `report("straight")` in every process.
2. The main process removes the newest checkpoint and final/ (after `keep(final, newest)`
   has copied what a test compares), as a crash between the two would leave the run.
3. "resumed": `main(argv + --resume auto)` from the checkpoint before; `report("resumed")`.

`finals` is the list the runner appends each run's final folder to. Both runs share one
process group (the runner stops accelerate from destroying it in between).
"""

import shutil
from typing import Callable, List, Optional

import torch.distributed as dist

from ldm.train.checkpoint import complete_checkpoints


def straight_then_resumed(main: Callable, argv: list, report: Callable[[str], int], finals: List,
                          keep: Optional[Callable] = None) -> None:
    if main(argv) != 0:
        raise SystemExit(2)
    rank = report("straight")
    dist.barrier()
    if rank == 0:
        final = finals[-1]
        newest = complete_checkpoints(final.parent / "checkpoints")[-1]
        if keep is not None:
            keep(final, newest)
        shutil.rmtree(newest)
        shutil.rmtree(final)
    dist.barrier()
    if main([*argv, "--resume", "auto"]) != 0:
        raise SystemExit(2)
    report("resumed")
    dist.destroy_process_group()
