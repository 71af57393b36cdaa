"""train_unet.py in 2 processes with NaN VAE latents on rank 1 only (R6); see test_r6_nonfinite.py.

    torchrun --nproc_per_node 2 tests/reliability/nan_one_rank.py REPORT_DIR ROOT VAE_DIR

Run "skip": rank 1's latents are NaN on its training steps 2 and 3 (train.max_nonfinite_steps=3).
Run "stop": from step 2 on. Each process writes REPORT_DIR/{run}-rank{R}.json (main's exit code,
the steps its Reporter counted as skipped) and {run}-rank{R}.safetensors (its U-Net's weights).
Both runs share one process group (two_rank_train.py's reasons; it is imported for its
recording wrappers and for keeping the group alive between the runs).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for two_rank_train

import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import two_rank_train  # noqa: E402  (patches: build_unet recorded, destroy_process_group deferred)
from ldm.cli.train_unet import main  # noqa: E402
from ldm.codec import LatentCodec  # noqa: E402
from ldm.train.run import Reporter  # noqa: E402

skipped = []
poison = {"steps": set()}
step_of = {"n": 0}
scale = LatentCodec.scale


def scale_with_nan(self, z):
    """Rank 1's latents NaN on the steps in poison["steps"] (one call per training step here)."""
    step_of["n"] += 1
    out = scale(self, z)
    return out * float("nan") if dist.get_rank() == 1 and step_of["n"] in poison["steps"] else out


LatentCodec.scale = scale_with_nan
Reporter.skipped_nonfinite = two_rank_train.recorded(Reporter.skipped_nonfinite, before=lambda self, step: skipped.append(step))


def argv(run: Path, vae_dir: str):
    return [
        f"train.output_dir={run}", f"vae_path={vae_dir}", "data.resolution=16", "data.shapes.num_images=16",
        "model.block_out_channels=[32,64]", "model.norm_num_groups=8", "model.layers_per_block=1",
        "text_encoder.width=32", "text_encoder.heads=4", "text_encoder.layers=1", "text_encoder.context_length=8",
        "train.batch_size=2", "data.num_validation=0", "validation.prompts=[]", "validation.every=1000",
        "train.max_steps=5", "train.checkpoint_every=1", "train.checkpoints_total_limit=null",
        "train.max_nonfinite_steps=3", "train.log_every=1",
    ]


def one_run(report: Path, root: Path, vae_dir: str, name: str, steps) -> None:
    poison["steps"], step_of["n"] = steps, 0
    skipped.clear()
    code = main(argv(root / name, vae_dir))
    rank = dist.get_rank()
    unet = two_rank_train.unets[-1]
    save_file({k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()},
              str(report / f"{name}-rank{rank}.safetensors"))
    (report / f"{name}-rank{rank}.json").write_text(json.dumps({"code": code, "skipped": list(skipped)}))
    dist.barrier()


if __name__ == "__main__":
    report, root, vae_dir = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    one_run(report, root, vae_dir, "skip", {2, 3})
    one_run(report, root, vae_dir, "stop", set(range(2, 100)))
    dist.destroy_process_group()
