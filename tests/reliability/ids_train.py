"""A training run that reports which samples each process loaded, before and after a resume (R3).

    torchrun --nproc_per_node 2 tests/reliability/ids_train.py REPORT_DIR CUT STAGE [stage arguments]

1. "straight": the stage's real command line (`main(argv)`), to the end.
2. "resumed": the main process deletes the checkpoints after step CUT and final/ (as if the
   run had been killed after the step-CUT checkpoint), then every process runs the command
   again with --resume auto.
After each, every process writes REPORT_DIR/{phase}-rank{R}.json: the ids of the samples it
loaded, in order (folder data: the image's index; shards: the sample's __key__). Recorded by
wrapping the loading functions from outside (tests/two_rank_train.py does the same), so the
product code carries no test hooks. Also used in one process, in the test's own process
(`recording()` then `run`).
"""

import contextlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: two_rank_train, the stages' tiny runs

import ldm.data.webdataset as webdataset  # noqa: E402
from ldm.data.folder import ImageFolderDataset  # noqa: E402
from ldm.train.checkpoint import complete_checkpoints  # noqa: E402

seen = []


@contextlib.contextmanager
def recording():
    """Record every folder image and shard sample this process loads into `seen` (restored after)."""
    real_item, real_decode = ImageFolderDataset.__getitem__, webdataset.decode

    def item(self, index):
        seen.append(int(index))
        return real_item(self, index)

    def decode(sample, transform):
        seen.append(sample["__key__"])
        return real_decode(sample, transform)

    ImageFolderDataset.__getitem__, webdataset.decode = item, decode
    try:
        yield seen
    finally:
        ImageFolderDataset.__getitem__, webdataset.decode = real_item, real_decode


def main_of(stage):
    if stage == "vae":
        from ldm.cli.train_vae import main
    else:
        from ldm.cli.train_unet import main
    return main


def cut_back(run: Path, cut: int) -> None:
    """What a crash after the step-`cut` checkpoint leaves: no later checkpoint, no final/."""
    for folder in complete_checkpoints(run / "checkpoints"):
        if int(folder.name.split("-")[1]) > cut:
            shutil.rmtree(folder)
    shutil.rmtree(run / "final", ignore_errors=True)


def run(report: Path, cut: int, stage: str, argv) -> dict:
    """{phase: ids this process loaded}; the files as well when `report` is given."""
    from accelerate.state import PartialState

    main, out = main_of(stage), {}
    run_dir = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("train.output_dir=")))
    for phase, extra in (("straight", []), ("resumed", ["--resume", "auto"])):
        seen.clear()
        if main([*argv, *extra]) != 0:
            raise SystemExit(2)
        state = PartialState()
        out[phase] = list(seen)
        if report is not None:
            (report / f"{phase}-rank{state.process_index}.json").write_text(json.dumps(out[phase]))
        if phase == "straight":
            state.wait_for_everyone()
            if state.is_main_process:
                cut_back(run_dir, cut)
            state.wait_for_everyone()
    return out


if __name__ == "__main__":
    from two_rank_train import PartialState  # noqa: F401  (its import keeps the process group between the runs)

    with recording():
        run(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:])
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
