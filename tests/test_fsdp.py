"""Stage 2 and the control stage under FSDP2 in two CPU processes (issue 10, defect 8).

torchrun starts 2 processes with the FSDP variables `accelerate launch --config_file
configs/accelerate/fsdp.yaml` sets (read from that file by accelerate's own launcher code)
and ACCELERATE_USE_CPU=1: Accelerate's FSDP2 path (fully_shard over a CPU device mesh,
gloo) runs as on a GPU cluster (ldm/train/fsdp.py). Each launch runs tests/fsdp_train.py:
a straight run (4 steps, checkpoints at 2 and 4, validation grids and the held-out loss at
2 and 4), then the same command resumed from step 2 after deleting the step-4 checkpoint
and final/.

The stage-2 launch (~35-65 s on 2 cores) runs by default; the control stage and the
comparison with DDP are long cases (LDM_RELIABILITY=1).
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).with_name("fsdp_train.py")
TINY_UNET = [
    "model.block_out_channels=[32,64]", "model.norm_num_groups=8", "model.layers_per_block=1",
    "text_encoder.width=32", "text_encoder.heads=4", "text_encoder.layers=1", "text_encoder.context_length=8",
]
RUN = ["data.resolution=16", "data.shapes.num_images=20", "data.num_validation=4", "train.batch_size=2",
       "train.max_steps=4", "train.checkpoint_every=2", "train.checkpoints_total_limit=null", "train.log_every=1",
       "validation.every=2", "validation.num_inference_steps=2"]


def fsdp_environment() -> dict:
    """The FSDP variables `accelerate launch --config_file configs/accelerate/fsdp.yaml` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ROOT / "configs/accelerate/fsdp.yaml"), "x.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {k: v for k, v in env.items() if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"}


