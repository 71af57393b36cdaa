"""Stage 2 in two processes on the CPU (gloo), launched as on a cluster.

torchrun starts the processes and ACCELERATE_USE_CPU=1 makes Accelerate run DDP over
gloo. (`accelerate launch --cpu --num_processes 2` would start a single process: in
accelerate 1.x its multi-CPU path goes through mpirun and a hostfile.) Each process
runs the real train_unet.py under tests/two_rank_train.py, which reports what that
process loaded and trained, first in a straight run, then in a run resumed from its
step-2 checkpoint (one launch: its imports alone take ~20 s on a 2-core machine).

The run: 16 training images, 2 per process per batch, so one 4-step epoch; checkpoints
at steps 2 and 4; validation sampled (on the main process only) at steps 2 and 4, and
the validation loss on the 4 held-out images taken there by both processes, 2 each.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file


SCRIPT = Path(__file__).with_name("two_rank_train.py")
NUM_VALIDATION, NUM_IMAGES, PER_PROCESS, STEPS = 4, 20, 2, 4


def launch(report: Path, *argv) -> dict:
    """Run two_rank_train.py in 2 processes: {(phase, rank): report}."""
    report.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPT), str(report), *map(str, argv)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return {
        (phase, rank): json.loads((report / f"{phase}-rank{rank}.json").read_text())
        for phase in ("straight", "resumed") for rank in range(2)
    }


def weights(report: Path, phase: str, rank: int) -> dict:
    return load_file(str(report / f"{phase}-rank{rank}.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def arguments(run: Path, vae_dir: Path) -> list:
    return [
        f"train.output_dir={run}", f"vae_path={vae_dir}",
        "model.block_out_channels=[32,64]", "model.norm_num_groups=8", "model.layers_per_block=1",
        "text_encoder.width=32", "text_encoder.heads=4", "text_encoder.layers=1", "text_encoder.context_length=8",
        "data.resolution=16", f"data.shapes.num_images={NUM_IMAGES}", f"data.num_validation={NUM_VALIDATION}",
        f"train.batch_size={PER_PROCESS}", f"train.max_steps={STEPS}", "train.checkpoint_every=2",
        "train.checkpoints_total_limit=null", "train.log_every=1",
        "validation.prompts=[a red circle]", "validation.every=2", "validation.num_inference_steps=2",
    ]


@pytest.fixture(scope="module")
def launched(tmp_path_factory, vae_dir):
    """(run folder, report folder, reports) of the 2-process launch."""
    root = tmp_path_factory.mktemp("two_ranks")
    run, report = root / "run", root / "report"
    return run, report, launch(report, *arguments(run, vae_dir))


def test_both_ranks_train_on_disjoint_shares_of_each_batch(launched):
    _, _, reports = launched
    rank0, rank1 = reports["straight", 0], reports["straight", 1]
    assert [(r["world_size"], r["rank"], r["backend"]) for r in (rank0, rank1)] == [(2, 0, "gloo"), (2, 1, "gloo")]
    assert len(rank0["seen"]) == len(rank1["seen"]) == STEPS * PER_PROCESS
    assert not set(rank0["seen"]) & set(rank1["seen"])
    # Step k's global batch is the k-th run of 4 in the epoch's (seed, epoch) order
    # (loader.py), split between the ranks: together they saw the whole epoch once.
    order = (np.random.default_rng([0, 0]).permutation(NUM_IMAGES - NUM_VALIDATION) + NUM_VALIDATION).tolist()
    for step in range(STEPS):
        part = slice(step * PER_PROCESS, (step + 1) * PER_PROCESS)
        assert sorted(rank0["seen"][part] + rank1["seen"][part]) == sorted(order[4 * step: 4 * step + 4])


def test_ranks_end_with_the_same_weights_and_the_main_process_saves_them(launched):
    run, report, _ = launched
    rank0, rank1 = weights(report, "straight", 0), weights(report, "straight", 1)
    assert same(rank0, rank1)
    assert same(rank0, load_file(str(run / "checkpoints/step-000004/model.safetensors")))
    assert not same(rank0, load_file(str(run / "checkpoints/step-000002/model.safetensors")))  # it trained


def test_resumed_run_loads_the_remaining_batches_and_ends_with_the_same_weights(launched):
    """Resumed from the step-2 checkpoint: the same batches after it, the same weights."""
    _, report, reports = launched
    for rank in range(2):
        before, after = reports["straight", rank], reports["resumed", rank]
        assert (after["world_size"], after["rank"]) == (2, rank)
        # The batches of steps 1-2 were skipped without loading, those of 3-4 loaded as before.
        assert after["seen"] == before["seen"][2 * PER_PROCESS:], rank
        assert same(weights(report, "resumed", rank), weights(report, "straight", rank)), rank


def test_the_main_process_alone_writes_the_run_folder(launched):
    run, _, reports = launched
    for phase in ("straight", "resumed"):
        assert reports[phase, 0]["final_writes"] == [str(run / "final")] and reports[phase, 1]["final_writes"] == []
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoints", "config.yaml", "final", "logs", "metrics.jsonl", "report.html", "samples", "tokenizer",
    ]  # no .tmp-final / .old-final left behind; report.html (ldm-report) from the main process at the end
    assert (run / "final/unet/diffusion_pytorch_model.safetensors").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # one record a step, not one per process
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000002.png", "step-000004.png"]
    # Every process's RNG state is in the checkpoint (what an exact resume needs).
    saved = {p.name for p in (run / "checkpoints/step-000004").iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl", "optimizer.bin", "model.safetensors"} <= saved


def test_tensorboard_holds_the_logged_loss(launched):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, _ = launched
    files = sorted((run / "logs").rglob("events.out.tfevents.*"))  # the main process's, one per run
    assert len(files) == 2
    straight, resumed = ({e.step: e.value for e in EventAccumulator(str(f)).Reload().Scalars("loss")} for f in files)
    records = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert sorted(straight) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    assert all(straight[step] == pytest.approx(records[step], rel=1e-6) for step in straight)
    assert resumed == {step: straight[step] for step in resumed}  # bit-identical steps, identical losses


def one_process_validation_loss(final: Path, unet_weights=None, ema=False) -> dict:
    """The validation loss of a model folder computed here, in one process (optionally with other U-Net weights)."""
    from ldm.codec import LatentCodec
    from ldm.config import UNetStageConfig, load_config
    from ldm.data import build_dataset
    from ldm.eval.validation_loss import ValidationLoss, text_to_image_inputs
    from ldm.objectives import build_objective
    from ldm.pipeline import LatentDiffusionPipeline

    cfg = load_config(UNetStageConfig, str(final / "ldm_config.yaml"))
    pipe = LatentDiffusionPipeline.from_pretrained(str(final))
    if unet_weights is not None:
        pipe.unet.load_state_dict(unet_weights)
    loss = ValidationLoss(build_objective(cfg.objective), build_dataset(cfg.data, "validation"), cfg.validation,
                          rank=0, world=1)
    with torch.no_grad():
        inputs = text_to_image_inputs(LatentCodec(pipe.vae), pipe.text_encoder, pipe.tokenizer, pipe.unet, "cpu")
        return loss(inputs, ema=ema)


def test_each_rank_takes_its_share_of_the_held_out_split(launched):
    _, _, reports = launched
    # Steps 2 and 4, raw then EMA weights: four passes over the share, nothing else held out loaded.
    assert reports["straight", 0]["held_out"] == [0, 2] * 4 and reports["straight", 1]["held_out"] == [1, 3] * 4
    assert reports["resumed", 0]["held_out"] == [0, 2] * 2 and reports["resumed", 1]["held_out"] == [1, 3] * 2


def test_the_reduced_validation_loss_is_the_one_process_value(launched):
    """Step 4's validation loss, summed over the two shares, against this process's computation on the
    whole split: with the EMA weights of final/, and with the raw weights of the step-4 checkpoint."""
    run, _, _ = launched
    records = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert [s for s in sorted(records) if "val_loss" in records[s]] == [2, 4]
    logged = records[4]
    ema = one_process_validation_loss(run / "final", ema=True)
    raw = one_process_validation_loss(run / "final", load_file(str(run / "checkpoints/step-000004/model.safetensors")))
    assert len(ema) == len(raw) == 9 and ema["val_loss_ema"] != raw["val_loss"]
    for key, value in {**ema, **raw}.items():
        assert logged[key] == pytest.approx(value, rel=1e-5), key
