"""train_unet.py twice in one launch, recording what each process did; see test_multiprocess.py.

    torchrun --nproc_per_node 2 tests/two_rank_train.py REPORT_DIR [train_unet.py arguments]

1. "straight": the real command line (`ldm.cli.train_unet.main`) with the arguments.
2. "resumed": the main process deletes that run's newest checkpoint and final/, then
   every process runs the command again with --resume auto, which continues from the
   checkpoint before (as after a crash between the two checkpoints).

After each, every process writes REPORT_DIR/{phase}-rank{R}.json (the process group as
the loop saw it, the indices of the shapes images this process loaded, in order, and the
folders it wrote with `replace_folder`; separately, the held-out indices it loaded for the
validation loss) and {phase}-rank{R}.safetensors (the raw weights
of its own U-Net). It records by wrapping functions the loop calls, from outside, so the
product code carries no test hooks.

Both runs share one process group: re-creating a destroyed gloo group in the same
processes fails (the rendezvous store still holds the first group's keys), so the
`destroy_process_group` of Accelerate's end_training is skipped until the end. A fresh
launch for the resume would cost another ~20 s of imports on a 2-core machine.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from accelerate.state import PartialState
from safetensors.torch import save_file

import ldm.train.unet_loop as unet_loop
from ldm.eval.validation_loss import ValidationLoss
from ldm.cli.train_unet import main
from ldm.data.shapes import ShapesDataset
from two_rank_runs import straight_then_resumed

seen, unets, final_writes, groups, finals, held_out = [], [], [], [], [], []
validating = []  # non-empty while the validation loss runs: its loads go to held_out, not seen


def recorded(function, before=None, after=None):
    """`function`, calling `before(*args)` ahead of it and `after(result)` after it."""

    def wrapper(*args, **kwargs):
        if before:
            before(*args, **kwargs)
        out = function(*args, **kwargs)
        if after:
            after(out)
        return out

    return wrapper


def process_group(*_, **__):
    groups.append([dist.get_world_size(), dist.get_rank(), dist.get_backend()] if dist.is_initialized() else None)


unet_loop.build_unet = recorded(unet_loop.build_unet, before=process_group, after=unets.append)
unet_loop.train_unet = recorded(unet_loop.train_unet, after=finals.append)  # main() imports it at call time
unet_loop.replace_folder = recorded(unet_loop.replace_folder, before=lambda tmp, final: final_writes.append(str(final)))
# An index into the whole shapes set (validation items first), as this process loads it.
ShapesDataset.__getitem__ = recorded(
    ShapesDataset.__getitem__, before=lambda self, index: (held_out if validating else seen).append(int(index))
)
ValidationLoss.local_sums = recorded(
    ValidationLoss.local_sums, before=lambda *_: validating.append(1), after=lambda _: validating.clear()
)
PartialState.destroy_process_group = lambda self, group=None: None


def report(folder: Path, phase: str) -> int:
    world_size, rank, backend = groups[-1]
    # DDP wraps the module without copying it: these are the weights this process trained.
    weights = {k: v.detach().cpu().contiguous() for k, v in unets[-1].state_dict().items()}
    save_file(weights, str(folder / f"{phase}-rank{rank}.safetensors"))
    record = dict(world_size=world_size, rank=rank, backend=backend, seen=seen, final_writes=final_writes,
                  held_out=held_out)
    (folder / f"{phase}-rank{rank}.json").write_text(json.dumps(record))
    seen.clear()
    held_out.clear()
    final_writes.clear()
    return rank


def run(folder: Path, argv) -> None:
    straight_then_resumed(main, argv, lambda phase: report(folder, phase), finals)


if __name__ == "__main__":
    run(Path(sys.argv[1]), sys.argv[2:])
