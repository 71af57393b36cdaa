"""train_unet.py on a bucketed folder in two processes, straight then resumed; see test_buckets.py.

    torchrun --nproc_per_node 2 tests/two_rank_buckets.py REPORT_DIR [train_unet.py arguments]

As tests/two_rank_train.py, but it records the captions and pixel shape of every batch
each process trains on (wrapping the loop's `batches_from` from outside), and the weights
of its U-Net, in REPORT_DIR/{phase}-rank{R}.json / .safetensors.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from accelerate.state import PartialState
from safetensors.torch import save_file

import ldm.train.loop as loop
import ldm.train.unet_loop as unet_loop
from ldm.cli.train_unet import main
from two_rank_runs import straight_then_resumed

seen, unets, finals = [], [], []
batches_from = loop.batches_from


def recording(*args):
    for batch in batches_from(*args):
        seen.append([list(batch["caption"]), list(batch["pixel_values"].shape[2:])])
        yield batch


loop.batches_from = recording
build_unet, train_unet = unet_loop.build_unet, unet_loop.train_unet
unet_loop.build_unet = lambda *a, **k: unets.append(build_unet(*a, **k)) or unets[-1]
unet_loop.train_unet = lambda *a, **k: finals.append(train_unet(*a, **k)) or finals[-1]
PartialState.destroy_process_group = lambda self, group=None: None  # one process group for both runs


def report(folder: Path, phase: str) -> int:
    rank = dist.get_rank()
    save_file({k: v.detach().cpu().contiguous() for k, v in unets[-1].state_dict().items()},
              str(folder / f"{phase}-rank{rank}.safetensors"))
    (folder / f"{phase}-rank{rank}.json").write_text(json.dumps({"world_size": dist.get_world_size(), "seen": seen}))
    seen.clear()
    return rank


def run(folder: Path, argv) -> None:
    straight_then_resumed(main, argv, lambda phase: report(folder, phase), finals)


if __name__ == "__main__":
    run(Path(sys.argv[1]), sys.argv[2:])