def launch(report: Path, stage: str, argv, fsdp: bool = True) -> dict:
    """tests/fsdp_train.py in 2 CPU processes: {(phase, rank): report}."""
    report.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), **(fsdp_environment() if fsdp else {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPT), str(report), stage, *map(str, argv)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return {(phase, rank): json.loads((report / f"{phase}-rank{rank}.json").read_text())
            for phase in ("straight", "resumed") for rank in range(2)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def unet_arguments(run: Path, vae_dir: Path) -> list:
    return [f"train.output_dir={run}", f"vae_path={vae_dir}", *TINY_UNET, *RUN, "validation.prompts=[a red circle]"]


@pytest.fixture(scope="module")
def unet_fsdp(tmp_path_factory, vae_dir):
    """(run folder, report folder, reports) of stage 2 under FSDP2 in 2 processes."""
    root = tmp_path_factory.mktemp("fsdp_unet")
    run, report = root / "run", root / "report"
    return run, report, launch(report, "unet", unet_arguments(run, vae_dir))


def test_the_shipped_config_asks_for_fsdp2_with_sharded_checkpoints():
    env = fsdp_environment()
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"


def test_an_uneven_held_out_split_is_refused_under_fsdp():
    """Every forward on the shards gathers from every process: each must run as many held-out batches."""
    from ldm.errors import LdmError
    from ldm.train.fsdp import check_even_shares

    check_even_shares(4, 2, 1, "the held-out validation loss")  # 2 + 2 batches
    check_even_shares(5, 2, 8, "the held-out validation loss")  # 3 and 2 items: one batch each
    with pytest.raises(LdmError, match=r"\[1, 2\] batches: use a multiple of 4 items") as info:
        check_even_shares(5, 2, 2, "the held-out validation loss")  # 3 items = 2 batches, 2 items = 1 batch
    assert "\n" not in str(info.value)


def test_stage2_trains_sharded_in_two_processes(unet_fsdp):
    _, _, reports = unet_fsdp
    for phase in ("straight", "resumed"):
        for rank in range(2):
            r = reports[phase, rank]
            assert (r["distributed_type"], r["world_size"], r["rank"], r["backend"]) == \
                ("DistributedType.FSDP", 2, rank, "gloo")
            assert r["dtensors"] == r["parameters"] > 0  # every U-Net parameter is a DTensor shard
        # Each process holds its own part of the weights: together exactly the whole U-Net, once.
        assert reports[phase, 0]["local_numel"] + reports[phase, 1]["local_numel"] == reports[phase, 0]["numel"]
        assert reports[phase, 0]["local_numel"] < reports[phase, 0]["numel"]


def test_resumed_run_ends_bit_identical_weights_ema_and_final_folder(unet_fsdp):
    """Stopped after step 2 and resumed from the sharded checkpoint: the same raw weights (gathered
    from the shards), the same EMA (ema.safetensors of step 4) and the same final folder."""
    run, report, _ = unet_fsdp
    straight_raw = load_file(str(report / "straight-raw.safetensors"))
    assert same(straight_raw, load_file(str(report / "resumed-raw.safetensors")))
    assert same(load_file(str(report / "straight-ema.safetensors")),
                load_file(str(run / "checkpoints/step-000004/ema.safetensors")))
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert same(load_file(str(report / "straight-final" / weights)), load_file(str(run / "final" / weights)))
    step2 = load_file(str(run / "checkpoints/step-000002/ema.safetensors"))
    assert not same(step2, load_file(str(run / "checkpoints/step-000004/ema.safetensors")))  # it trained


def test_the_final_folder_holds_the_whole_ema_weights(unet_fsdp):
    """final/ (written by the main process from the gathered shards) loads as a pipeline and holds
    the EMA's whole weights, shadow.i in parameter order, not the raw ones."""
    from ldm.pipeline import LatentDiffusionPipeline

    run, report, _ = unet_fsdp
    pipe = LatentDiffusionPipeline.from_pretrained(str(run / "final"))
    ema = load_file(str(run / "checkpoints/step-000004/ema.safetensors"))
    params = list(pipe.unet.named_parameters())
    assert len(params) == len(ema)
    for i, (name, param) in enumerate(params):
        assert torch.equal(param.detach(), ema[f"shadow.{i}"]), name
    raw = load_file(str(report / "resumed-raw.safetensors"))
    assert not same(raw, {k: v.detach() for k, v in pipe.unet.state_dict().items()})


def test_validation_runs_with_the_shards_and_the_grid_from_the_main_process(unet_fsdp):
    run, _, _ = unet_fsdp
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000002.png", "step-000004.png"]
    records = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert sorted(records) == [1, 2, 3, 4]
    assert [s for s in sorted(records) if "val_loss" in records[s]] == [2, 4]
    assert all("val_loss_ema" in records[s] for s in (2, 4))


def test_the_checkpoint_is_sharded_and_checked_whole(unet_fsdp, tmp_path):
    """Each process wrote its own model and optimizer shard; the manifest covers them, and a crafted
    .metadata (the one file torch.distributed.checkpoint unpickles) is refused before it runs."""
    from ldm.errors import LdmError
    from ldm.train.checkpoint import verified
    from ldm.train.manifest import problem_of, write_manifest

    run, _, _ = unet_fsdp
    checkpoint = run / "checkpoints/step-000004"
    files = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert {f"{folder}/__0_0.distcp", f"{folder}/__1_0.distcp", f"{folder}/.metadata"} <= files
    assert {"random_states_0.pkl", "random_states_1.pkl", "ema.safetensors", "ema.json"} <= files
    assert set(json.loads((checkpoint / "manifest.json").read_text())["files"]) == files - {"manifest.json"}
    assert problem_of(checkpoint) is None

    copy = tmp_path / "checkpoints/step-000004"
    shutil.copytree(checkpoint, copy)
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(sentinel),)

    (copy / "pytorch_model_fsdp_0/.metadata").write_bytes(pickle.dumps(Payload()))
    write_manifest(copy)  # a careful attacker rewrites the manifest to match
    with pytest.raises(LdmError, match=r"pytorch_model_fsdp_0/\.metadata is unreadable") as info:
        verified(copy)
    assert "\n" not in str(info.value) and not sentinel.exists()


@pytest.mark.reliability
def test_fsdp_trains_the_same_model_as_ddp(unet_fsdp, tmp_path, vae_dir):
    """The same 2-process run under DDP: the same losses and weights up to float32 summation order."""
    run, report, _ = unet_fsdp
    ddp_run, ddp_report = tmp_path / "run", tmp_path / "report"
    reports = launch(ddp_report, "unet", unet_arguments(ddp_run, vae_dir), fsdp=False)
    assert reports["straight", 0]["distributed_type"] == "DistributedType.MULTI_CPU"
    fsdp_raw, ddp_raw = (load_file(str(r / "straight-raw.safetensors")) for r in (report, ddp_report))
    assert fsdp_raw.keys() == ddp_raw.keys()
    assert max((fsdp_raw[k] - ddp_raw[k]).abs().max().item() for k in fsdp_raw) < 1e-5
    losses = [[json.loads(line)["loss"] for line in (r / "metrics.jsonl").read_text().splitlines()]
              for r in (run, ddp_run)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.reliability
@pytest.mark.parametrize("kind", ["controlnet", "t2i_adapter"])
def test_the_control_stage_trains_sharded_and_resumes_bit_identically(tmp_path, base_dir, kind):
    from diffusers import ControlNetModel, T2IAdapter

    run, report = tmp_path / "run", tmp_path / "report"
    argv = [f"base_model={base_dir}", f"train.output_dir={run}", f"control.kind={kind}", *RUN,
            "validation.num_controls=2", "control.conditioning_dropout=0.5"]
    reports = launch(report, "control", argv)
    for rank in range(2):
        r = reports["straight", rank]
        assert r["distributed_type"] == "DistributedType.FSDP" and r["dtensors"] == r["parameters"] > 0
    assert reports["straight", 0]["local_numel"] + reports["straight", 1]["local_numel"] == reports["straight", 0]["numel"]
    assert same(load_file(str(report / "straight-raw.safetensors")), load_file(str(report / "resumed-raw.safetensors")))
    assert same(load_file(str(report / "straight-ema.safetensors")),
                load_file(str(run / "checkpoints/step-000004/ema.safetensors")))
    weights = "diffusion_pytorch_model.safetensors"
    assert same(load_file(str(report / "straight-final" / weights)), load_file(str(run / "final" / weights)))
    model = (ControlNetModel if kind == "controlnet" else T2IAdapter).from_pretrained(str(run / "final"))
    ema = load_file(str(run / "checkpoints/step-000004/ema.safetensors"))
    for i, (name, param) in enumerate(model.named_parameters()):
        assert torch.equal(param.detach(), ema[f"shadow.{i}"]), name
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000002.png", "step-000004.png"]
