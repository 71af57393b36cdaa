"""The control stage: a ControlNet or T2I-Adapter trained a few CPU steps on a tiny base model."""

import json
import shutil

import pytest
import torch
from diffusers import ControlNetModel, T2IAdapter
from safetensors.torch import load_file

from ldm.cli.train_control import main
from ldm.errors import LdmError

KINDS = {"controlnet": ControlNetModel, "t2i_adapter": T2IAdapter}


def tiny(out, base_dir, kind, *extra):
    return [
        f"base_model={base_dir}", f"train.output_dir={out}", f"control.kind={kind}", "data.resolution=16",
        "data.shapes.num_images=24", "data.num_validation=4", "train.batch_size=4", "train.log_every=1",
        "validation.num_inference_steps=2", "validation.num_controls=2", "control.num_res_blocks=1", *extra,
    ]


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", KINDS)
def test_two_steps_write_a_folder_diffusers_loads(tmp_path, base_dir, kind):
    run = tmp_path / kind
    assert main(tiny(run, base_dir, kind, "train.max_steps=2", "train.checkpoint_every=1", "validation.every=1")) == 0
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000001.png", "step-000002.png"]
    assert [r["step"] for r in records(run) if "loss" in r] == [1, 2]
    model = KINDS[kind].from_pretrained(str(run / "final"))  # loads as it is, no conversion
    assert (run / "final/ldm_control.yaml").is_file()
    # The base U-Net stays frozen: the checkpoint holds the control model only.
    saved = load_file(str(run / "checkpoints/step-000002/model.safetensors"))
    assert set(saved) == set(model.state_dict())


@pytest.mark.parametrize("kind", KINDS)
def test_resume_is_bit_identical_with_ema_and_conditioning_dropout(tmp_path, base_dir, kind):
    """4 steps straight vs. stopped at step 2 and resumed; EMA on, half the controls blanked."""
    run = tmp_path / kind
    common = ["train.max_steps=4", "train.checkpoints_total_limit=null", "control.conditioning_dropout=0.5",
              "ema.enabled=true", "train.checkpoint_every=2", "validation.every=100"]
    assert main(tiny(run, base_dir, kind, *common)) == 0
    straight = load_file(str(run / "final/diffusion_pytorch_model.safetensors"))
    straight_raw = load_file(str(run / "checkpoints/step-000004/model.safetensors"))
    shutil.rmtree(run / "checkpoints/step-000004")
    shutil.rmtree(run / "final")
    assert main(tiny(run, base_dir, kind, *common, "--resume", "auto")) == 0
    resumed = load_file(str(run / "final/diffusion_pytorch_model.safetensors"))
    resumed_raw = load_file(str(run / "checkpoints/step-000004/model.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert all(torch.equal(straight_raw[k], resumed_raw[k]) for k in straight_raw)
    # The EMA (final) and the raw weights differ: the EMA really ran.
    assert any(not torch.equal(straight[k], straight_raw[k]) for k in straight if k in straight_raw)


def test_conditioning_dropout_blanks_whole_controls():
    from ldm.control.dropout import drop_conditioning

    cond = torch.rand(2000, 3, 4, 4) + 0.1
    dropped = drop_conditioning(cond, 0.3, generator=torch.Generator().manual_seed(0))
    blank = (dropped == 0).flatten(1).all(dim=1)
    kept = (dropped == cond).flatten(1).all(dim=1)
    assert (blank | kept).all()
    assert 0.25 < blank.float().mean() < 0.35
    assert drop_conditioning(cond, 0.0) is cond


def test_conditioning_off_is_refused_before_training(tmp_path, base_dir, capsys):
    assert main(tiny(tmp_path / "run", base_dir, "controlnet", "data.conditioning=false")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.conditioning=true" in err[0]
    assert not (tmp_path / "run").exists()


def test_a_control_model_for_another_base_is_refused(tmp_path, base_dir, capsys):
    other = T2IAdapter(in_channels=3, channels=[16, 32], num_res_blocks=1, downscale_factor=2)
    other.save_pretrained(str(tmp_path / "other"))
    code = main(tiny(tmp_path / "run", base_dir, "t2i_adapter", f"control.init_from={tmp_path / 'other'}"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # not progress bars
    assert code == 2 and len(err) == 1 and "[16, 32]" in err[0] and "[32, 64]" in err[0]


def test_resolution_other_than_the_base_is_refused(tmp_path, base_dir, capsys):
    assert main(tiny(tmp_path / "run", base_dir, "controlnet", "data.resolution=32")) == 2
    assert "data.resolution=16" in capsys.readouterr().err


def test_base_objective_of_a_plain_stable_diffusion_folder_is_read_from_its_scheduler():
    from diffusers import DDIMScheduler

    from ldm.config import ControlModelConfig
    from ldm.train.control_loop import base_objective

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction")
    cfg = base_objective("/nonexistent", scheduler, ControlModelConfig(kind="t2i_adapter"))
    assert (cfg.kind, cfg.prediction_type, cfg.beta_schedule, cfg.beta_end) == ("ddpm", "v_prediction", "scaled_linear", 0.012)
    assert cfg.timestep_sampling == "cubic"  # T2I-Adapter's default
    assert base_objective("/nonexistent", scheduler, ControlModelConfig(kind="controlnet")).timestep_sampling is None
