"""The control stage in two processes on the CPU (torchrun + Accelerate over gloo), as on a cluster."""

import os
import subprocess
import sys

import torch
from diffusers import ControlNetModel
from safetensors.torch import load_file


def test_controlnet_trains_in_two_processes_and_resumes(tmp_path, base_dir):
    run = tmp_path / "controlnet"
    argv = [f"base_model={base_dir}", f"train.output_dir={run}", "data.resolution=16", "data.shapes.num_images=20",
            "data.num_validation=4", "train.batch_size=2", "train.checkpoint_every=2", "train.log_every=1",
            "train.checkpoints_total_limit=null", "validation.every=100", "validation.num_inference_steps=2",
            "validation.num_controls=2", "control.conditioning_dropout=0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}

    def launch(*extra):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "train_control.py", *argv, *extra]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"

    launch("train.max_steps=2")
    checkpoint = run / "checkpoints/step-000002"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    launch("train.max_steps=3", "--resume", "auto")  # both ranks continue from step 2
    assert (run / "checkpoints/step-000003").is_dir()
    final = ControlNetModel.from_pretrained(str(run / "final"))
    raw = load_file(str(run / "checkpoints/step-000003/model.safetensors"))
    assert all(torch.isfinite(v).all() for v in raw.values()) and set(raw) == set(final.state_dict())
