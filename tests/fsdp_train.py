"""A stage under FSDP2 in 2 processes, straight then resumed, recording what each process held; see test_fsdp.py.

    torchrun --nproc_per_node 2 tests/fsdp_train.py REPORT_DIR unet|control [arguments of train_unet.py / train_control.py]

1. "straight": the real command line (`ldm.cli.train_unet.main` or `train_control.main`).
   Then the main process copies the newest checkpoint's ema.safetensors and the final
   folder's weights into REPORT_DIR, and deletes that checkpoint and final/.
2. "resumed": every process runs the command again with --resume auto (from the
   checkpoint before, as after a crash between the two).

After each, every process writes REPORT_DIR/{phase}-rank{R}.json: the distributed type,
the process group, and for the trained model (recorded where the stage hands it to
fsdp.fsdp_parts, before `prepare` shards it in place) how many parameters are DTensors,
the elements this process holds and the elements in all; the main process writes
{phase}-raw.safetensors: the raw trained weights, gathered from the shards (every process
joins the gather). As in two_rank_train.py, both runs share one process group.
"""

import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist
from accelerate.state import PartialState
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import ldm.train.control_loop as control_loop
import ldm.train.unet_loop as unet_loop
from two_rank_runs import straight_then_resumed

models, finals = [], []


def recorded_parts(function):
    def wrapper(accelerator, model):
        models.append(model)
        return function(accelerator, model)

    return wrapper


for stage in (unet_loop, control_loop):
    stage.fsdp_parts = recorded_parts(stage.fsdp_parts)
unet_loop.train_unet = (lambda f: lambda *a, **k: finals.append(f(*a, **k)) or finals[-1])(unet_loop.train_unet)
control_loop.train_control = (lambda f: lambda *a, **k: finals.append(f(*a, **k)) or finals[-1])(control_loop.train_control)
PartialState.destroy_process_group = lambda self, group=None: None


def report(folder: Path, phase: str) -> int:
    rank = dist.get_rank()
    model = models[-1]
    params = list(model.parameters())
    record = dict(
        distributed_type=str(PartialState().distributed_type), world_size=dist.get_world_size(), rank=rank,
        backend=dist.get_backend(), parameters=len(params),
        dtensors=sum(hasattr(p, "to_local") for p in params),
        local_numel=sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params),
        numel=sum(p.numel() for p in params),
    )
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / f"{phase}-raw.safetensors"))
    (folder / f"{phase}-rank{rank}.json").write_text(json.dumps(record))
    return rank


def run(folder: Path, stage: str, argv) -> None:
    if stage == "unet":
        from ldm.cli.train_unet import main
    else:
        from ldm.cli.train_control import main

    def keep(final, newest):  # what test_fsdp.py compares with the resumed run
        shutil.copy(newest / "ema.safetensors", folder / "straight-ema.safetensors")
        shutil.copytree(final, folder / "straight-final")

    straight_then_resumed(main, argv, lambda phase: report(folder, phase), finals, keep)


if __name__ == "__main__":
    run(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
